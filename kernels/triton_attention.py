"""Fused causal attention in Triton, FlashAttention-2 style, forward and backward.

    out = attention(q, k, v, causal=True, scale=0.125)   # q (B, H, Tq, D), k/v (B, H, Tk, D)

The (Tq, Tk) score matrix never exists in memory. Each program owns a block of rows
and streams the other side through on-chip memory in blocks:

  forward   one program per (query block, batch*head). Walk the key blocks with an
            online softmax (running row max m and row sum l, float32), so the output
            is normalized once at the end. Save the per-row log-sum-exp (LSE, in base
            2) so the backward can rebuild the probabilities without storing them.
  backward  delta = rowsum(dO * O)            (_attn_bwd_preprocess)
            dK, dV per key block, looping over query blocks     (_attn_bwd_dkdv)
            dQ per query block, looping over key blocks         (_attn_bwd_dq)
            Every gradient element is written by exactly one program, in a fixed
            order: no atomics, so gradients are bit-for-bit deterministic.

Causal masking is bottom-right aligned (query i sees key j iff j <= i + Tk - Tq, as in
kernels/reference.py). Key/query blocks wholly above the diagonal are never visited,
blocks wholly below it run without any mask, and only blocks crossing the diagonal
or a sequence end pay for masking.

Scores are scaled into base 2 (scale * log2(e)) so the kernels use exp2, which maps to
one hardware instruction.

Launching: block sizes, warps and stages come from the committed table in
kernels/triton_configs.py (no autotuning unless GPT_KERNELS_AUTOTUNE=1). Everything a
launch needs besides the tensors (configs, grids, constexprs) is worked out once per input
signature (a _Plan) and cached, so an eager call costs a dictionary lookup and the launches.
The kernels do not specialize on the sequence lengths, so a growing KV cache never recompiles.

Eager calls go through a torch.autograd.Function. Under torch.compile the same launchers
run inside torch.library custom ops (gpt_kernels::flash_attn_fwd, gpt_kernels::flash_attn_bwd)
with fake implementations and autograd, which torch.compile traces without graph breaks.

Without CUDA the kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, set up
by kernels/triton_runtime.py), which accepts CPU tensors: correct, and very slow, for tests.
"""

import functools  # noqa: I001 (kernels.triton_runtime must be imported before triton: see there)
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

import torch

from . import triton_runtime  # first: without CUDA it switches Triton to its interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import triton_configs  # noqa: E402
from .checks import check_attention_inputs  # noqa: E402
from .triton_configs import LaunchConfig  # noqa: E402
from .triton_decode import MAX_DECODE_Q_LEN, decode_attention  # noqa: E402
from .triton_runtime import INTERPRET, dot, fp32_dot  # noqa: E402

# ---------------------------------------------------------------------------------------
# Small helpers shared by all kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _tile(base, rows, stride_row, cols, stride_col):
    """Pointers to the (len(rows), len(cols)) tile at base[rows, cols] of a strided matrix.

    The loops call this afresh for every block instead of advancing a tile of pointers made
    before the loop: such a tile (64-bit each) stays live in registers across the loop, and
    at head dim 64 and up that made the kernels spill (kernels/compile_check.py measures it).
    """
    return base + rows[:, None] * stride_row + cols[None, :] * stride_col


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    """Load a tile; off-edge elements (only checked when MASKED) read as 0."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _visible(q_idx, k_idx, N_K, diag, CAUSAL: tl.constexpr):
    """True where query q_idx may attend to key k_idx (any broadcastable shapes).

    Keys past the end are invisible; with CAUSAL, key j is visible to query i iff
    j <= i + diag, where diag = Tk - Tq aligns the mask bottom-right.
    """
    ok = k_idx < N_K
    if CAUSAL:
        ok = ok & (k_idx <= q_idx + diag)
    return ok


@triton.jit
def _key_ranges(start_m, N_Q, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key range for query block start_m, split as [0, full_end) unmasked, [full_end, end) masked.

    Used by the row-major kernels (forward and dQ). Key blocks before full_end are
    visible to every row of the query block and lie inside Tk, so they need no mask.
    """
    if CAUSAL:
        diag = N_K - N_Q
        # The block's first row, start_m * BLOCK_M, sees keys <= start_m * BLOCK_M + diag and
        # so do all later rows. That bound is < Tk, so full blocks below it stay inside Tk.
        full_end = (start_m * BLOCK_M + diag + 1) // BLOCK_N * BLOCK_N
        # The block's last row sees keys < (start_m + 1) * BLOCK_M + diag; nothing after.
        end = tl.minimum((start_m + 1) * BLOCK_M + diag, N_K)
    else:
        full_end = N_K // BLOCK_N * BLOCK_N
        end = N_K
    return full_end, end


