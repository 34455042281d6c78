"""What gpt.train, gpt.sample and gpt.reverse share, so that every program fails the same way:

parser = ArgumentParser(prog="python -m gpt.sample", ...)   # a bad flag: one line, exit code 2
return run_program(lambda: body(args))                      # an expected problem: one line, exit code 2
device = pick_device(args.device)
backend = resolve_attention(args.attn, device)             # "auto" made concrete; fails if it cannot run
check_number("--lr", args.lr, 0, above=True)               # finite and > 0, or one line
"""

import argparse
import math
import sys
from collections.abc import Callable

import torch

import kernels

from .checkpoint import CheckpointError
from .data import DataError
from .errors import RunError, first_line

# Problems a user can fix (a bad value, a missing or corrupt file, a full disk), as opposed to bugs,
# which keep their traceback.
EXPECTED_ERRORS = (ValueError, DataError, CheckpointError, RunError)
INT64_MAX = 2**63 - 1  # integer settings end up in tensors and torch's generators
MAX_SEED = 2**32 - 1  # a seed seeds several generators, some after mixing in the epoch: 32 bits fit them all
DEVICE_TYPES = ("cpu", "cuda", "mps")  # where the model can run (meta holds shapes only, no data)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit code 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def run_program(body: Callable[[], int]) -> int:
    """Run a program's body and return its exit code; an expected problem ends it with one line
    on stderr ("error: ...") and exit code 2."""
    try:
        return body()
    except EXPECTED_ERRORS as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2


def check_number(
    flag: str, value: float | int | None, low: float, high: float | None = None, *, above=False, fix: str = ""
) -> None:
    """Refuse a setting (ValueError, one line, ending with `fix` if given) unless it is a finite
    number in [low, high], or (low, high] with above=True; an integer must also fit 64 bits. None
    (an unset optional setting) passes. NaN fails every comparison, so it is refused like inf."""
    if value is None:
        return
    ceiling = high if high is not None or not isinstance(value, int) else INT64_MAX
    fits = (
        (isinstance(value, int) or math.isfinite(value))  # math.isfinite cannot take a huge int
        and (low < value if above else low <= value)
        and (ceiling is None or value <= ceiling)
    )
    if not fits:
        kind = "an integer" if isinstance(value, int) else "a finite number"
        bounds = f"{'>' if above else '>='} {low}"
        if high is not None or (ceiling is not None and value > ceiling):
            bounds += f" and <= {ceiling}"
        raise ValueError(f"{flag} must be {kind} {bounds}, got {value}{f'; {fix}' if fix else ''}")


def pick_device(name: str | None, local_rank: int = 0) -> torch.device:
    """A device by name (None: cuda if available, else cpu); a bare "cuda" means GPU `local_rank`."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"--device {name}: the model runs on {', '.join(DEVICE_TYPES)}, not {device.type}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name} asked for, but PyTorch sees no Apple GPU (MPS); use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(f"--device {device}: PyTorch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        torch.cuda.set_device(device)
    return device


def resolve_attention(name: str, device: torch.device) -> str:
    """--attn -> a concrete backend for `device`. Fails here, in one line, if it cannot run,
    rather than with a traceback at the first forward pass."""
    backend = kernels.resolve_backend(name, device)
    reason = kernels.unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"--attn {reason}")
    return backend
