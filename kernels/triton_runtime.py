"""How our Triton kernels run on this machine: compiled on CUDA, interpreted on CPU.

Import this module before any `@triton.jit` kernel of ours is defined:

    from .triton_runtime import INTERPRET   # first: may switch Triton to its interpreter
    import triton

Triton picks compiled or interpreted code when `@triton.jit` decorates a function, from
TRITON_INTERPRET. Without CUDA nothing can be compiled, so this module sets
TRITON_INTERPRET=1: the kernels then run through Triton's CPU interpreter, which takes CPU
tensors and is exact and very slow (for tests only).
"""
import os
import sys
import warnings

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def _make_triton_library_interpretable() -> None:
    """Re-wrap triton.language's own @jit helpers (tl.zeros, tl.max, tl.sum, ...) for the interpreter.

    Triton decorated them when it was first imported. If that happened before
    TRITON_INTERPRET=1 was set (torch.compile imports triton early, for instance), they
    are compiled-mode functions, which the interpreter refuses to call from a kernel.
    Only done without CUDA, where nothing can be using compiled Triton.
    """
    for name, module in list(sys.modules.items()):
        if name == "triton.language" or name.startswith("triton.language."):
            for attr, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    setattr(module, attr, InterpretedFunction(value.fn))


# What @triton.jit will do: set above without CUDA, or by the user. (triton.knobs exists
# from Triton 3.4; older versions read the variable directly.)
_knobs = getattr(triton, "knobs", None)
INTERPRET = bool(_knobs.runtime.interpret) if _knobs else os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    if isinstance(tl.zeros, JITFunction) and not torch.cuda.is_available():
        _make_triton_library_interpretable()
    warnings.warn(
        "kernels: Triton runs through its CPU interpreter (TRITON_INTERPRET=1); "
        "results are correct but very slow, for testing only",
        stacklevel=2,
    )
