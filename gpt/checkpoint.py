"""Checkpoints that survive a crash at any moment and prove their integrity, shared by training
and sampling.

    save_checkpoint(path, state)         # atomic: the old file stays intact until the new one is complete
    state = load_checkpoint(path)        # CheckpointError (one-line message) if missing, corrupt, damaged or incomplete
    model, vocab = restore_model(state)  # the GPT and its vocabulary, ready to sample; refuses non-finite weights

A checkpoint is a dict (format 3):
    format        3
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
    checksum      SHA-256 of everything above (see checksum()), written by save_checkpoint
Only plain Python types and tensors: loading uses torch.load(weights_only=True), which cannot
run code hidden in a malicious file. torch.load notices a damaged file structure but not damaged
tensor data, which is what the checksum is for. Format 2 (the same without the checksum) still
loads, unverified: there is nothing to verify it against; its next save writes format 3.
"""

import hashlib
import os
from pathlib import Path

import torch

from .data import Vocab
from .errors import first_line
from .model import GPT, GPTConfig
from .runfiles import atomic_write

FORMAT = 3  # 3: the checksum; 2: the schedule's state replaced total_steps
READABLE_FORMATS = (2, 3)
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
    """A checkpoint is missing, unreadable, damaged or not one of ours; the message says which."""


def checksum(state: dict) -> str:
    """SHA-256 of a checkpoint's contents but its checksum: every tensor by dtype, shape and
    bytes, every other value by type and repr, in the dicts' order (which torch.load keeps)."""
    digest = hashlib.sha256()

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"tensor {value.dtype} {tuple(value.shape)}:".encode())
            # As raw bytes (uint8), whatever the dtype: numpy has no bfloat16.
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)}:".encode())
            for key, item in value.items():
                visit(key)
                visit(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}:".encode())
            for item in value:
                visit(item)
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    visit({key: value for key, value in state.items() if key != "checksum"})
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` with its checksum, atomically (gpt/runfiles.py: a failed write leaves the
    previous checkpoint as it was and raises a one-line RunError)."""
    delay_s = float(os.environ.get(SAVE_DELAY_ENV_VAR, "0"))
    state = {**state, "checksum": checksum(state)}
    atomic_write(path, lambda file: torch.save(state, file), delay_s)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint onto the CPU and verify its checksum; the caller moves what it needs to its device."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (pickle, zip, EOF, Runtime) for a bad file
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line(err)})") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} is not a format-{FORMAT} checkpoint of this project")
    missing = [key for key in REQUIRED_KEYS + (("checksum",) if state["format"] >= 3 else ()) if key not in state]
    if missing:
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(missing)}")
    if state["format"] >= 3 and state["checksum"] != checksum(state):
        raise CheckpointError(
            f"{path} is damaged: its contents do not match the checksum saved with them; "
            "use a copy or an earlier checkpoint"
        )
    return state


def is_current(path: str | os.PathLike, state: dict) -> bool:
    """Whether the checkpoint at `path` is still the one `state` was loaded from (no other run has
    saved there since). Cheap: tensors are memory-mapped, not read."""
    try:
        current = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # gone, or replaced by something unreadable: not the same checkpoint
        return False
    return (current.get("step"), current.get("elapsed_s")) == (state["step"], state["elapsed_s"])


def model_config(state: dict, **overrides) -> GPTConfig:
    """The GPTConfig of a loaded checkpoint; overrides replace fields that do not change the
    weights' shapes, e.g. attn="sdpa"."""
    try:
        return GPTConfig(**{**state["model_config"], **overrides})
    except TypeError as err:  # a field this version does not know, or lacks
        raise CheckpointError(f"the checkpoint does not match this version of the model ({first_line(err)})") from None


def restore_model(state: dict, **overrides) -> tuple[GPT, Vocab]:
    """Rebuild the GPT (on the CPU) and its vocabulary from a loaded checkpoint (overrides: see
    model_config). Weights that are not finite (a run that diverged) are refused: they would
    sample garbage, and training could not continue them."""
    config = model_config(state, **overrides)
    try:
        model = GPT(config)
        model.load_state_dict(state["model"])
        vocab = Vocab.from_state_dict(state["vocab"])
    except (TypeError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"the checkpoint does not match this version of the model ({first_line(err)})") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"the checkpoint's vocabulary has {len(vocab)} tokens but its model {config.vocab_size}")
    not_finite = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
    if not_finite:
        raise CheckpointError(
            f"the checkpoint's weights are not finite (NaN or inf in {not_finite[0]}"
            f"{f' and {len(not_finite) - 1} more' if len(not_finite) > 1 else ''}): it was saved by a run "
            "that diverged; use an earlier checkpoint"
        )
    return model, vocab
