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

Without CUDA the kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, set up
by kernels/triton_runtime.py), which accepts CPU tensors: correct, and very slow, for tests.

The kernels are registered as torch.library custom ops (gpt_kernels::flash_attn_fwd,
gpt_kernels::flash_attn_bwd) with fake implementations and autograd, so torch.compile
traces them without graph breaks.
"""
import math
import os

import torch

from .triton_runtime import INTERPRET  # first: without CUDA it switches Triton to its interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .checks import check_attention_inputs  # noqa: E402

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------
# Small helpers shared by all kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    """Load a tile; off-edge elements (only checked when MASKED) read as 0."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    """a @ b with a float32 result.

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
    k_ptrs, v_ptrs, stride_kn, stride_vn,  # pointers to keys/values 0..BLOCK_N-1, (BLOCK_N, HEAD_DIM)
    offs_m, lo, hi, N_K, diag, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Fold key blocks [lo, hi) into the online softmax of one query block."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        in_k = offs_n[:, None] < N_K
        k = _load(k_ptrs + start_n * stride_kn, in_k, MASKED)  # (BLOCK_N, HEAD_DIM)
        v = _load(v_ptrs + start_n * stride_vn, in_k, MASKED)  # (BLOCK_N, HEAD_DIM)
        qk = _dot(q, tl.trans(k), FP32_DOT)  # (BLOCK_M, BLOCK_N) raw scores
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
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, N_K, Q_BUCKET, K_BUCKET,  # the buckets only key the autotuner
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Tq, BLOCK_M), B * H)
    start_m = tl.program_id(0)
    off_hb = tl.program_id(1)
    off_b = (off_hb // H).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    off_h = (off_hb % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    in_q = offs_m[:, None] < N_Q
    # Rows past Tq load zeros and compute harmless values that are never stored.
    q = tl.load(q_ptrs, mask=in_q, other=0.0)  # (BLOCK_M, HEAD_DIM), stays on chip

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running unnormalized output

    full_end, end = _key_ranges(start_m, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    diag = N_K - N_Q
    # Phase 1: key blocks every row sees in full, no mask. Phase 2: the blocks crossing
    # the causal diagonal or the end of the keys. Blocks after `end` are skipped.
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                    offs_m, 0, full_end, N_K, diag, qk_scale,
                                    BLOCK_N, CAUSAL, False, FP32_DOT)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                    offs_m, full_end, end, N_K, diag, qk_scale,
                                    BLOCK_N, CAUSAL, True, FP32_DOT)

    acc = acc / l_i[:, None]
    # Base-2 LSE, kept in the units the backward uses: converting to natural log and back
    # would add two roundings, and at large logits each costs accuracy in the gradients.
    lse = m_i + tl.math.log2(l_i)
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=in_q)
    tl.store(Lse + off_hb.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)


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


