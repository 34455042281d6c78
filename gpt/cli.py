"""What gpt.train, gpt.sample and gpt.reverse share, so that every program fails the same way:

parser = ArgumentParser(prog="python -m gpt.sample", ...)   # a bad flag: one line, exit code 2
return run_program(lambda: body(args))                      # an expected problem: one line, exit code 2
device = pick_device(args.device)
backend = resolve_attention(args.attn, device)             # "auto" made concrete; fails if it cannot run
"""

import argparse
import sys
from collections.abc import Callable

import torch

import kernels

from .checkpoint import CheckpointError
from .data import DataError
from .errors import first_line

# Problems a user can fix (a bad value, a missing or corrupt file), as opposed to bugs, which keep
# their traceback.
EXPECTED_ERRORS = (ValueError, DataError, CheckpointError)


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


def pick_device(name: str | None, local_rank: int = 0) -> torch.device:
    """A device by name (None: cuda if available, else cpu); a bare "cuda" means GPU `local_rank`."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
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
