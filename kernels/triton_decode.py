"""Attention for a few new queries against a long KV cache: split-KV ("flash-decoding") in Triton.

    out = decode_attention(q, k, v, causal=True, scale=0.125)   # q (B, H, Tq <= 16, D), k/v (B, H, Tk, D)

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

Compiled once per generation. Triton specializes a kernel on its integer arguments (equal
to 1? divisible by 16?), which would compile a new variant whenever Tk crossed a multiple
of 16. Tq, Tk, the split size and count are therefore marked do_not_specialize, and the
block sizes come from a fixed table per (head dim, dtype): every Tq <= 16 and every Tk
share one binary per kernel.

Without CUDA the kernels run through Triton's CPU interpreter (kernels/triton_runtime.py):
exact and slow, with small blocks so that tests exercise several splits.
"""

import functools  # noqa: I001 (kernels.triton_runtime must be imported before triton: see there)
import math

import torch

from .triton_runtime import INTERPRET, dot, fp32_dot  # first: without CUDA, switches Triton to its interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import triton_configs  # noqa: E402
from .triton_configs import LaunchConfig  # noqa: E402

MAX_DECODE_Q_LEN = 16  # every query row of a call fits in one 16-row tile (the table's BLOCK_M)


@triton.jit
def _fold_key_blocks(
    acc, l_i, m_i, q,  # running state: (BLOCK_M, HEAD_DIM) f32, (BLOCK_M,) f32 x2; q (BLOCK_M, HEAD_DIM)
    k_ptrs, v_ptrs, stride_kn, stride_vn,  # pointers to keys/values 0..BLOCK_N-1, (BLOCK_N, HEAD_DIM)
    offs_m, lo, hi, N_K, diag, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Fold key blocks [lo, hi) into the online softmax of the query tile."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        if MASKED:
            in_k = offs_n[:, None] < N_K
            k = tl.load(k_ptrs + start_n * stride_kn, mask=in_k, other=0.0)  # (BLOCK_N, HEAD_DIM)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=in_k, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn)
            v = tl.load(v_ptrs + start_n * stride_vn)
        qk = dot(q, tl.trans(k), FP32_DOT) * qk_scale  # (BLOCK_M, BLOCK_N) scores, base 2
        if MASKED:
            visible = offs_n[None, :] < N_K
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(visible, qk, float("-inf"))
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


@triton.jit(do_not_specialize=["N_Q", "N_K", "split_size"])
def _decode_split(
    Q, K, V, PartialOut, PartialLse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, N_Q, N_K, split_size,  # split_size: keys per split, a multiple of BLOCK_N
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (num_splits, B * H); PartialOut (B * H, num_splits, Tq, D), PartialLse (B * H, num_splits, Tq)
    split = tl.program_id(0)
    num_splits = tl.num_programs(0)
    off_hb = tl.program_id(1)
    off_b = (off_hb // H).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    off_h = (off_hb % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    in_q = offs_m < N_Q
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=in_q[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM); padding rows are 0
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running unnormalized output

    # This split's keys [lo, hi). Those below seen_by_all are visible to every query row and
    # lie inside Tk: whole blocks of them need no mask. The rest, at the end of the cache, do.
    diag = N_K - N_Q
    lo = split * split_size
    hi = tl.minimum(lo + split_size, N_K)
    if CAUSAL:
        seen_by_all = diag + 1
    else:
        seen_by_all = N_K
    full_end = tl.minimum(tl.maximum(seen_by_all // BLOCK_N * BLOCK_N, lo), hi)
    acc, l_i, m_i = _fold_key_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                     offs_m, lo, full_end, N_K, diag, qk_scale,
                                     BLOCK_N, CAUSAL, False, FP32_DOT)
    acc, l_i, m_i = _fold_key_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                     offs_m, full_end, hi, N_K, diag, qk_scale,
                                     BLOCK_N, CAUSAL, True, FP32_DOT)

    # A row that saw no key here has l = 0 and m = -inf: it writes o = 0 (not 0 / 0) and
    # lse = -inf, which gives it weight 0 in the combine.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = m_i + tl.math.log2(l_safe)
    rows = (off_hb.to(tl.int64) * num_splits + split) * N_Q + offs_m  # (BLOCK_M,) rows of the workspace
    tl.store(PartialOut + rows[:, None] * HEAD_DIM + offs_d[None, :], out, mask=in_q[:, None])
    tl.store(PartialLse + rows, lse, mask=in_q)


@triton.jit(do_not_specialize=["N_Q", "num_splits"])
def _decode_combine(
    PartialOut, PartialLse, Out,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # grid: (B * H,)
    off_hb = tl.program_id(0)
    off_b = (off_hb // H).to(tl.int64)
    off_h = (off_hb % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < N_Q
    first_row = off_hb.to(tl.int64) * num_splits * N_Q  # this head's split 0, query row 0

    # Pass 1: each row's largest lse over the splits. Padding rows read 0 and stay finite.
    lse_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for split in range(num_splits):
        lse = tl.load(PartialLse + first_row + split * N_Q + offs_m, mask=in_q, other=0.0)
        lse_max = tl.maximum(lse_max, lse)
    # Pass 2: mix the splits' outputs, weighted by their share of the softmax sum.
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for split in range(num_splits):
        rows = first_row + split * N_Q + offs_m
        weight = tl.math.exp2(tl.load(PartialLse + rows, mask=in_q, other=0.0) - lse_max)  # (BLOCK_M,)
        o = tl.load(PartialOut + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=in_q[:, None], other=0.0)
        acc += weight[:, None] * o
        total += weight
    out = acc / total[:, None]
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=in_q[:, None])


# ---------------------------------------------------------------------------------------
# Launch configuration and split policy
# ---------------------------------------------------------------------------------------


@functools.cache
def decode_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """The split kernel's launch config for this head dim and dtype: one for every Tq <= 16
    and every Tk, from the "decode" rows of the table in kernels/triton_configs.py."""
    if INTERPRET:  # small key blocks, so that short test caches span several splits
        return triton_configs.INTERPRETER_CONFIGS["decode"]
    arch = triton_configs.arch_of(torch.cuda.get_device_capability(device))
    return triton_configs.table_config(arch, "decode", triton_configs.DTYPE_CLASSES[dtype], None, None, head_dim)


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


def decode_split_plan(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int]:
    """(num_splits, split_size) that decode_attention(q, k, ...) uses."""
    B, H, _, D = q.shape
    config = decode_config(D, q.dtype, q.device)
    return split_plan(k.shape[2], B * H, config.block_n, _programs_to_fill(q.device))


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T [+ causal mask]) v for short queries, split over the keys.

    q (B, H, Tq, D) with Tq <= MAX_DECODE_Q_LEN; k, v (B, H, Tk, D) with Tk >= 1; any
    strides. Forward only: the caller has validated the inputs (shapes, dtype, head dim
    in (16, 32, 64, 128, 256), and Tq <= Tk when causal). Returns (B, H, Tq, D) in q's dtype.
    """
    num_splits, split_size = decode_split_plan(q, k)
    return _decode(q, k, v, causal, scale, num_splits, split_size)


def _decode(q, k, v, causal: bool, scale: float, num_splits: int, split_size: int) -> torch.Tensor:
    """Launch both kernels with a given split; split_size * num_splits must cover Tk."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if Tq > MAX_DECODE_Q_LEN:
        raise ValueError(f"decode_attention takes q_len <= {MAX_DECODE_Q_LEN}, got {Tq}; use the full forward")
    out = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    config = decode_config(D, q.dtype, q.device)
    partial_out = torch.empty((B * H, num_splits, Tq, D), dtype=torch.float32, device=q.device)
    partial_lse = torch.empty((B * H, num_splits, Tq), dtype=torch.float32, device=q.device)
    _decode_split[(num_splits, B * H)](
        q, k, v, partial_out, partial_lse, *q.stride(), *k.stride(), *v.stride(),
        H, Tq, Tk, split_size, scale * math.log2(math.e),
        HEAD_DIM=D, CAUSAL=causal, FP32_DOT=fp32_dot(q.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    _decode_combine[(B * H,)](
        partial_out, partial_lse, out, *out.stride(), H, Tq, num_splits,
        HEAD_DIM=D, BLOCK_M=config.block_m, num_warps=4,
    )
    return out
