"""The settings of a training run, and the command line generated from them.

Each option is declared once, with its default and one line of help, in one of two dataclasses:

    GPTConfig (gpt/model.py)   the model: --n-layer, --d-model, --dropout, --attn, --head, ...
    TrainConfig (here)         the run: data, optimization, bookkeeping; TrainConfig.model holds a GPTConfig

`python -m gpt.train --help` lists both. The defaults are the default run. A model's vocab_size
and block_size are no flags: the run sets them from its data's vocabulary and from --seq-len.

    cfg, state = configure(["--steps", "100"])   # (TrainConfig, checkpoint to resume from or None)
"""

import argparse
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .cli import MAX_SEED, ArgumentParser, check_number
from .model import GPTConfig, option
from .runfiles import CKPT_NAME

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # None: no autocast
SET_BY_THE_RUN = ("vocab_size", "block_size")  # GPTConfig fields that are no flags (see above)
# The model options a resumed run may change: they leave the meaning of the trained weights alone.
# Every other model option, and the run's length and schedule, is fixed by the checkpoint.
CHANGEABLE_ON_RESUME = ("dropout", "attn")
FIXED_ON_RESUME = ("steps", "minutes", "decay", "muon")  # the run's length, its schedule, its optimizer
PER_INVOCATION = ("resume", "stop_at")  # settings of one command, not of the run: never inherited
MAX_MINUTES = 1_000_000  # about two years: a budget in seconds and its step counts stay far inside 64 bits


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults are the default run: change them here (the
    model's in GPTConfig)."""

    data: str | None = option(
        None, "text of Project Gutenberg eBook #100; default: $GPT_SHAKESPEARE, else a cached download", type=str
    )
    out: str = option("out", "directory for ckpt.pt, metrics.jsonl and loss.png")
    model: GPTConfig = field(default_factory=GPTConfig)  # flags: one per GPTConfig field but SET_BY_THE_RUN
    # Optimization.
    batch_size: int = option(16, "sequences per micro-batch per process")
    seq_len: int = option(128, "tokens per training sequence; also the model's block_size (context length)")
    grad_accum: int = option(1, "micro-batches per step; global batch = batch size x grad accum x processes")
    steps: int | None = option(None, "optimizer steps in total; takes precedence over --minutes", type=int)
    minutes: float = option(14.0, "time budget: as many steps as fit, re-estimated from the measured speed as it goes")
    lr: float = option(8e-3, "peak learning rate: reached after warmup, held, then decayed linearly to 10%%")
    warmup: int = option(100, "steps of linear learning-rate warmup")
    decay: float = option(0.3, "fraction of the run (of its time, with --minutes) spent decaying the learning rate")
    weight_decay: float = option(0.1, "AdamW weight decay, applied to Linear weight matrices only")
    muon: bool = option(True, "Muon for the blocks' weight matrices (AdamW for the rest): see configure_optimizer")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0: no clipping")
    dropout_after: float = option(
        3.0, "epochs of training data before --dropout switches on (0: from the start); see Trainer.dropout_at"
    )
    seed: int = option(1337, "seed of the initial weights, the data order and dropout")
    # Bookkeeping.
    log_interval: int = option(50, "steps between lines in metrics.jsonl (train loss, tokens/s)")
    eval_interval: int = option(200, "steps between validation evaluations (and loss.png updates)")
    eval_windows: int = option(256, "validation windows per intermediate evaluation (0: all); the final one uses all")
    ckpt_interval: int = option(500, "steps between checkpoints (one is also saved at the end and on SIGINT/SIGTERM)")
    device: str | None = option(None, "cpu, cuda, cuda:1, ...; default: cuda if available, else cpu", type=str)
    dtype: str = option(
        "float32",
        "float32, or autocast to bfloat16 / float16 (float16 with loss scaling, CUDA only)",
        choices=tuple(DTYPES),
    )
    compile: bool = option(False, "torch.compile the model (slow start, faster steps)")
    # Settings of one invocation, not of the run: a resumed run does not inherit them.
    resume: bool = option(False, "continue the run in --out/ckpt.pt; other flags override its settings")
    stop_at: int | None = option(
        None, "save and exit after this step; the schedule still spans the whole run", type=int
    )

    def validate(self) -> None:
        """The run's own settings, each finite and in its range; GPTConfig checks the model's when
        it is made, gpt/footprint.py whether they fit the machine."""
        for name in (
            "batch_size",
            "seq_len",
            "grad_accum",
            "steps",
            "log_interval",
            "eval_interval",
            "ckpt_interval",
            "stop_at",
        ):
            check_number(flag(name), getattr(self, name), 1)  # None (steps, stop_at unset) passes
        for name in ("warmup", "eval_windows"):
            check_number(flag(name), getattr(self, name), 0)
        check_number("--seed", self.seed, 0, MAX_SEED)
        check_number("--minutes", self.minutes, 0, MAX_MINUTES, above=True)
        check_number("--lr", self.lr, 0, above=True)
        check_number("--decay", self.decay, 0, 1)
        check_number("--weight-decay", self.weight_decay, 0)
        check_number("--grad-clip", self.grad_clip, 0)
        check_number("--dropout-after", self.dropout_after, 0)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def model_options() -> list[Field]:
    return [f for f in fields(GPTConfig) if f.name not in SET_BY_THE_RUN]


def run_options() -> list[Field]:
    return [f for f in fields(TrainConfig) if f.name != "model"]


def add_flag(parser: argparse.ArgumentParser, f: Field) -> None:
    """The flag --name-with-dashes for a field made by option(): its help, with the default appended."""
    kwargs = dict(f.metadata)
    default = f.default_factory() if f.default is MISSING else f.default
    if isinstance(default, bool):
        kwargs["help"] += f" (default: {'on' if default else 'off'})"
        parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        return
    if default is not None:
        kwargs["help"] += f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
    kwargs.setdefault("type", type(default))
    if "choices" not in kwargs:  # with choices, argparse shows them instead
        kwargs["metavar"] = f.name.split("_")[-1].upper()
    parser.add_argument(flag(f.name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """One flag per option. Flags not given are absent from the parsed namespace, so that
    --resume can tell which settings the user overrides."""
    parser = ArgumentParser(
        prog="python -m gpt.train",
        argument_default=argparse.SUPPRESS,
        description="Train the word-level GPT on Shakespeare (see gpt/train.py).",
    )
    for f in run_options():
        add_flag(parser, f)
    changeable = " and ".join(map(flag, CHANGEABLE_ON_RESUME))
    model = parser.add_argument_group(
        f"the model (GPTConfig, gpt/model.py); when resuming only {changeable} may change"
    )
    for f in model_options():
        add_flag(model, f)
    return parser


def configure(argv: list[str] | None) -> tuple[TrainConfig, dict | None]:
    """Command line -> (TrainConfig, checkpoint to resume from or None).

    With --resume the run's stored settings are the starting point and the given flags override
    them, except the model's shape and the step budget, which the checkpoint fixes.
    """
    given = vars(build_parser().parse_args(argv))
    model_given = {f.name: given.pop(f.name) for f in model_options() if f.name in given}
    if not given.get("resume"):
        config = TrainConfig(**given, model=GPTConfig(**model_given))
        config.validate()
        return config, None
    state = load_checkpoint(Path(given.get("out", TrainConfig.out)) / CKPT_NAME)
    stored = stored_config(state)
    for name, value in model_given.items():
        if name not in CHANGEABLE_ON_RESUME:
            refuse_change(name, value, getattr(stored.model, name))
    for name in FIXED_ON_RESUME:
        if name in given:
            refuse_change(name, given[name], getattr(stored, name))
    config = replace(stored, **given, model=replace(stored.model, **model_given))
    config.validate()
    return config, state


def refuse_change(name: str, given, stored) -> None:
    if given != stored:
        raise ValueError(
            f"{flag(name)} cannot change when resuming (the checkpoint has {stored}); "
            "start a new run in another --out instead"
        )


def stored_config(state: dict) -> TrainConfig:
    """The TrainConfig a checkpoint was written with, less its per-invocation settings."""
    settings = {name: value for name, value in state["train_config"].items() if name not in PER_INVOCATION}
    try:
        return TrainConfig(**{**settings, "model": GPTConfig(**settings["model"])})
    except (TypeError, KeyError) as err:
        raise CheckpointError(f"the checkpoint's train_config does not fit this version ({err})") from None
