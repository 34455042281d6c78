"""Attention for a few new queries against a long KV cache: split-KV ("flash-decoding") in Triton.

    out = decode_attention(q, k, v, causal=True, scale=0.125)   # q (B, Hq, Tq <= 16, D), k/v (B, Hkv, Tk, D)

Why a second kernel. With a KV cache, `generate` sends one new query per step (Tq = 1, or
a short prompt) against every cached key (Tk = 64 .. 8k and more). The FlashAttention-2
forward in kernels/triton_attention.py gives each program a block of queries and walks all
the keys, so here it would launch just B * H programs, each a long serial walk over the
cache: most of a GPU's SMs idle, and the walk grows with every token.

Flash-decoding parallelizes over the keys instead. The cache is cut into num_splits chunks
of split_size keys, and two small kernels run:

  split    grid (num_splits, B * H). A program loads all Tq query rows as one 16-row tile
           (rows >= Tq are padding: 16 keeps tl.dot legal on GPUs, and they are never
           stored), streams its chunk of keys with the usual online softmax (running row
           max m and row sum l, float32) and writes a float32 partial result: the output
           normalized over its own keys, o_s = sum_j 2^(x_j - m) v_j / l, and their
           log-sum-exp lse_s = m + log2(l) (x_j are the scores, in base 2).
  combine  grid (B * H). Softmax over all keys is a weighted mix of the chunks' outputs:
               M = max_s lse_s,    out = sum_s 2^(lse_s - M) o_s  /  sum_s 2^(lse_s - M)
           A program walks its splits in the order 0, 1, 2, ... and no atomics are used,
           so the result is the same to the bit on every run.

A chunk may hold no key that some row may see (causal, early rows, the last chunk): that
row's lse_s is -inf, its weight 2^(-inf) = 0, and the chunk drops out of its sum. Every
row sees key 0, which lies in chunk 0, so M is always finite.

Causal masking is bottom-right aligned, as in kernels/reference.py: query i sees key j iff
j <= i + Tk - Tq. Keys below Tk - Tq + 1 are visible to every row, so only the key blocks
past that point (the end of the cache) pay for a mask.

The kernels take the features of kernels/triton_attention.py's forward, as the same
constexpr switches (kernels/triton_common.py): grouped-query attention (GROUP: each query
head reads its kv head, no copies), a sliding window (WINDOW: the splits cover only the
keys inside the window, window + Tq keys at most however long the cache, and the block at
its far edge is masked), a softcap (SOFTCAP), packed sequences (VARLEN: one sequence per
program, each its own q and kv lengths; kernels.varlen_attention with max_seqlen_q <= 16)
and head dims padded to a power of two (BLOCK_D). Dropout is for training, which takes the
FlashAttention forward (kernels/triton_attention.py routes).

Compiled once per generation. Triton specializes a kernel on its integer arguments (equal
to 1? divisible by 16?), which would compile a new variant whenever Tk crossed a multiple
of 16. Tq, Tk, the split size and count are therefore marked do_not_specialize, and the
block sizes come from a fixed table per (head dim, dtype): every Tq <= 16 and every Tk
share one binary per kernel.

Without CUDA the kernels run through Triton's CPU interpreter (kernels/triton_runtime.py):
exact and slow, with small blocks so that tests exercise several splits.
"""

import functools  # noqa: I001 (kernels.triton_runtime must be imported before triton: see there)
from typing import NamedTuple

import torch

from .triton_runtime import INTERPRET, dot, fp32_dot  # first: without CUDA, switches Triton to its interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import triton_configs  # noqa: E402
from .triton_common import (  # noqa: E402
    Options,
    Packing,
    arguments,
    batch_head_grid,
    block_ranges,
    lengths,
    padded_head_dim,
    sequence_span,
    split_grid_batch_head,
    strides,
    tanh,
    visible,
)
from .triton_configs import LaunchConfig  # noqa: E402

MAX_DECODE_Q_LEN = 16  # every query row of a call fits in one 16-row tile (the table's BLOCK_M)