@triton.jit
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
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m[:, None] < N_Q
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=in_q, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=in_q, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BLOCK_M,)
    tl.store(Delta + off_hb.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,  # (BLOCK_N, HEAD_DIM): f32 accumulators, and this program's keys/values
    q_ptrs, do_ptrs, stride_qm, stride_dom,  # pointers to query rows 0..BLOCK_M-1
    Lse, Delta,  # this (batch, head)'s rows of the (B, H, Tq) float32 base-2 LSE and delta
    offs_n, lo, hi, N_Q, N_K, diag, qk_scale,
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
        q = _load(q_ptrs + start_m * stride_qm, in_q[:, None], MASKED)  # (BLOCK_M, HEAD_DIM)
        do = _load(do_ptrs + start_m * stride_dom, in_q[:, None], MASKED)  # (BLOCK_M, HEAD_DIM)
        lse2 = _load(Lse + offs_m, in_q, MASKED)  # (BLOCK_M,)
        delta = _load(Delta + offs_m, in_q, MASKED)  # (BLOCK_M,)

        qkT = _dot(k, tl.trans(q), FP32_DOT)  # (BLOCK_N, BLOCK_M) raw scores, transposed
        logits = qkT * qk_scale - lse2[None, :]
        if MASKED:
            # Also drop query rows past Tq: here they would be summed into dK and dV.
            ok = _visible(offs_m[None, :], offs_n[:, None], N_K, diag, CAUSAL) & in_q[None, :]
            logits = tl.where(ok, logits, float("-inf"))
        pT = tl.math.exp2(logits)  # P^T, already normalized
        dv += _dot(pT.to(do.dtype), do, FP32_DOT)  # (BLOCK_N, HEAD_DIM)
        dpT = _dot(v, tl.trans(do), FP32_DOT)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(q.dtype), q, FP32_DOT)  # (BLOCK_N, HEAD_DIM), scaled by the caller
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, Lse, Delta,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N_Q, N_K, Q_BUCKET, K_BUCKET, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Tk, BLOCK_N), B * H); BLOCK_N keys per program, BLOCK_M queries per step
    start_n = tl.program_id(0)
    off_hb = tl.program_id(1)
    off_b = (off_hb // H).to(tl.int64)
    off_h = (off_hb % H).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    in_k = offs_n[:, None] < N_K
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=in_k, other=0.0)  # (BLOCK_N, HEAD_DIM)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=in_k, other=0.0)  # (BLOCK_N, HEAD_DIM)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    Lse += off_hb.to(tl.int64) * N_Q
    Delta += off_hb.to(tl.int64) * N_Q

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    diag = N_K - N_Q
    lo, full_lo, full_hi, end = _query_ranges(start_n, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    # Query blocks before `lo` cannot see any of these keys and are skipped.
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_qm, stride_dom, Lse, Delta,
                                  offs_n, lo, full_lo, N_Q, N_K, diag, qk_scale,
                                  BLOCK_M, CAUSAL, True, FP32_DOT)  # crossing the diagonal
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_qm, stride_dom, Lse, Delta,
                                  offs_n, full_lo, full_hi, N_Q, N_K, diag, qk_scale,
                                  BLOCK_M, CAUSAL, False, FP32_DOT)  # fully visible
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, stride_qm, stride_dom, Lse, Delta,
                                  offs_n, full_hi, end, N_Q, N_K, diag, qk_scale,
                                  BLOCK_M, CAUSAL, True, FP32_DOT)  # ragged end of Tq or Tk

    dk *= sm_scale
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=in_k)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=in_k)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,  # dq (BLOCK_M, HEAD_DIM) f32; q, do (BLOCK_M, HEAD_DIM); lse2, delta (BLOCK_M,)
    k_ptrs, v_ptrs, stride_kn, stride_vn,  # pointers to keys/values 0..BLOCK_N-1
    offs_m, lo, hi, N_K, diag, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        in_k = offs_n[:, None] < N_K
        k = _load(k_ptrs + start_n * stride_kn, in_k, MASKED)  # (BLOCK_N, HEAD_DIM)
        v = _load(v_ptrs + start_n * stride_vn, in_k, MASKED)  # (BLOCK_N, HEAD_DIM)
        qk = _dot(q, tl.trans(k), FP32_DOT)  # (BLOCK_M, BLOCK_N)
        logits = qk * qk_scale - lse2[:, None]
        if MASKED:
            logits = tl.where(_visible(offs_m[:, None], offs_n[None, :], N_K, diag, CAUSAL), logits, float("-inf"))
        p = tl.math.exp2(logits)  # (BLOCK_M, BLOCK_N), already normalized
        dp = _dot(do, tl.trans(v), FP32_DOT)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, FP32_DOT)  # (BLOCK_M, HEAD_DIM), scaled by the caller
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, Lse, Delta,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_K, Q_BUCKET, K_BUCKET, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Tq, BLOCK_M), B * H)
    start_m = tl.program_id(0)
    off_hb = tl.program_id(1)
    off_b = (off_hb // H).to(tl.int64)
    off_h = (off_hb % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    # Rows past Tq load zeros (LSE and delta too) and produce finite values never stored.
    in_q = offs_m < N_Q
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=in_q[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=in_q[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    row = off_hb.to(tl.int64) * N_Q + offs_m
    lse2 = tl.load(Lse + row, mask=in_q, other=0.0)  # (BLOCK_M,)
    delta = tl.load(Delta + row, mask=in_q, other=0.0)  # (BLOCK_M,)
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, end = _key_ranges(start_m, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    diag = N_K - N_Q
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
                            offs_m, 0, full_end, N_K, diag, qk_scale,
                            BLOCK_N, CAUSAL, False, FP32_DOT)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
                            offs_m, full_end, end, N_K, diag, qk_scale,
                            BLOCK_N, CAUSAL, True, FP32_DOT)

    dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=in_q[:, None])


# ---------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------
#
# Every kernel only writes its outputs (no accumulation into memory), so re-running it
# during autotuning cannot corrupt results. The autotuner is keyed on the head dim,
# causal flag and power-of-two buckets of the sequence lengths (not the lengths
# themselves, or decoding would re-tune at every new token); it adds the dtypes itself.
#
# The CUDA configs are listed best guess first. GPT_KERNELS_AUTOTUNE=0 (read at each
# new tuning key) keeps only the first one that fits, without benchmarking: tuning
# every shape of a test suite would take many minutes.

_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "Q_BUCKET", "K_BUCKET"]

# Under the interpreter: one small fixed config each, so tests stay fast. Query and key
# blocks differ on purpose, so both orders of BLOCK_M vs BLOCK_N get exercised.
_INTERPRET_CONFIGS = {
    "fwd": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
    "dkdv": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}),
    "dq": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}),
}
_PREPROCESS_BLOCK_M = 32 if INTERPRET else 128


