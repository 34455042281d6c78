"""What the Triton attention kernels share: the options of a call, and the device code every kernel uses.

kernels/triton_attention.py (forward and backward) and kernels/triton_decode.py (split-KV
decoding) serve the same API, so they agree here, once, on:

  Options       the options of one call (causal, scale, window, softcap, dropout): which of them
                are on selects the kernels' constexpr switches (`variant`), `arguments` turns their
                values into the kernels' runtime arguments;
  Packing       where packed sequences lie (kernels.varlen_attention's cu_seqlens);
  the grid      batch x heads on grid axis 1, or axes 1 and 2 when there are more programs
                than CUDA allows on one axis (GRID_AXIS_LIMIT);
  device code   which keys a query sees (`visible`, `block_ranges`), the softcap's tanh, and
                where a packed sequence lies (`sequence_span`).

Every feature is a constexpr switch of the kernels (CAUSAL, WINDOW, SOFTCAP, DROPOUT, VARLEN,
GROUP, SPLIT_GRID, and HEAD_DIM below BLOCK_D): with a switch off, its code is not compiled
at all, so a plain call compiles to the kernel it was before the switch existed. The runtime
value behind a switch that is off is passed as None (a constexpr too).
"""

from . import triton_runtime  # noqa: F401, I001 (first: without CUDA it switches Triton to its interpreter)

import math  # noqa: E402
from typing import NamedTuple  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .dropout import drop_threshold  # noqa: E402

LOG2E = math.log2(math.e)
# CUDA allows 65,535 programs on grid axes 1 and 2 (axis 0: 2**31 - 1). Batch x heads beyond it
# spreads over axes 1 and 2 (tests lower this to check the logic under the interpreter).
GRID_AXIS_LIMIT = 65535


class Options(NamedTuple):
    """One call's options, as kernels.attention validated them (window, softcap None: off).

    deterministic False lets the backward take the single pass that adds dQ with atomics
    (LaunchConfig.dq_atomic); it changes which launch config the backward uses, not `variant`.
    """

    causal: bool
    scale: float
    window: int | None = None
    softcap: float | None = None
    dropout_p: float = 0.0
    dropout_seed: int = 0
    deterministic: bool = True

    @property
    def variant(self) -> tuple[bool, bool, bool, bool]:
        """What the compiled kernels depend on: which switches are on (not their values)."""
        return self.causal, self.window is not None, self.softcap is not None, self.dropout_p > 0


class Packing(NamedTuple):
    """Packed sequences (kernels.varlen_attention): sequence s is rows cu_seqlens_q[s]:cu_seqlens_q[s + 1]
    of q and cu_seqlens_k[s]:cu_seqlens_k[s + 1] of k and v; max_seqlen_q/k bound their lengths."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def sequences(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D, the tile width along the head dim: the next power of two, and at least 16 (tl.dot's
    smallest K). The config table is keyed by it; columns past head_dim are masked."""
    return max(16, triton.next_power_of_2(head_dim))


def _int32(x: int) -> int:
    """A 32-bit unsigned value as the signed int32 with the same bits: Triton types a Python int
    argument i32 or i64 by its value, and one type for every value means one compiled kernel."""
    return x - 2**32 if x >= 2**31 else x


def arguments(options: Options) -> dict:
    """The kernels' runtime arguments for these options; None where a switch is off.

    qk_scale turns q k^T into base-2 scores: scale * log2(e). With a softcap the scores are
    softcap * tanh(scale * q k^T / softcap), so the kernels multiply by softcap_scale = scale /
    softcap, take tanh, and qk_scale = softcap * log2(e). The dropout seed and threshold travel
    as int32 bit patterns (uint32 in the kernel), so any seed and probability share one binary.
    """
    softcap, dropout = options.softcap is not None, options.dropout_p > 0
    return dict(
        qk_scale=(options.softcap if softcap else options.scale) * LOG2E,
        softcap_scale=options.scale / options.softcap if softcap else None,
        window=options.window,
        dropout_seed=_int32(options.dropout_seed) if dropout else None,
        dropout_threshold=_int32(drop_threshold(options.dropout_p)) if dropout else None,
        dropout_scale=1 / (1 - options.dropout_p) if dropout else None,
    )


