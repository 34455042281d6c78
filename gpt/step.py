"""One training step and one evaluation, as plain functions of a model, an optimizer and batches.

    model = build_model(config, device, seed=1337)                 # the same seed: the same weights
    optimizer = configure_optimizer(model, lr, weight_decay, device)
    loss = train_step(model, optimizer, [(x, y)], lr=schedule.lr(step))    # gpt/schedule.py
    val_loss = evaluate(model, inputs, targets, batch_size)

gpt/train.py and gpt/reverse.py run them in a loop; the benchmarks (bench/measure.py) time them.
"""

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .model import GPT, AdaptiveInput, GPTConfig
from .muon import Muon


def build_model(config: GPTConfig, device: torch.device | str, seed: int) -> GPT:
    """A freshly initialized GPT; the same seed gives the same weights in every process."""
    torch.manual_seed(seed)
    return GPT(config).to(device)


def configure_optimizer(
    model: GPT, lr: float, weight_decay: float, device: torch.device | str, muon: bool = False
) -> "torch.optim.AdamW | Optimizers":
    """AdamW that decays only the weight matrices of Linear layers; with `muon`, the blocks'
    weight matrices get Muon instead (both at the same lr and weight decay).

    Decay pulls weights towards zero; that regularizes the matrices that mix features, but on a
    norm's gain or a bias it only fights the scale the layer needs, and on an embedding it would
    shrink the vectors of rare words, which get few gradient updates to push back. A tied output
    layer is the embedding (tie_embeddings), so it is not decayed either.

    Muon (Jordan et al., 2024) orthogonalizes each matrix's momentum (Newton-Schulz iterations)
    before the update, so every direction of the matrix moves at the same rate, not just the
    dominant one; it is meant for the hidden 2-D weights, not for embeddings, the output layer or
    vectors. "match_rms_adamw" scales its update to AdamW's size, so the same lr serves both.
    gpt/muon.py is torch.optim.Muon with its orthogonalization in a precision that is fast on
    the parameters' device.
    """
    embeddings = {
        id(p) for m in model.modules() if isinstance(m, (nn.Embedding, AdaptiveInput)) for p in m.parameters()
    }
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    hidden = {id(m.weight) for m in model.blocks.modules() if isinstance(m, nn.Linear)} if muon else set()
    params = list(model.parameters())  # each shared parameter once
    groups = [
        {"params": [p for p in params if id(p) in matrices - hidden], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in matrices], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=torch.device(device).type == "cuda")
    if not muon:
        return adamw
    matrices_for_muon = [p for p in params if id(p) in hidden]
    return Optimizers(Muon(matrices_for_muon, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"), adamw)


class Optimizers:
    """Several optimizers stepped as one, each over its own parameters: to train_step, GradScaler
    and the checkpoint they look like a single optimizer (param_groups, step, zero_grad, state)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    grad_clip: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    after_backward: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One optimizer step over micro_batches [(x, y), ...], each (B, T) token ids on the model's device.

    Each micro-batch's loss is divided by their number, so the summed gradients are those of the
    mean loss over all of them. Under DDP only the last backward all-reduces the gradients (the
    others run in no_sync): one exchange per step, not per micro-batch.
    amp_dtype: autocast dtype (None: float32); scaler: loss scaling for float16.
    after_backward() runs once the step's (unscaled) gradients exist, before clipping and the
    update: to record them (docs/experiments/residual.py does).
    Returns the mean loss as a 0-dim tensor on the device: reading it (.item()) waits for the device.
    """
    device = micro_batches[0][0].device
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        is_last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if is_last or not isinstance(model, DDP) else model.no_sync():
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                _, loss = model(x, y)
            loss = loss / len(micro_batches)
            scaler.scale(loss).backward()
        total += loss.detach()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if after_backward is not None:
        after_backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, amp_dtype: torch.dtype | None = None
) -> float:
    """Mean cross-entropy over the (n, T) windows. All windows have T tokens, so the mean over
    windows is the mean over tokens; the last, shorter batch is weighted by its size."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for start in range(0, len(inputs), batch_size):
        x, y = (
            to_device(inputs[start : start + batch_size], device),
            to_device(targets[start : start + batch_size], device),
        )
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            _, loss = model(x, y)
        total += loss.float() * len(x)
    model.train(was_training)
    return total.item() / len(inputs)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # From pinned memory the copy to a GPU is asynchronous: the CPU does not wait for it.
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