def _cuda_configs(block_ms, block_ns, warps=(8, 4), stages=(3, 4, 2)):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in block_ms for n in block_ns for w in warps for s in stages
    ]


def _max_shared_memory(device) -> int:
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024)


def _pruner(resident, streamed, accumulators):
    """Build an early_config_prune that drops configs that would not fit the GPU.

    Each argument maps a config's block sizes to a number of HEAD_DIM-wide rows:
    resident  tiles held for the whole program (staged in shared memory for the dots),
    streamed  tiles loaded per loop step (buffered num_stages deep in shared memory),
    accumulators  float32 accumulator rows held in registers.
    The estimates are rough: they prune what clearly spills or cannot launch (head dim
    256 above all), and the autotuner's benchmark decides among the rest.
    """

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        head_dim, elem = q.shape[-1], q.element_size()
        smem = _max_shared_memory(q.device)
        kept = []
        for cfg in configs:
            meta = cfg.kwargs
            shared = elem * head_dim * (resident(meta) + streamed(meta) * cfg.num_stages)
            threads = 32 * cfg.num_warps
            acc_regs = accumulators(meta) * head_dim // threads
            score_regs = meta["BLOCK_M"] * meta["BLOCK_N"] // threads  # the float32 score tile
            if shared <= smem and acc_regs <= 128 and score_regs <= 64:
                kept.append(cfg)
        if not kept:  # nothing fits (float32 at head dim 256): small, unpipelined blocks
            kept = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
        return kept[:1] if os.environ.get("GPT_KERNELS_AUTOTUNE") == "0" else kept

    return prune


def _autotune(name, cuda_configs, prune):
    if INTERPRET:
        return triton.autotune(configs=[_INTERPRET_CONFIGS[name]], key=_TUNE_KEY)
    return triton.autotune(configs=cuda_configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune})


# forward: q resident; k, v streamed; acc is BLOCK_M rows.
_attn_fwd_tuned = _autotune(
    "fwd",
    _cuda_configs((128, 64), (64, 128, 32)),
    _pruner(lambda m: m["BLOCK_M"], lambda m: 2 * m["BLOCK_N"], lambda m: m["BLOCK_M"]),
)(_attn_fwd)
# dK/dV: k, v resident; q, dO streamed; dk and dv are 2 * BLOCK_N rows.
_attn_bwd_dkdv_tuned = _autotune(
    "dkdv",
    _cuda_configs((32, 64), (128, 64), stages=(3, 2)),
    _pruner(lambda m: 2 * m["BLOCK_N"], lambda m: 2 * m["BLOCK_M"], lambda m: 2 * m["BLOCK_N"]),
)(_attn_bwd_dkdv)
# dQ: q, dO resident; k, v streamed; dq is BLOCK_M rows.
_attn_bwd_dq_tuned = _autotune(
    "dq",
    _cuda_configs((128, 64), (32, 64), stages=(3, 2)),
    _pruner(lambda m: 2 * m["BLOCK_M"], lambda m: 2 * m["BLOCK_N"], lambda m: m["BLOCK_M"]),
)(_attn_bwd_dq)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def _check_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """Raise ValueError for inputs these kernels cannot take (after the shared checks)."""
    check_attention_inputs(q, k, v, causal)
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


