"""How much memory and disk a run needs, estimated before anything is allocated.

    footprint = check_memory(config, device, batch_size=16, seq_len=128)   # ValueError (one line:
                                                                           # what it needs, what there is)
    footprint.checkpoint_bytes                                             # one checkpoint of this model, at least

Parameters are counted exactly, on PyTorch's meta device (shapes, no data). Both sizes are lower
bounds: memory holds float32 weights, gradients and OPTIMIZER_SLOTS values per parameter, the
model's buffers, and the activations every block must keep for its backward pass (attention's
internals, dropout masks and the allocator's slack come on top); a checkpoint holds the weights
and the optimizer's values. So a run refused here cannot fit, and a run let through may still
run out of room, never the other way round (gpt/runfiles.py then fails a save in one line).
"""

import os
from dataclasses import dataclass, replace

import torch

from .errors import format_bytes
from .model import GPT, GPTConfig

FLOAT32_BYTES = 4
OPTIMIZER_SLOTS = 1  # values per parameter the optimizer keeps, at least: Muon's momentum (AdamW keeps two)
# Activations a block keeps for its backward pass, in d_model-sized values per token: q, k and v
# (3), the attention output (1), the MLP's hidden layer before and after its GELU (4 + 4).
BLOCK_ACTIVATIONS = 12


def count_parameters(config: GPTConfig) -> tuple[int, int]:
    """(parameters, buffer elements) of the GPT of `config`, without allocating it.

    Built on the meta device with 1 and 2 blocks and extrapolated, since every block is the same
    size: a model with 100 million blocks would take hours to build even without data."""
    sizes = []
    for n_layer in (1, 2):
        with torch.device("meta"):
            model = GPT(replace(config, n_layer=n_layer))
        sizes.append((sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers())))
    (params_1, buffers_1), (params_2, buffers_2) = sizes
    extra = config.n_layer - 1
    return params_1 + extra * (params_2 - params_1), buffers_1 + extra * (buffers_2 - buffers_1)


@dataclass(frozen=True)
class Footprint:
    parameters: int  # count
    buffers: int  # elements (position tables)
    activation_bytes: int

    @property
    def state_bytes(self) -> int:
        """Weights, gradients and optimizer state."""
        return self.parameters * FLOAT32_BYTES * (2 + OPTIMIZER_SLOTS)

    @property
    def training_bytes(self) -> int:
        return self.state_bytes + self.buffers * FLOAT32_BYTES + self.activation_bytes

    @property
    def checkpoint_bytes(self) -> int:
        """Weights and optimizer state, as a checkpoint stores them (at least)."""
        return self.parameters * FLOAT32_BYTES * (1 + OPTIMIZER_SLOTS)


def check_memory(
    config: GPTConfig,
    device: torch.device,
    batch_size: int,
    seq_len: int,
    grad_accum: int = 1,
    autocast: bool = False,
) -> Footprint:
    """The footprint of training `config` on micro-batches of batch_size x seq_len tokens, or a
    one-line ValueError (what it needs, what `device` has) when it cannot fit. Evaluation runs
    batch_size x grad_accum windows at once without gradients: only its logits count."""
    value_bytes = 2 if autocast else FLOAT32_BYTES  # bfloat16 / float16 activations under autocast
    logits = config.vocab_size if config.head == "full" else 0  # the adaptive head's are far fewer
    per_token = config.n_layer * BLOCK_ACTIVATIONS * config.d_model + logits
    training = batch_size * seq_len * per_token * value_bytes
    evaluation = batch_size * grad_accum * seq_len * logits * value_bytes
    # The activations first, in plain arithmetic: sizes beyond 64 bits are refused before they
    # reach PyTorch (which could not even describe such a model on the meta device).
    available = available_memory(device)
    if max(training, evaluation) > available:
        raise ValueError(
            f"this run needs at least {format_bytes(max(training, evaluation))} of memory for its activations "
            f"alone but {device} has {format_bytes(available)}; {SMALLER}"
        )
    footprint = Footprint(*count_parameters(config), max(training, evaluation))
    if footprint.training_bytes > available:
        raise ValueError(
            f"this run needs at least {format_bytes(footprint.training_bytes)} of memory (weights, gradients "
            f"and optimizer state {format_bytes(footprint.state_bytes)}, position tables "
            f"{format_bytes(footprint.buffers * FLOAT32_BYTES)}, activations "
            f"{format_bytes(footprint.activation_bytes)}) but {device} has {format_bytes(available)}; {SMALLER}"
        )
    return footprint


SMALLER = "make the model smaller (--d-model, --n-layer) or the batch (--batch-size, --seq-len)"


def available_memory(device: torch.device) -> int:
    """A GPU's free memory; elsewhere the machine's memory (the CPU's, which an Apple GPU shares)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