@triton.jit
def _fold_key_blocks(
    acc, l_i, m_i, q,  # running state: (BLOCK_M, BLOCK_D) f32, (BLOCK_M,) f32 x2; q (BLOCK_M, BLOCK_D)
    k_ptrs, v_ptrs, stride_kn, stride_vn,  # pointers to keys/values 0..BLOCK_N-1, (BLOCK_N, BLOCK_D)
    offs_m, in_d, lo, hi, N_K, diag, qk_scale, softcap_scale, window,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    PAD_D: tl.constexpr, MASKED: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Fold key blocks [lo, hi) into the online softmax of the query tile."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        if MASKED:
            in_k = offs_n[:, None] < N_K
            if PAD_D:
                in_k = in_k & in_d
            k = tl.load(k_ptrs + start_n * stride_kn, mask=in_k, other=0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=in_k, other=0.0)
        elif PAD_D:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=in_d, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=in_d, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn)
            v = tl.load(v_ptrs + start_n * stride_vn)
        qk = dot(q, tl.trans(k), FP32_DOT)  # (BLOCK_M, BLOCK_N) raw scores
        if SOFTCAP:  # times qk_scale = softcap * log2(e): softcap * tanh(scale * q k^T / softcap)
            qk = tanh(qk * softcap_scale)
        qk = qk * qk_scale  # scores, base 2
        if MASKED:
            qk = tl.where(visible(offs_m[:, None], offs_n[None, :], N_K, diag, window, CAUSAL, WINDOW),
                          qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead makes
        # its exp2 terms 0 rather than exp2(-inf - -inf) = NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])  # (BLOCK_M, BLOCK_N) unnormalized probabilities
        alpha = tl.math.exp2(m_i - m_sub)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["N_Q", "N_K", "split_size", "batch_heads", "window"])