def _empty(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled when GPT_KERNELS_NAN_FILL=1 so tests catch unwritten tiles."""
    if os.environ.get("GPT_KERNELS_NAN_FILL") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _bucket(n: int) -> int:
    return triton.next_power_of_2(n)


def _fp32_dot(dtype: torch.dtype) -> bool:
    return INTERPRET or dtype == torch.float32


def _launch(kernel, grid, args, meta, config):
    """Run an autotuned kernel, or, given an explicit config dict (tests), the bare kernel."""
    if config is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid](*args, **meta, **config)


def _forward(q, k, v, causal: bool, scale: float, config: dict | None = None):
    """Launch the forward kernel; returns out (B, H, Tq, D) and base-2 lse (B, H, Tq) float32."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = _empty((B, H, Tq, D), q.dtype, q.device)
    lse = _empty((B, H, Tq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
    args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, Tq, Tk, _bucket(Tq), _bucket(Tk), scale * math.log2(math.e))
    meta = dict(HEAD_DIM=D, CAUSAL=causal, FP32_DOT=_fp32_dot(q.dtype))
    _launch(_attn_fwd_tuned, grid, args, meta, config)
    return out, lse


def _backward(do, q, k, v, out, lse, causal: bool, scale: float,
              dkdv_config: dict | None = None, dq_config: dict | None = None):
    """Launch the three backward kernels; returns dq, dk, dv shaped like q, k, v."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    if B * H == 0:
        return dq, dk, dv
    delta = _empty((B, H, Tq), torch.float32, q.device)
    if Tq > 0:
        _attn_bwd_preprocess[(triton.cdiv(Tq, _PREPROCESS_BLOCK_M), B * H)](
            out, do, delta, *out.stride(), *do.stride(), H, Tq, HEAD_DIM=D, BLOCK_M=_PREPROCESS_BLOCK_M)

    sizes = (H, Tq, Tk, _bucket(Tq), _bucket(Tk), scale, scale * math.log2(math.e))
    meta = dict(HEAD_DIM=D, CAUSAL=causal, FP32_DOT=_fp32_dot(q.dtype))
    # dK/dV also runs when Tq == 0: it then writes the zero gradients.
    grid = lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * H)  # noqa: E731
    args = (q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            *dk.stride(), *dv.stride(), *sizes)
    _launch(_attn_bwd_dkdv_tuned, grid, args, meta, dkdv_config)
    if Tq > 0:
        grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
        args = (q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                *dq.stride(), *sizes)
        _launch(_attn_bwd_dq_tuned, grid, args, meta, dq_config)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------
# torch.library registration and autograd
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("gpt_kernels::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, Tq, D) in q's dtype, and lse (B, H, Tq) float32 for the backward.

    lse is the base-2 log-sum-exp of the scaled scores: log2(sum_j 2**(s_ij * log2(e)))
    for s = scale * q k^T (masked), i.e. the natural logsumexp times log2(e).
    """
    _check_supported(q, k, v, causal)
    return _forward(q, k, v, causal, scale)


@flash_attn_fwd.register_fake
def _(q, k, v, causal, scale):
    _check_supported(q, k, v, causal)
    B, H, Tq, D = q.shape
    return q.new_empty((B, H, Tq, D)), q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.custom_op("gpt_kernels::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, in the inputs' dtype) from the forward's out and lse."""
    return _backward(grad_out, q, k, v, out, lse, causal, scale)


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              scale: float | None = None) -> torch.Tensor:
    """Fused softmax(scale * q k^T [+ causal mask]) v for q (B, H, Tq, D), k/v (B, H, Tk, D).

    Differentiable; any strides are accepted (no copies). Returns (B, H, Tq, D) in q's dtype.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, _ = flash_attn_fwd(q, k, v, causal, float(scale))
    return out
