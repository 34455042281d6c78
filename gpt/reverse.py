"""Reversal: a synthetic task that shows what the causal mask does.

Each sequence is n random digits, a separator, then the same digits reversed (n = 4):

    tokens   3 1 4 1 | 1 4 1 3          | is SEPARATOR (id 10)
    inputs   3 1 4 1 | 1 4 1            every token but the last
    targets  1 4 1 | 1 4 1 3            every token but the first: next-token loss everywhere

Target positions fall in three groups:
    first half   targets d2..dn: fresh random digits nobody has seen yet, so a causal model can
                 do no better than chance (1/10)
    separator    target "|": always at position n, trivially predictable
    second half  targets dn..d1: every one was read before the separator, so a model that
                 attends to the right earlier position gets them all right (the first of them,
                 dn, is the digit just before the separator)

Without the mask (--no-mask) the model can read position t+1, which *is* the target of position
t, and scores ~100% on the first half as well: it cheats, and the mask is what prevents that.

    python -m gpt.reverse --attn reference --out runs/reverse     # or: gpt-reverse --out runs/reverse
"""

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

import kernels

from .cli import MAX_SEED, ArgumentParser, check_number, pick_device, resolve_attention, run_program
from .config import add_flag
from .footprint import check_memory
from .model import GPT, POS_EMBEDDINGS, GPTConfig, option
from .runfiles import RunLock, atomic_write, check_room, prepare_out
from .step import train_step

SEPARATOR = 10  # digits are ids 0..9
VOCAB_SIZE = 11
CHANCE = 0.1  # a fresh random digit is one of 10
N_HELD_OUT = 1_000  # evaluation sequences, never used for training
HELD_OUT_SEED = 1_234_567  # fixed: every run is scored on the same sequences
MIN_DIGITS, MAX_DIGITS = 4, 18  # 10^4 sequences >> N_HELD_OUT; 10^18 still fits an int64 code


@dataclass
class ReverseSettings:
    """Every setting of a reversal run; build_parser generates the flags from these fields."""

    n_digits: int = option(8, f"digits per sequence ({MIN_DIGITS}..{MAX_DIGITS}); the model reads 2n tokens")
    steps: int = option(1000, "training steps, one fresh batch each")
    batch_size: int = option(64, "sequences per batch")
    lr: float = option(3e-3, "AdamW learning rate (constant; gradients clipped to norm 1)")
    seed: int = option(0, "seed of the initial weights and of the training sequences")
    attn: str = option("reference", "attention backend", choices=kernels.BACKEND_CHOICES)
    pos_embedding: str = option("learned", "how the model sees positions", choices=POS_EMBEDDINGS)
    causal: bool = option(True, "the causal mask; its flag is --no-mask")
    device: str = option("cpu", "cpu, cuda, cuda:1, ...")

    def validate(self) -> None:
        """Each setting finite and in its range, or a one-line ValueError."""
        check_number("--steps", self.steps, 1)
        check_number("--n-digits", self.n_digits, MIN_DIGITS, MAX_DIGITS)
        check_number("--seed", self.seed, 0, MAX_SEED)
        check_number("--batch-size", self.batch_size, 1)
        check_number("--lr", self.lr, 0, above=True)

    def model_config(self) -> GPTConfig:
        """A small GPT sized for the task: 2 blocks, 2 heads of 32 dimensions, no dropout, a full head."""
        return GPTConfig(
            vocab_size=VOCAB_SIZE,
            block_size=2 * self.n_digits,
            n_layer=2,
            n_head=2,
            d_model=64,
            dropout=0.0,
            attn=self.attn,
            pos_embedding=self.pos_embedding,
            head="full",
            tie_embeddings=False,
            causal=self.causal,
        )


def random_digits(n_sequences: int, n_digits: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 10, (n_sequences, n_digits), generator=generator)