@triton.jit
def _query_ranges(start_n, N_Q, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Query range for key block start_n, split as masked [lo, full_lo), unmasked
    [full_lo, full_hi), masked [full_hi, end).

    Used by the key-major dK/dV kernel: the first masked range crosses the causal
    diagonal, the second holds the ragged last query block.
    """
    end = tl.cdiv(N_Q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        diag = N_K - N_Q
        # Query i sees key j iff i >= j - diag. Rows before the one that sees the block's
        # first key contribute nothing; rows from the one that sees its last key see all.
        lo = tl.maximum(start_n * BLOCK_N - diag, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n * BLOCK_N + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        full_lo = tl.minimum(full_lo, end)
    else:
        lo = 0
        full_lo = 0
    # Unmasked blocks must also lie inside Tq; and if the key block runs past Tk, every
    # query block needs the key mask, so the unmasked range is empty.
    full_hi = tl.maximum(N_Q // BLOCK_M * BLOCK_M, full_lo)
    full_hi = tl.where((start_n + 1) * BLOCK_N <= N_K, full_hi, full_lo)
    return lo, full_lo, full_hi, end


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  # running state: (BLOCK_M, HEAD_DIM) f32, (BLOCK_M,) f32 x2; q (BLOCK_M, HEAD_DIM)
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,  # this (batch, head)'s keys and values
    offs_m, offs_d, lo, hi, N_K, diag, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Fold key blocks [lo, hi) into the online softmax of one query block."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        in_k = offs_n[:, None] < N_K
        k = _load(_tile(K, offs_n, stride_kn, offs_d, stride_kd), in_k, MASKED)  # (BLOCK_N, HEAD_DIM)
        v = _load(_tile(V, offs_n, stride_vn, offs_d, stride_vd), in_k, MASKED)  # (BLOCK_N, HEAD_DIM)
        qk = dot(q, tl.trans(k), FP32_DOT)  # (BLOCK_M, BLOCK_N) raw scores
        if MASKED:
            qk = tl.where(_visible(offs_m[:, None], offs_n[None, :], N_K, diag, CAUSAL), qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        # m_ij is finite: every row sees at least key 0, and the first block visited
        # holds it, so exp2 never sees (-inf) - (-inf).
        p = tl.math.exp2(qk)  # (BLOCK_M, BLOCK_N) unnormalized probabilities
        alpha = tl.math.exp2(m_i - m_ij)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["N_Q", "N_K"])  # lengths change every decoding step: never recompile
def _attn_fwd(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, N_K,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Tq, BLOCK_M), B * H)
    start_m = tl.program_id(0)
    off_hb = tl.program_id(1)
    # Point every base pointer at this program's (batch, head): below, only rows and columns.
    off_b = (off_hb // H).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    off_h = (off_hb % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    Out += off_b * stride_ob + off_h * stride_oh
    Lse += off_hb.to(tl.int64) * N_Q

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m[:, None] < N_Q
    # Rows past Tq load zeros and compute harmless values that are never stored.
    q = tl.load(_tile(Q, offs_m, stride_qm, offs_d, stride_qd), mask=in_q, other=0.0)  # (BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running unnormalized output

    full_end, end = _key_ranges(start_m, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    diag = N_K - N_Q
    # Phase 1: key blocks every row sees in full, no mask. Phase 2: the blocks crossing
    # the causal diagonal or the end of the keys. Blocks after `end` are skipped.
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_m, offs_d, 0, full_end, N_K, diag, qk_scale,
                                    BLOCK_N, CAUSAL, False, FP32_DOT)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_m, offs_d, full_end, end, N_K, diag, qk_scale,
                                    BLOCK_N, CAUSAL, True, FP32_DOT)

    acc = acc / l_i[:, None]
    # Base-2 LSE, kept in the units the backward uses: converting to natural log and back
    # would add two roundings, and at large logits each costs accuracy in the gradients.
    lse = m_i + tl.math.log2(l_i)
    tl.store(_tile(Out, offs_m, stride_om, offs_d, stride_od), acc.to(Out.dtype.element_ty), mask=in_q)
    tl.store(Lse + offs_m, lse, mask=offs_m < N_Q)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------
#
# With P = softmax(scale * Q K^T) and dO the output gradient:
#   dV = P^T dO         dP = dO V^T         dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij
#   dQ = scale * dS K   dK = scale * dS^T Q
# and delta_i = rowsum(dO * O)_i, cheaper than summing over all keys. P is rebuilt from
# the saved base-2 LSE: P = exp2(scores * scale * log2(e) - LSE2).
#
# Precision note: LSE2 is a float32 near the largest logit L, so it carries an absolute
# rounding error of about eps * |L|, and every rebuilt probability a relative error of
# that size. For ordinary logits (|L| ~ 10) this is invisible; at |L| ~ 1e4 it is ~1e-3,
# the usual limit of FlashAttention-style backward passes.


@triton.jit(do_not_specialize=["N_Q"])
def _attn_bwd_preprocess(
    O, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # grid: (cdiv(Tq, BLOCK_M), B * H)
    start_m = tl.program_id(0)
    off_hb = tl.program_id(1)
    off_b = (off_hb // H).to(tl.int64)
    off_h = (off_hb % H).to(tl.int64)
    O += off_b * stride_ob + off_h * stride_oh
    DO += off_b * stride_dob + off_h * stride_doh
    Delta += off_hb.to(tl.int64) * N_Q

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m[:, None] < N_Q
    o = tl.load(_tile(O, offs_m, stride_om, offs_d, stride_od), mask=in_q, other=0.0)
    do = tl.load(_tile(DO, offs_m, stride_dom, offs_d, stride_dod), mask=in_q, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BLOCK_M,)
    tl.store(Delta + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,  # (BLOCK_N, HEAD_DIM): f32 accumulators, and this program's keys/values
    Q, DO, stride_qm, stride_qd, stride_dom, stride_dod,  # this (batch, head)'s queries and dO
    Lse, Delta,  # this (batch, head)'s rows of the (B, H, Tq) float32 base-2 LSE and delta
    offs_n, offs_d, lo, hi, N_Q, N_K, diag, qk_scale,
    BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query blocks [lo, hi).

    Works on transposed tiles (keys as rows) so that P^T and dS^T come out directly in
    the shape the dK/dV matmuls need, with no transpose of computed values.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        in_q = offs_m < N_Q
        q = _load(_tile(Q, offs_m, stride_qm, offs_d, stride_qd), in_q[:, None], MASKED)  # (BLOCK_M, HEAD_DIM)
        do = _load(_tile(DO, offs_m, stride_dom, offs_d, stride_dod), in_q[:, None], MASKED)  # (BLOCK_M, HEAD_DIM)
        lse2 = _load(Lse + offs_m, in_q, MASKED)  # (BLOCK_M,)
        delta = _load(Delta + offs_m, in_q, MASKED)  # (BLOCK_M,)

        qkT = dot(k, tl.trans(q), FP32_DOT)  # (BLOCK_N, BLOCK_M) raw scores, transposed
        logits = qkT * qk_scale - lse2[None, :]
        if MASKED:
            # Also drop query rows past Tq: here they would be summed into dK and dV.
            ok = _visible(offs_m[None, :], offs_n[:, None], N_K, diag, CAUSAL) & in_q[None, :]
            logits = tl.where(ok, logits, float("-inf"))
        pT = tl.math.exp2(logits)  # P^T, already normalized
        dv += dot(pT.to(do.dtype), do, FP32_DOT)  # (BLOCK_N, HEAD_DIM)
        dpT = dot(v, tl.trans(do), FP32_DOT)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk += dot(dsT.to(q.dtype), q, FP32_DOT)  # (BLOCK_N, HEAD_DIM), scaled by the caller
    return dk, dv


@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, Lse, Delta,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N_Q, N_K, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Tk, BLOCK_N), B * H); BLOCK_N keys per program, BLOCK_M queries per step
    start_n = tl.program_id(0)
    off_hb = tl.program_id(1)
    off_b = (off_hb // H).to(tl.int64)
    off_h = (off_hb % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dvb + off_h * stride_dvh
    Lse += off_hb.to(tl.int64) * N_Q  # this (batch, head)'s rows of the (B, H, Tq) float32 LSE and delta
    Delta += off_hb.to(tl.int64) * N_Q

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_k = offs_n[:, None] < N_K
    k = tl.load(_tile(K, offs_n, stride_kn, offs_d, stride_kd), mask=in_k, other=0.0)  # (BLOCK_N, HEAD_DIM)
    v = tl.load(_tile(V, offs_n, stride_vn, offs_d, stride_vd), mask=in_k, other=0.0)  # (BLOCK_N, HEAD_DIM)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    diag = N_K - N_Q
    lo, full_lo, full_hi, end = _query_ranges(start_n, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    # Query blocks before `lo` cannot see any of these keys and are skipped.
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, stride_qm, stride_qd, stride_dom, stride_dod,
                                  Lse, Delta, offs_n, offs_d, lo, full_lo, N_Q, N_K, diag, qk_scale,
                                  BLOCK_M, CAUSAL, True, FP32_DOT)  # crossing the diagonal
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, stride_qm, stride_qd, stride_dom, stride_dod,
                                  Lse, Delta, offs_n, offs_d, full_lo, full_hi, N_Q, N_K, diag, qk_scale,
                                  BLOCK_M, CAUSAL, False, FP32_DOT)  # fully visible
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, stride_qm, stride_qd, stride_dom, stride_dod,
                                  Lse, Delta, offs_n, offs_d, full_hi, end, N_Q, N_K, diag, qk_scale,
                                  BLOCK_M, CAUSAL, True, FP32_DOT)  # ragged end of Tq or Tk

    dk *= sm_scale
    tl.store(_tile(DK, offs_n, stride_dkn, offs_d, stride_dkd), dk.to(DK.dtype.element_ty), mask=in_k)
    tl.store(_tile(DV, offs_n, stride_dvn, offs_d, stride_dvd), dv.to(DV.dtype.element_ty), mask=in_k)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,  # dq (BLOCK_M, HEAD_DIM) f32; q, do (BLOCK_M, HEAD_DIM); lse2, delta (BLOCK_M,)
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,  # this (batch, head)'s keys and values
    offs_m, offs_d, lo, hi, N_K, diag, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        in_k = offs_n[:, None] < N_K
        k = _load(_tile(K, offs_n, stride_kn, offs_d, stride_kd), in_k, MASKED)  # (BLOCK_N, HEAD_DIM)
        v = _load(_tile(V, offs_n, stride_vn, offs_d, stride_vd), in_k, MASKED)  # (BLOCK_N, HEAD_DIM)
        qk = dot(q, tl.trans(k), FP32_DOT)  # (BLOCK_M, BLOCK_N)
        logits = qk * qk_scale - lse2[:, None]
        if MASKED:
            logits = tl.where(_visible(offs_m[:, None], offs_n[None, :], N_K, diag, CAUSAL), logits, float("-inf"))
        p = tl.math.exp2(logits)  # (BLOCK_M, BLOCK_N), already normalized
        dp = dot(do, tl.trans(v), FP32_DOT)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, FP32_DOT)  # (BLOCK_M, HEAD_DIM), scaled by the caller
    return dq


@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _attn_bwd_dq(
    Q, K, V, DO, DQ, Lse, Delta,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_K, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Tq, BLOCK_M), B * H)
    start_m = tl.program_id(0)
    off_hb = tl.program_id(1)
    off_b = (off_hb // H).to(tl.int64)
    off_h = (off_hb % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DQ += off_b * stride_dqb + off_h * stride_dqh
    Lse += off_hb.to(tl.int64) * N_Q
    Delta += off_hb.to(tl.int64) * N_Q

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    # Rows past Tq load zeros (LSE and delta too) and produce finite values never stored.
    in_q = offs_m < N_Q
    q = tl.load(_tile(Q, offs_m, stride_qm, offs_d, stride_qd), mask=in_q[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    do = tl.load(_tile(DO, offs_m, stride_dom, offs_d, stride_dod), mask=in_q[:, None], other=0.0)
    lse2 = tl.load(Lse + offs_m, mask=in_q, other=0.0)  # (BLOCK_M,)
    delta = tl.load(Delta + offs_m, mask=in_q, other=0.0)  # (BLOCK_M,)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, end = _key_ranges(start_m, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    diag = N_K - N_Q
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                            offs_m, offs_d, 0, full_end, N_K, diag, qk_scale,
                            BLOCK_N, CAUSAL, False, FP32_DOT)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                            offs_m, offs_d, full_end, end, N_K, diag, qk_scale,
                            BLOCK_N, CAUSAL, True, FP32_DOT)

    dq *= sm_scale
    tl.store(_tile(DQ, offs_m, stride_dqm, offs_d, stride_dqd), dq.to(DQ.dtype.element_ty), mask=in_q[:, None])


# ---------------------------------------------------------------------------------------
# Launchers: one kernel launch each, given its tensors and its _Launch
# ---------------------------------------------------------------------------------------

LOG2E = math.log2(math.e)
_PREPROCESS_BLOCK_M = 32 if INTERPRET else 128


class _Launch(NamedTuple):
    """One kernel launch minus its tensors: kernel[grid](tensors, strides, sizes, **meta)."""

    grid: tuple[int, int]
    meta: dict  # constexprs (HEAD_DIM, CAUSAL, FP32_DOT, BLOCK_M, BLOCK_N), num_warps, num_stages


def _run_fwd(q, k, v, out, lse, scale, launch: _Launch):
    _attn_fwd[launch.grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                           q.shape[1], q.shape[2], k.shape[2], scale * LOG2E, **launch.meta)


def _run_preprocess(out, do, delta, launch: _Launch):
    _attn_bwd_preprocess[launch.grid](out, do, delta, *out.stride(), *do.stride(), out.shape[1], out.shape[2],
                                      **launch.meta)


def _run_dkdv(q, k, v, do, dk, dv, lse, delta, scale, launch: _Launch):
    _attn_bwd_dkdv[launch.grid](q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(),
                                *do.stride(), *dk.stride(), *dv.stride(),
                                q.shape[1], q.shape[2], k.shape[2], scale, scale * LOG2E, **launch.meta)


def _run_dq(q, k, v, do, dq, lse, delta, scale, launch: _Launch):
    _attn_bwd_dq[launch.grid](q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(),
                              *do.stride(), *dq.stride(),
                              q.shape[1], q.shape[2], k.shape[2], scale, scale * LOG2E, **launch.meta)


def _empty(shape, dtype, device, nan_fill: bool) -> torch.Tensor:
    """torch.empty, or NaN-filled (Switches.nan_fill) so that tests catch unwritten tiles."""
    if nan_fill:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _forward(q, k, v, scale: float, plan: "_Plan"):
    """Launch the forward kernel; returns out (B, H, Tq, D) and base-2 lse (B, H, Tq) float32."""
    B, H, Tq, D = q.shape
    nan_fill = plan.switches.nan_fill
    out = _empty((B, H, Tq, D), q.dtype, q.device, nan_fill)
    lse = _empty((B, H, Tq), torch.float32, q.device, nan_fill)
    if out.numel():
        _run_fwd(q, k, v, out, lse, scale, plan.forward)
    return out, lse


def _backward(do, q, k, v, out, lse, scale: float, plan: "_Plan"):
    """Launch the three backward kernels; returns dq, dk, dv shaped like q, k, v."""
    B, H, Tq, _ = q.shape
    nan_fill = plan.switches.nan_fill
    dq = _empty(q.shape, q.dtype, q.device, nan_fill)
    dk = _empty(k.shape, k.dtype, k.device, nan_fill)
    dv = _empty(v.shape, v.dtype, v.device, nan_fill)
    if B * H == 0:
        return dq, dk, dv
    preprocess, dkdv, dq_launch = plan.backward
    delta = _empty((B, H, Tq), torch.float32, q.device, nan_fill)
    if Tq > 0:
        _run_preprocess(out, do, delta, preprocess)
    _run_dkdv(q, k, v, do, dk, dv, lse, delta, scale, dkdv)  # also when Tq == 0: it writes the zero gradients
    if Tq > 0:
        _run_dq(q, k, v, do, dq, lse, delta, scale, dq_launch)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------
# Plans: the launch parameters of one input signature, worked out once
# ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Plan:
    """How to launch the kernels for one input signature (shapes, dtype, device, causal).

    The forward's launch is worked out at the first forward, the backward's at the first
    backward (so inference never tunes a backward kernel), then kept.
    configs: explicit LaunchConfigs per kernel (tests); None takes them from the table in
    kernels/triton_configs.py, or from the tuner when switches.autotune is on.
    """

    q_shape: torch.Size  # (B, H, Tq, D)
    kv_len: int
    dtype: torch.dtype
    device: torch.device
    causal: bool
    switches: triton_runtime.Switches
    configs: dict[str, LaunchConfig] | None = None

    @property
    def length_class(self) -> str:
        """The config class of q_len: "decode" (<= 16), "short", "medium" or "long"."""
        return triton_configs.length_class(self.q_shape[2])

    @functools.cached_property
    def forward(self) -> _Launch:
        return self._launch("fwd", self._config("fwd"))

    @functools.cached_property
    def backward(self) -> tuple[_Launch, _Launch, _Launch]:
        """The preprocess, dK/dV and dQ launches."""
        B, H, Tq, D = self.q_shape
        preprocess = _Launch((triton.cdiv(Tq, _PREPROCESS_BLOCK_M), B * H),
                             {"HEAD_DIM": D, "BLOCK_M": _PREPROCESS_BLOCK_M})
        return preprocess, self._launch("dkdv", self._config("dkdv")), self._launch("dq", self._config("dq"))

    def _launch(self, kernel: str, cfg: LaunchConfig) -> _Launch:
        B, H, Tq, D = self.q_shape
        # fwd and dq: one program per query block; dkdv: one per key block.
        blocks = triton.cdiv(self.kv_len, cfg.block_n) if kernel == "dkdv" else triton.cdiv(Tq, cfg.block_m)
        meta = dict(HEAD_DIM=D, CAUSAL=self.causal, FP32_DOT=fp32_dot(self.dtype),
                    BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return _Launch((blocks, B * H), meta)

    def _table_config(self, kernel: str) -> tuple[str, LaunchConfig]:
        """The architecture and the committed config (the interpreter's own, without a GPU)."""
        if INTERPRET:
            return "interpreter", triton_configs.INTERPRETER_CONFIGS[kernel]
        arch = triton_configs.arch_of(torch.cuda.get_device_capability(self.device))
        dtype_class = triton_configs.DTYPE_CLASSES[self.dtype]
        return arch, triton_configs.table_config(arch, kernel, dtype_class, self.causal, self.length_class,
                                                 self.q_shape[3])

    def _config(self, kernel: str) -> LaunchConfig:
        if self.configs is not None:
            return self.configs[kernel]
        arch, table_config = self._table_config(kernel)
        if not self.switches.autotune:
            return table_config
        head_dim, dtype_class, length = self.q_shape[3], triton_configs.DTYPE_CLASSES[self.dtype], self.length_class
        configs = [table_config] if INTERPRET else triton_configs.candidates(
            arch, kernel, dtype_class, self.causal, length, head_dim)
        key = f"{arch}/{kernel}/{str(self.dtype).removeprefix('torch.')}/d{head_dim}/" \
              f"{'causal' if self.causal else 'full'}/{length}"
        device_name = "interpreter" if INTERPRET else torch.cuda.get_device_name(self.device)
        examples = functools.cache(self._examples)  # made only if the tuner benchmarks
        return _tuned_configs(self.switches.tuning_dir, device_name).winner(
            key, configs, lambda cfg: self._run_alone(kernel, self._launch(kernel, cfg), examples()))

    def _examples(self) -> SimpleNamespace:
        """Random inputs of this signature, the forward's outputs and gradient buffers: what the tuner times on."""
        B, H, Tq, D = self.q_shape
        e = SimpleNamespace(scale=D**-0.5, q=torch.randn(self.q_shape, dtype=self.dtype, device=self.device))
        e.k, e.v = (torch.randn(B, H, self.kv_len, D, dtype=self.dtype, device=self.device) for _ in range(2))
        e.out, e.lse = torch.empty_like(e.q), torch.empty(B, H, Tq, device=self.device)
        # (With the table's forward config: the forward's own may be what is being tuned.)
        self._run_alone("fwd", self._launch("fwd", self._table_config("fwd")[1]), e)
        e.do, e.dq, e.dk, e.dv = (torch.randn_like(t) for t in (e.q, e.q, e.k, e.v))
        e.delta = (e.out.float() * e.do.float()).sum(-1)  # what _attn_bwd_preprocess computes
        return e

    @staticmethod
    def _run_alone(kernel: str, launch: _Launch, e: SimpleNamespace) -> None:
        """One launch of `kernel` on the examples (every kernel only writes its outputs: safe to repeat)."""
        if kernel == "fwd":
            _run_fwd(e.q, e.k, e.v, e.out, e.lse, e.scale, launch)
        elif kernel == "dkdv":
            _run_dkdv(e.q, e.k, e.v, e.do, e.dk, e.dv, e.lse, e.delta, e.scale, launch)
        else:
            _run_dq(e.q, e.k, e.v, e.do, e.dq, e.lse, e.delta, e.scale, launch)


@functools.cache
def _tuned_configs(directory, device_name: str) -> triton_configs.TunedConfigs:
    return triton_configs.TunedConfigs(triton_configs.tuning_file(directory, device_name, triton.__version__))


SUPPORTED_HEAD_DIMS = triton_configs.HEAD_DIMS
SUPPORTED_DTYPES = tuple(triton_configs.DTYPE_CLASSES)
_MAX_PLANS = 4096  # decoding adds one signature per kv length
_PLANS: dict[tuple, _Plan] = {}  # a cache: each plan is a pure function of its key


def _check_supported(q: torch.Tensor, k: torch.Tensor) -> None:
    """Raise ValueError for inputs these kernels cannot take.

    Only what is special to these kernels: the shared checks (kernels/checks.py) are not repeated.
    """
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"triton attention supports head_dim in {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}; "
            "use backend='sdpa' or 'reference' for other sizes"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(f"triton attention supports dtypes {names}, got {q.dtype}")
    if q.device.type not in ("cuda", "cpu", "meta"):
        raise ValueError(f"triton attention runs on cuda (or cpu through the interpreter), got device {q.device}")
    if q.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "triton attention got CPU tensors, which only the Triton interpreter accepts: move them to cuda, "
            "or set TRITON_INTERPRET=1 before kernels.triton_attention is first imported"
        )
    if k.shape[2] == 0:
        raise ValueError("triton attention needs kv_len >= 1")
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"triton attention needs as many k/v heads as q heads, got {k.shape[1]} and {q.shape[1]}; "
            "use backend='sdpa' or 'reference' for grouped-query attention"
        )