def batch_head_grid(batch_heads: int) -> tuple[tuple[int, ...], bool]:
    """Grid axes 1 (and 2) for `batch_heads` programs, and SPLIT_GRID: whether it takes both axes.

    With SPLIT_GRID, axis 1 x axis 2 may exceed batch_heads: programs past it return at once.
    """
    if batch_heads <= GRID_AXIS_LIMIT:
        return (batch_heads,), False
    axis_2 = triton.cdiv(batch_heads, GRID_AXIS_LIMIT)
    return (triton.cdiv(batch_heads, axis_2), axis_2), True


def strides(t: torch.Tensor, packed: bool) -> tuple[int, int, int, int]:
    """A tensor's (batch, head, row, head-dim) strides, the order every kernel takes them in.
    A packed (total, heads, head_dim) tensor has no batch dimension: its programs add each
    sequence's first row instead, so its batch stride is 0."""
    if packed:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return t.stride()


def lengths(q: torch.Tensor, k: torch.Tensor, packing: Packing | None) -> tuple[int, int]:
    """The kernels' N_Q, N_K: q_len and kv_len, or for packed sequences the bounds the grid is
    sized by (each program then reads its own sequence's lengths)."""
    if packing is None:
        return q.shape[2], k.shape[2]
    return packing.max_seqlen_q, packing.max_seqlen_k


# ---------------------------------------------------------------------------------------
# Device code
# ---------------------------------------------------------------------------------------


@triton.jit
def split_grid_batch_head(axis_1):
    """With SPLIT_GRID, this program's index into batch x heads (int64): grid axes 1 and 2 together.

    The kernels read grid axis 1 as the index themselves and call this only with SPLIT_GRID, so
    that the plain kernel is exactly the one it was before (an inlined call alone changes how
    ptxas allocates registers).
    """
    return tl.program_id(2).to(tl.int64) * tl.num_programs(1) + axis_1


@triton.jit
def sequence_span(Cu_seqlens, sequence):
    """Where packed sequence `sequence` starts (int64, a row of the packed tensor) and its length."""
    start = tl.load(Cu_seqlens + sequence)
    end = tl.load(Cu_seqlens + sequence + 1)
    return start.to(tl.int64), end - start


@triton.jit
def visible(q_idx, k_idx, N_K, diag, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """True where query q_idx may attend to key k_idx (any broadcastable shapes).

    Query i sits at position i + diag (diag = Tk - Tq: bottom-right alignment). Keys past the
    end are invisible; with CAUSAL, so is every key after the query's position; with WINDOW,
    every key `window` or more positions before it.
    """
    ok = k_idx < N_K
    if CAUSAL:
        ok = ok & (k_idx <= q_idx + diag)
    if WINDOW:
        ok = ok & (k_idx > q_idx + diag - window)
    return ok


@triton.jit
def block_ranges(first, full_first, full_end, end, BLOCK: tl.constexpr):
    """Whole blocks of BLOCK covering [first, end), as lo <= full_lo <= full_hi <= hi: blocks in
    [full_lo, full_hi) lie inside [full_first, full_end) and need no mask, those in [lo, full_lo)
    and [full_hi, hi) do. Used where a sliding window makes both edges of the range ragged.

    Only non-negative numbers are divided: Triton's // truncates toward zero on a GPU, while
    the interpreter floors.
    """
    lo = tl.maximum(first, 0) // BLOCK * BLOCK
    hi = tl.maximum(tl.cdiv(tl.maximum(end, 0), BLOCK) * BLOCK, lo)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(full_first, 0), BLOCK) * BLOCK, lo), hi)
    full_hi = tl.minimum(tl.maximum(tl.maximum(full_end, 0) // BLOCK * BLOCK, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def tanh(x):
    """tanh(x) from exp2, for any x without overflow: sign(x) (1 - e) / (1 + e), e = exp(-2|x|).

    (libdevice's tanh is not available to Triton's CPU interpreter; this runs the same in both.)
    """
    e = tl.math.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)