def _decode_split(
    Q, K, V, PartialOut, PartialLse, Cu_seqlens_q, Cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, N_Q, N_K, split_size, batch_heads,  # split_size: keys per split, a multiple of BLOCK_N
    qk_scale,  # softmax scale * log2(e) (with SOFTCAP: softcap * log2(e))
    softcap_scale, window,  # None when their switch is off
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, SPLIT_GRID: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (num_splits, B * H); PartialOut (B * H, num_splits, Tq, D), PartialLse (B * H, num_splits, Tq)
    # (VARLEN: sequences * H, and max_seqlen_q rows per split)
    split = tl.program_id(0)
    num_splits = tl.num_programs(0)
    off_hb = tl.program_id(1)
    if SPLIT_GRID:
        off_hb = split_grid_batch_head(off_hb)
        if off_hb >= batch_heads:
            return
    off_b = (off_hb // H).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    off_h = (off_hb % H).to(tl.int64)
    off_kv = off_h
    if GROUP > 1:  # grouped-query attention: query head h reads kv head h // GROUP
        off_kv = off_h // GROUP
    slot_rows = N_Q  # workspace rows per (batch, head, split)
    if VARLEN:  # off_b is the sequence; its rows start at q_start and k_start (stride_qb etc. are 0)
        q_start, N_Q = sequence_span(Cu_seqlens_q, off_b)
        k_start, N_K = sequence_span(Cu_seqlens_k, off_b)
        if N_Q == 0:
            return
        Q += q_start * stride_qm
        K += k_start * stride_kn
        V += k_start * stride_vn
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    in_q = offs_m < N_Q
    in_d = offs_d[None, :] < HEAD_DIM  # BLOCK_D pads the head dim to a power of two
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    if HEAD_DIM < BLOCK_D:
        q = tl.load(q_ptrs, mask=in_q[:, None] & in_d, other=0.0)
    else:
        q = tl.load(q_ptrs, mask=in_q[:, None], other=0.0)  # (BLOCK_M, BLOCK_D); padding rows are 0
    k_ptrs = K + off_b * stride_kb + off_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running unnormalized output

    # This split's keys [lo, hi). Those below seen_by_all are visible to every query row and
    # lie inside Tk: whole blocks of them need no mask. The rest, at the end of the cache, do.
    diag = N_K - N_Q
    if WINDOW:  # the splits start at the first key block any row's window reaches
        lo = tl.maximum(diag - window + 1, 0) // BLOCK_N * BLOCK_N + split * split_size
    else:
        lo = split * split_size
    hi = tl.minimum(lo + split_size, N_K)
    if CAUSAL:
        seen_by_all = diag + 1
    else:
        seen_by_all = N_K
    if WINDOW:
        # Blocks at the window's far edge (masked), those every row sees, those at the end (masked).
        # The last row's window starts at N_Q - 1 + diag - window + 1.
        _, full_lo, full_hi, _ = block_ranges(lo, N_Q + diag - window, tl.minimum(seen_by_all, hi), hi, BLOCK_N)
        acc, l_i, m_i = _fold_key_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                         offs_m, in_d, lo, full_lo, N_K, diag, qk_scale, softcap_scale, window,
                                         BLOCK_N, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM < BLOCK_D, True, FP32_DOT)
        acc, l_i, m_i = _fold_key_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                         offs_m, in_d, full_lo, full_hi, N_K, diag, qk_scale, softcap_scale, window,
                                         BLOCK_N, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM < BLOCK_D, False, FP32_DOT)
        acc, l_i, m_i = _fold_key_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                         offs_m, in_d, full_hi, hi, N_K, diag, qk_scale, softcap_scale, window,
                                         BLOCK_N, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM < BLOCK_D, True, FP32_DOT)
    else:
        full_end = tl.minimum(tl.maximum(seen_by_all // BLOCK_N * BLOCK_N, lo), hi)
        acc, l_i, m_i = _fold_key_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                         offs_m, in_d, lo, full_end, N_K, diag, qk_scale, softcap_scale, window,
                                         BLOCK_N, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM < BLOCK_D, False, FP32_DOT)
        acc, l_i, m_i = _fold_key_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                         offs_m, in_d, full_end, hi, N_K, diag, qk_scale, softcap_scale, window,
                                         BLOCK_N, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM < BLOCK_D, True, FP32_DOT)

    # A row that saw no key here has l = 0 and m = -inf: it writes o = 0 (not 0 / 0) and
    # lse = -inf, which gives it weight 0 in the combine.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = m_i + tl.math.log2(l_safe)
    rows = (off_hb.to(tl.int64) * num_splits + split) * slot_rows + offs_m  # (BLOCK_M,) rows of the workspace
    if HEAD_DIM < BLOCK_D:
        tl.store(PartialOut + rows[:, None] * HEAD_DIM + offs_d[None, :], out, mask=in_q[:, None] & in_d)
    else:
        tl.store(PartialOut + rows[:, None] * HEAD_DIM + offs_d[None, :], out, mask=in_q[:, None])
    tl.store(PartialLse + rows, lse, mask=in_q)


@triton.jit(do_not_specialize=["N_Q", "num_splits"])
def _decode_combine(
    PartialOut, PartialLse, Out, Cu_seqlens_q,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # grid: (B * H,) (axis 0 holds 2**31 - 1 programs)
    off_hb = tl.program_id(0).to(tl.int64)
    off_b = off_hb // H
    off_h = off_hb % H
    slot_rows = N_Q
    if VARLEN:
        q_start, N_Q = sequence_span(Cu_seqlens_q, off_b)
        Out += q_start * stride_om
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_q = offs_m < N_Q
    in_qd = in_q[:, None] & (offs_d[None, :] < HEAD_DIM)
    first_row = off_hb * num_splits * slot_rows  # this head's split 0, query row 0

    # Pass 1: each row's largest lse over the splits. Padding rows read 0 and stay finite.
    lse_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for split in range(num_splits):
        lse = tl.load(PartialLse + first_row + split * slot_rows + offs_m, mask=in_q, other=0.0)
        lse_max = tl.maximum(lse_max, lse)
    if VARLEN:  # a sequence without keys: every split's lse is -inf, and its rows are 0
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    # Pass 2: mix the splits' outputs, weighted by their share of the softmax sum.
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for split in range(num_splits):
        rows = first_row + split * slot_rows + offs_m
        weight = tl.math.exp2(tl.load(PartialLse + rows, mask=in_q, other=0.0) - lse_max)  # (BLOCK_M,)
        o = tl.load(PartialOut + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=in_qd, other=0.0)
        acc += weight[:, None] * o
        total += weight
    if VARLEN:
        total = tl.where(total == 0.0, 1.0, total)
    out = acc / total[:, None]
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=in_qd)