def _plan_for(q, k, v, causal: bool) -> _Plan:
    """The plan for these inputs. The first time their signature is seen, the inputs are
    checked (the shared checks, then _check_supported); later calls with it are trusted."""
    switches = triton_runtime.SWITCHES
    try:
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, causal, switches)
    except AttributeError:  # not tensors: check_attention_inputs says so below
        key = None
    plan = _PLANS.get(key)
    if plan is None:
        check_attention_inputs(q, k, v, causal)
        _check_supported(q, k)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(q.shape, k.shape[2], q.dtype, q.device, causal, switches)
    return plan


# ---------------------------------------------------------------------------------------
# The eager path: an autograd.Function straight to the launchers
# ---------------------------------------------------------------------------------------


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, plan: _Plan):
        out, lse = _forward(q, k, v, scale, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.plan = scale, plan
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, ctx.scale, ctx.plan)
        return dq, dk, dv, None, None


# ---------------------------------------------------------------------------------------
# The traced path: torch.library custom ops, for torch.compile
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("gpt_kernels::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, Tq, D) in q's dtype, and lse (B, H, Tq) float32 for the backward.

    lse is the base-2 log-sum-exp of the scaled scores: log2(sum_j 2**(s_ij * log2(e)))
    for s = scale * q k^T (masked), i.e. the natural logsumexp times log2(e).
    """
    return _forward(q, k, v, scale, _plan_for(q, k, v, causal))


@flash_attn_fwd.register_fake
def _(q, k, v, causal, scale):
    _check_supported(q, k)  # at trace time: fail while compiling, not at the first run
    B, H, Tq, D = q.shape
    return q.new_empty((B, H, Tq, D)), q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.custom_op("gpt_kernels::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, in the inputs' dtype) from the forward's out and lse."""
    return _backward(grad_out, q, k, v, out, lse, scale, _plan_for(q, k, v, causal))


@flash_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, grad_out, grad_lse):
    # lse is an auxiliary output for the backward pass; it is not differentiable.
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


flash_attn_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float) -> torch.Tensor:
    """Fused softmax(scale * q k^T [+ causal mask]) v for q (B, H, Tq, D), k/v (B, H, Tk, D).

    Differentiable; any strides are accepted (no copies). Returns (B, H, Tq, D) in q's dtype.
    The inputs are checked the first time their signature (shapes, dtypes, devices, causal)
    is seen; kernels.attention is the usual way in, and supplies the default scale.
    """
    if torch.compiler.is_compiling():  # traced: the custom op, which torch.compile sees through
        return flash_attn_fwd(q, k, v, causal, scale)[0]
    plan = _plan_for(q, k, v, causal)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttention.apply(q, k, v, scale, plan)
    # Nothing to differentiate: skip autograd's bookkeeping.
    if q.shape[2] <= MAX_DECODE_Q_LEN:  # a few new queries against a KV cache: split the keys instead
        return decode_attention(q, k, v, causal=causal, scale=scale)
    return _forward(q, k, v, scale, plan)[0]
