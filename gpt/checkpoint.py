"""Checkpoints that survive a crash at any moment, shared by training and sampling.

    save_checkpoint(path, state)         # atomic: the old file stays intact until the new one is complete
    state = load_checkpoint(path)        # CheckpointError (one-line message) if missing, corrupt or incomplete
    model, vocab = restore_model(state)  # the GPT and its vocabulary, ready to sample

A checkpoint is a dict (format 2):
    format        2
    model         GPT.state_dict() of the unwrapped model (never torch.compile's or DDP's wrapper)
    model_config  dataclasses.asdict(GPTConfig)
    vocab         Vocab.state_dict()
    train_config  dataclasses.asdict(TrainConfig): the run's settings, the model's options under "model"
    optimizer     the optimizer's state_dict: gpt.step.Optimizers' (Muon + AdamW, the default) or AdamW's (--no-muon)
    scaler        GradScaler state_dict (empty unless --dtype float16)
    step          optimizer steps done
    schedule      Schedule.state_dict(): the run's length and where its learning-rate decay started
    budget        TimeBudget.state_dict() (measured seconds per step) with --minutes, else None
    tokens        training tokens seen so far
    elapsed_s     training wall time so far, summed over resumed runs
Only plain Python types and tensors: loading uses torch.load(weights_only=True), which cannot
run code hidden in a malicious file.
"""

import os
from pathlib import Path

import torch

from .data import Vocab
from .errors import first_line
from .model import GPT, GPTConfig
from .runfiles import atomic_write

FORMAT = 2  # 2: the schedule's state replaced total_steps
REQUIRED_KEYS = (
    "format",
    "model",
    "model_config",
    "vocab",
    "train_config",
    "optimizer",
    "scaler",
    "step",
    "schedule",
    "budget",
    "tokens",
    "elapsed_s",
)
# Fault-injection hook for tests: seconds to sleep after the temporary file is complete and
# before it replaces the checkpoint, so a test can kill the process inside that window.
SAVE_DELAY_ENV_VAR = "GPT_CKPT_SAVE_DELAY_S"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours; the message says which."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    delay_s = float(os.environ.get(SAVE_DELAY_ENV_VAR, "0"))
    atomic_write(path, lambda file: torch.save(state, file), delay_s)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint onto the CPU; the caller moves what it needs to its device."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (pickle, zip, EOF, Runtime) for a bad file
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line(err)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a format-{FORMAT} checkpoint of this project")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(missing)}")
    return state


def restore_model(state: dict, **overrides) -> tuple[GPT, Vocab]:
    """Rebuild the GPT (on the CPU) and its vocabulary from a loaded checkpoint.

    overrides replace GPTConfig fields that do not change the weights' shapes, e.g. attn="sdpa".
    """
    try:
        config = GPTConfig(**{**state["model_config"], **overrides})
        model = GPT(config)
        model.load_state_dict(state["model"])
        vocab = Vocab.from_state_dict(state["vocab"])
    except (TypeError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"the checkpoint does not match this version of the model ({first_line(err)})") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"the checkpoint's vocabulary has {len(vocab)} tokens but its model {config.vocab_size}")
    return model, vocab