def reversal_examples(digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits (B, n) -> (inputs, targets), each (B, 2n): digits | reversed digits, shifted by one."""
    separator = torch.full_like(digits[:, :1], SEPARATOR)
    tokens = torch.cat([digits, separator, digits.flip(1)], dim=1)  # (B, 2n + 1)
    return tokens[:, :-1], tokens[:, 1:]


def target_groups(n_digits: int) -> dict[str, slice]:
    """Which target positions (0..2n-1) are the first half, the separator and the second half."""
    return {
        "first_half": slice(0, n_digits - 1),
        "separator": slice(n_digits - 1, n_digits),
        "second_half": slice(n_digits, 2 * n_digits),
    }


def held_out_digits(n_digits: int) -> torch.Tensor:
    return random_digits(N_HELD_OUT, n_digits, torch.Generator().manual_seed(HELD_OUT_SEED))


def _codes(digits: torch.Tensor) -> torch.Tensor:
    """Each row of digits as one integer, to compare sequences quickly."""
    return (digits * 10 ** torch.arange(digits.shape[1])).sum(dim=1)


def training_batches(settings: ReverseSettings) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless fresh batches (seeded by settings.seed); a held-out sequence drawn is redrawn."""
    generator = torch.Generator().manual_seed(settings.seed)
    held_out = _codes(held_out_digits(settings.n_digits))
    while True:
        digits = random_digits(settings.batch_size, settings.n_digits, generator)
        clash = torch.isin(_codes(digits), held_out)
        while clash.any():
            digits[clash] = random_digits(int(clash.sum()), settings.n_digits, generator)
            clash = torch.isin(_codes(digits), held_out)
        inputs, targets = reversal_examples(digits)
        yield inputs.to(settings.device), targets.to(settings.device)


def train_model(
    model: GPT,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float,
    after_backward: Callable[[int, GPT], None] | None = None,
) -> list[float]:
    """AdamW on next-token loss for `steps` batches, one gpt.step.train_step each (gradients
    clipped to norm 1); returns the loss of every step.

    after_backward(step, model) runs once the gradients exist, before the update (to record them).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        record = None if after_backward is None else functools.partial(after_backward, step, model)
        loss = train_step(model, optimizer, [next(batches)], lr=lr, grad_clip=1.0, after_backward=record)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def held_out_accuracy(model: GPT, n_digits: int) -> dict:
    """Accuracy of the greedy (argmax) prediction at each target position on the held-out set."""
    model.eval()
    device = next(model.parameters()).device
    inputs, targets = reversal_examples(held_out_digits(n_digits).to(device))
    logits, _ = model(inputs)
    correct = (logits.argmax(dim=-1) == targets).float()  # (N_HELD_OUT, 2n)
    per_position = correct.mean(dim=0)
    groups = target_groups(n_digits)
    return {
        "per_position_accuracy": [round(a, 4) for a in per_position.tolist()],
        "first_half_accuracy": round(correct[:, groups["first_half"]].mean().item(), 4),
        "separator_accuracy": round(correct[:, groups["separator"]].mean().item(), 4),
        "second_half_accuracy": round(correct[:, groups["second_half"]].mean().item(), 4),
        "chance": CHANCE,
    }


def run(settings: ReverseSettings) -> tuple[GPT, dict, list[float]]:
    """Train a fresh model on the task and score it: (model, held_out_accuracy's dict, per-step losses)."""
    torch.manual_seed(settings.seed)
    model = GPT(settings.model_config()).to(settings.device)
    losses = train_model(model, training_batches(settings), settings.steps, settings.lr)
    return model, held_out_accuracy(model, settings.n_digits), losses


def position_labels(n_digits: int) -> list[str]:
    """What each target position predicts: inK is input digit K (digit 1 is never a target), "|" the
    separator, outK the K-th digit of the reversed half."""
    return [f"in{i}" for i in range(2, n_digits + 1)] + ["|"] + [f"out{i}" for i in range(1, n_digits + 1)]


def build_parser() -> ArgumentParser:
    """One flag per ReverseSettings field (as gpt.config makes gpt.train's), but the mask's:
    --no-mask, a control that removes it. Flags not given are absent from the parsed namespace."""
    parser = ArgumentParser(
        prog="python -m gpt.reverse", description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS
    )
    parser.add_argument("--out", required=True, help="directory for reverse.json")
    parser.add_argument(
        "--no-mask",
        dest="causal",
        action="store_false",
        help="debugging control: remove the causal mask so positions see the future (cheats)",
    )
    for f in fields(ReverseSettings):
        if f.name != "causal":
            add_flag(parser, f)
    return parser


def settings_from_flags(args) -> tuple[ReverseSettings, Path]:
    """Parsed flags -> (settings, output directory); a bad value, or a batch that cannot fit the
    device, raises a one-line ValueError."""
    given = vars(args)
    out = Path(given.pop("out"))
    settings = ReverseSettings(**given)
    settings.validate()
    device = pick_device(settings.device)
    # Triton loads on first use: fail here, in one line, not mid-training.
    settings = replace(settings, attn=resolve_attention(settings.attn, device), device=str(device))
    check_memory(settings.model_config(), device, settings.batch_size, 2 * settings.n_digits)
    return settings, out


def reverse_from_flags(args) -> int:
    """Check everything, --out included, before training, so that no result is lost at the end."""
    settings, out = settings_from_flags(args)
    prepare_out(out)
    with RunLock(out):  # also proves --out writable
        check_room(out)
        return train_and_report(settings, out)


def train_and_report(settings: ReverseSettings, out: Path) -> int:
    """Train, print the accuracy of every target position, write out/reverse.json."""
    mask = "causal mask" if settings.causal else "NO MASK (debugging control: the model can read the future)"
    print(f"reversing {settings.n_digits} digits | attn={settings.attn} | {mask} | {settings.steps} steps")
    started = time.perf_counter()
    _, results, losses = run(settings)
    seconds = time.perf_counter() - started

    # The n-1 unseen digits cost ln(10) each at best; the other n+1 targets can cost ~0.
    floor = (settings.n_digits - 1) / (2 * settings.n_digits) * math.log(10)
    print(f"trained in {seconds:.1f}s, final loss {losses[-1]:.4f} (a causal model cannot go below {floor:.4f})")
    print("target     accuracy")
    for label, accuracy in zip(position_labels(settings.n_digits), results["per_position_accuracy"]):
        print(f"{label:<10} {accuracy:.3f}")
    print(f"first half  (predicting unseen input digits) {results['first_half_accuracy']:.3f}  chance {CHANCE}")
    print(f"second half (predicting the reversed digits) {results['second_half_accuracy']:.3f}")

    record = {
        **results,
        "position_labels": position_labels(settings.n_digits),
        "final_loss": losses[-1],
        "train_seconds": round(seconds, 1),
        "settings": asdict(settings),
    }
    path = out / "reverse.json"
    atomic_write(path, lambda file: file.write((json.dumps(record, indent=2) + "\n").encode()))
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_program(lambda: reverse_from_flags(args))


if __name__ == "__main__":
    sys.exit(main())