# ---------------------------------------------------------------------------------------
# Launch configuration and split policy
# ---------------------------------------------------------------------------------------


@functools.cache
def decode_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """The split kernel's launch config for this head dim and dtype: one for every Tq <= 16
    and every Tk, from the "decode" rows of the table in kernels/triton_configs.py (keyed
    by the head dim padded to a power of two)."""
    if INTERPRET:  # small key blocks, so that short test caches span several splits
        return triton_configs.INTERPRETER_CONFIGS["decode"]
    arch = triton_configs.arch_of(torch.cuda.get_device_capability(device))
    return triton_configs.table_config(
        arch, "decode", triton_configs.DTYPE_CLASSES[dtype], None, None, padded_head_dim(head_dim)
    )


# Programs the interpreter aims for (stands in for "2 per SM"): a few splits per head.
_INTERPRET_PROGRAMS = 8


@functools.cache
def _programs_to_fill(device: torch.device) -> int:
    """How many programs keep `device` busy: two per SM on CUDA (queried once per device)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRET_PROGRAMS


def split_plan(kv_len: int, batch_heads: int, block_n: int, programs: int) -> tuple[int, int]:
    """(num_splits, split_size) for a cache of kv_len keys (kv_len >= 1).

    Aims for num_splits * batch_heads = `programs`, with no split shorter than one key
    block. split_size is a whole number of blocks, which can round the count down (to no
    less than half the aim), and no split is empty.
    """
    num_blocks = triton.cdiv(kv_len, block_n)
    num_splits = min(max(triton.cdiv(programs, max(batch_heads, 1)), 1), num_blocks)  # (0 heads: nothing to run)
    split_size = triton.cdiv(num_blocks, num_splits) * block_n
    return triton.cdiv(kv_len, split_size), split_size


def keys_to_split(q_len: int, kv_len: int, window: int | None, block_n: int) -> int:
    """How many keys the splits must cover: the whole cache, or with a window only the keys some
    query's window reaches (they start at a key block boundary: up to block_n - 1 more). At least 1."""
    if window is not None:
        kv_len = min(kv_len, q_len + window - 1 + block_n - 1)
    return max(kv_len, 1)


class DecodeLaunch(NamedTuple):
    """The decode kernels' launch for one input signature, minus the tensors and the options' values."""

    num_splits: int
    split_size: int  # keys per split, a multiple of the config's BLOCK_N
    grid: tuple[int, ...]  # the split kernel's: (num_splits, batch x heads on axes 1 [and 2])
    meta: dict  # the split kernel's constexprs, num_warps, num_stages, batch_heads (with SPLIT_GRID)
    combine_meta: dict  # the combine kernel's


