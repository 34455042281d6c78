"""How our Triton kernels run on this machine, and the switches that change how they launch.

Import this module before any `@triton.jit` kernel of ours is defined:

    from . import triton_runtime   # first: may switch Triton to its interpreter
    import triton

Triton picks compiled or interpreted code when `@triton.jit` decorates a function, from
TRITON_INTERPRET. Without CUDA nothing can run compiled, so this module sets
TRITON_INTERPRET=1 unless the user chose otherwise: the kernels then run through Triton's
CPU interpreter, which takes CPU tensors and is exact and very slow (for tests only). An
explicit TRITON_INTERPRET=0 is respected, so that `python -m kernels.compile_check` can
compile the kernels ahead of time for a GPU this machine does not have.
"""

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
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


def _round_bfloat16_casts_to_nearest() -> None:
    """Make the interpreter round float32 -> bfloat16 casts to nearest even, as GPUs do.

    Triton's interpreter (3.9) casts by dropping the low 16 bits, i.e. it rounds toward zero:
    twice the error of a GPU's cvt.rn, and biased, so bfloat16 results under the interpreter
    were worse than the same kernels' on a GPU. float16 casts go through numpy, which rounds
    to nearest even already.
    """
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "cast_impl") or not hasattr(interpreter, "TensorHandle"):
        return  # another interpreter: leave it alone
    cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    builder.cast_impl = cast_impl


# What @triton.jit will do: set above without CUDA, or by the user. (triton.knobs exists
# from Triton 3.4; older versions read the variable directly.)
_knobs = getattr(triton, "knobs", None)
INTERPRET = bool(_knobs.runtime.interpret) if _knobs else os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    if isinstance(tl.zeros, JITFunction) and not torch.cuda.is_available():
        _make_triton_library_interpretable()
    _round_bfloat16_casts_to_nearest()
    warnings.warn(
        "kernels: Triton runs through its CPU interpreter (TRITON_INTERPRET=1); "
        "results are correct but very slow, for testing only",
        stacklevel=2,
    )


def fp32_dot(dtype: torch.dtype) -> bool:
    """The FP32_DOT flag of `dot` for inputs of `dtype`."""
    return INTERPRET or dtype == torch.float32


@triton.jit
def dot(a, b, FP32_DOT: tl.constexpr):
    """a @ b with a float32 result, the one matrix product every kernel of ours uses.

    FP32_DOT multiplies in float32 at full IEEE precision. It is needed (1) for float32
    inputs, which tl.dot would otherwise round to tf32 on GPUs, and (2) under the CPU
    interpreter, whose bfloat16 dot returns garbage. Upcasting 16-bit operands changes
    nothing numerically: their products are exact in float32 either way.
    """
    if FP32_DOT:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@dataclass(frozen=True)
class Switches:
    """Every environment switch of our Triton kernels, read once when this module is imported.

    GPT_KERNELS_AUTOTUNE=1   benchmark the candidate launch configs once per config class
                             (kernels/triton_configs.py) instead of using the committed table;
                             winners persist in tuning_dir between processes.
    GPT_KERNELS_NAN_FILL=1   allocate every output buffer NaN-filled, so a test sees any element
                             a kernel forgot to write (torch.empty could hold old, plausible values).
    XDG_CACHE_HOME           where tuning_dir lives: $XDG_CACHE_HOME/gpt-kernels (default ~/.cache).

    Tests change them with monkeypatch.setattr(triton_runtime, "SWITCHES", Switches(...)): the
    launch code reads `triton_runtime.SWITCHES` (never the environment), and its per-shape
    caches are keyed by the switches in force.
    """

    autotune: bool = False
    nan_fill: bool = False
    tuning_dir: Path = Path.home() / ".cache" / "gpt-kernels"

    @classmethod
    def from_env(cls) -> "Switches":
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return cls(
            autotune=os.environ.get("GPT_KERNELS_AUTOTUNE") == "1",
            nan_fill=os.environ.get("GPT_KERNELS_NAN_FILL") == "1",
            tuning_dir=Path(cache) / "gpt-kernels",
        )


SWITCHES = Switches.from_env()
