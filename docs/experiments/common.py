"""What the experiments behind docs/first_principles.md share: timing, data, gradient norms, saving.

Each experiment is a script, run from the repository root:
    python docs/experiments/scaling.py
and writes docs/results/<name>.json (and .png) recording the command and the machine.
Timing is the benchmarks' own timer (bench/core.py), so an experiment and a benchmark measure alike.
"""

import json
import os
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from gpt.data import TokenData, load_data
from gpt.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ runs from the checkout, as in the root conftest.py
from bench.core import Timer  # noqa: E402

RESULTS = ROOT / "docs" / "results"
SHAKESPEARE_VOCAB = 2_000  # see shakespeare()


def machine() -> str:
    return f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__.split('+')[0]}"


def command() -> str:
    return "python " + " ".join(sys.argv)


def save(name: str, record: dict) -> Path:
    """Write docs/results/<name>.json with the record, the command that made it and the machine."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    header = {"command": command(), "machine": machine(), "load_average_1min": round(os.getloadavg()[0], 2)}
    path.write_text(json.dumps({**header, **record}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def save_figure(fig, name: str) -> Path:
    """Save docs/results/<name>.png, captioned with the command that made it and the machine."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.suptitle(f"{command()}   ({machine()}, 1 thread)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return path


def median_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of fn() over `repeats` calls after one warm-up call (median: robust to a
    busy neighbour)."""
    timer = Timer(warmup=1, min_calls=repeats, max_calls=repeats, cpu_seconds=0)
    return timer(fn, "cpu")["ms"] / 1e3


def shakespeare(seq_len: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(training windows, held-out windows) of Shakespeare, each an (inputs, targets) pair (n, seq_len).

    The vocabulary is small: the SHAKESPEARE_VOCAB - 1 commonest words keep their ids and every
    rarer word (8.8% of tokens) becomes the last id. Ids are sorted by frequency, so that is a
    clamp; the output layer shrinks 17x and CPU runs take seconds.
    Every 10th window of the training split is held out: an in-distribution check that needs no
    second pass over the project's validation split, which is enough to compare variants.
    """
    data, _ = load_data()
    inputs, targets = TokenData.sequences(data.train.clamp(max=SHAKESPEARE_VOCAB - 1), seq_len)
    held_out = torch.arange(len(inputs)) % 10 == 0
    return (inputs[~held_out], targets[~held_out]), (inputs[held_out][:256], targets[held_out][:256])


def lm_batches(windows: tuple[torch.Tensor, torch.Tensor], batch_size: int, seed: int = 0) -> Iterator:
    """Endless batches of random windows; a fresh iterator repeats the same batches (equal data per variant)."""
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = windows
    while True:
        chosen = torch.randint(0, len(inputs), (batch_size,), generator=generator)
        yield inputs[chosen], targets[chosen]


def unigram_loss(windows: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Entropy of the word frequencies: the loss of a model that ignores its input and predicts them."""
    counts = torch.bincount(windows[1].flatten(), minlength=SHAKESPEARE_VOCAB).double()
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum().item()


def lm_config(**overrides) -> GPTConfig:
    """The small language model of the ablations; overrides change any GPTConfig field."""
    fields = dict(
        vocab_size=SHAKESPEARE_VOCAB,
        block_size=64,
        n_layer=4,
        n_head=4,
        d_model=64,
        attn="sdpa",
        head="full",
        tie_embeddings=False,
        pos_embedding="learned",
        dropout=0.0,
    )
    fields.update(overrides)
    return GPTConfig(**fields)


@torch.no_grad()
def loss_on(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    _, loss = model(inputs, targets)
    model.train()
    return loss.item()


def moving_average(values: list[float], window: int = 20) -> list[float]:
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
        for i in range(len(values))
    ]


def block_grad_norms(model: GPT) -> list[float]:
    """L2 norm of the gradient of each block's parameters (blocks[0] is nearest the input)."""
    return [torch.cat([p.grad.flatten() for p in block.parameters()]).norm().item() for block in model.blocks]