def decode_launch(
    batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int, dtype: torch.dtype,
    device: torch.device, variant: tuple, window: int | None, packed: bool,
    config: LaunchConfig | None = None, split_size: int | None = None,
) -> DecodeLaunch:
    """How to launch the decode kernels: q_len and kv_len are the lengths, or for packed
    sequences their bounds (max_seqlen_q <= MAX_DECODE_Q_LEN); variant is Options.variant.
    config and split_size replace the table's config and the split policy (tests)."""
    if q_len > MAX_DECODE_Q_LEN:
        raise ValueError(f"decode_attention takes q_len <= {MAX_DECODE_Q_LEN}, got {q_len}; use the full forward")
    config = config or decode_config(head_dim, dtype, device)
    keys = keys_to_split(q_len, kv_len, window, config.block_n)
    if split_size is None:
        num_splits, split_size = split_plan(keys, batch * heads, config.block_n, _programs_to_fill(device))
    else:
        num_splits = triton.cdiv(keys, split_size)
    batch_heads, split_grid = batch_head_grid(batch * heads)
    causal, windowed, softcap, dropout = variant
    if dropout:
        raise ValueError("the decode kernels do no dropout (a training feature): use the full forward")
    block_d = padded_head_dim(head_dim)
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=heads // max(kv_heads, 1), CAUSAL=causal,
                WINDOW=windowed, SOFTCAP=softcap, VARLEN=packed, SPLIT_GRID=split_grid, FP32_DOT=fp32_dot(dtype),
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
                num_stages=config.num_stages, batch_heads=batch * heads if split_grid else None)
    combine_meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, VARLEN=packed, BLOCK_M=config.block_m, num_warps=4)
    return DecodeLaunch(num_splits, split_size, (num_splits, *batch_heads), meta, combine_meta)


def decode_split_plan(q: torch.Tensor, k: torch.Tensor, window: int | None = None) -> tuple[int, int]:
    """(num_splits, split_size) that decode_attention(q, k, ..., window=window) uses."""
    B, H, Tq, D = q.shape
    variant = (True, window is not None, False, False)
    launch = decode_launch(B, H, k.shape[1], Tq, k.shape[2], D, q.dtype, q.device, variant, window, False)
    return launch.num_splits, launch.split_size


# ---------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------


def decode(q, k, v, options: Options, packing: Packing | None, launch: DecodeLaunch) -> torch.Tensor:
    """Launch both kernels; returns out shaped like q (contiguous), in q's dtype."""
    packed = packing is not None
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch_heads = (packing.sequences if packed else q.shape[0]) * q.shape[1]
    if out.numel() == 0 or batch_heads == 0:
        return out
    q_len, kv_len = lengths(q, k, packing)
    cu_seqlens = (None, None) if packing is None else (packing.cu_seqlens_q, packing.cu_seqlens_k)
    partial_out = torch.empty((batch_heads, launch.num_splits, q_len, q.shape[-1]), dtype=torch.float32,
                              device=q.device)
    partial_lse = torch.empty((batch_heads, launch.num_splits, q_len), dtype=torch.float32, device=q.device)
    values = arguments(options)
    _decode_split[launch.grid](
        q, k, v, partial_out, partial_lse, *cu_seqlens, *strides(q, packed), *strides(k, packed), *strides(v, packed),
        q.shape[1], q_len, kv_len, launch.split_size,
        qk_scale=values["qk_scale"], softcap_scale=values["softcap_scale"], window=values["window"], **launch.meta,
    )
    _decode_combine[(batch_heads,)](
        partial_out, partial_lse, out, cu_seqlens[0], *strides(out, packed), q.shape[1], q_len, launch.num_splits,
        **launch.combine_meta,
    )
    return out


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
    window: int | None = None, softcap: float | None = None, split_size: int | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T [+ masks]) v for short queries, split over the keys.

    q (B, Hq, Tq, D) with Tq <= MAX_DECODE_Q_LEN; k, v (B, Hkv, Tk, D) with Tk >= 1; any
    strides. Forward only: the caller has validated the inputs (kernels.attention routes
    here by itself; this entry is for tests). split_size forces the keys per split.
    Returns (B, Hq, Tq, D) in q's dtype.
    """
    options = Options(causal, scale, window, softcap)
    B, H, Tq, D = q.shape
    launch = decode_launch(B, H, k.shape[1], Tq, k.shape[2], D, q.dtype, q.device, options.variant, window, False,
                           split_size=split_size)
    return decode(q, k, v, options, None, launch)
