"""Fused attention in Triton, FlashAttention-2 style, forward and backward.

    out = attention(q, k, v, causal=True, scale=0.125)   # q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D)
    out = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)

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
            With deterministic=False (LaunchConfig.dq_atomic, the DQ_ATOMIC switch) the
            dK/dV pass also adds each tile pair's share of dQ into a float32 buffer with
            atomic adds and the dQ pass is skipped: 5 matrix products per tile pair instead
            of 7 (no second QK^T and dO V^T), and dQ's last bits vary with the order the
            adds land in on a GPU. dK and dV are the same either way.

Masks are bottom-right aligned (query i sits at position i + Tk - Tq, as in
kernels/reference.py). Key/query blocks no row of the other side sees (above the causal
diagonal, before a sliding window) are never visited, blocks every row sees in full run
without any mask, and only blocks crossing the diagonal, a window's edge or a sequence end
pay for masking.

The features of kernels.attention are constexpr switches of the same kernels, so a plain
call compiles exactly the kernel it did before they existed (kernels/triton_common.py):
  GROUP      grouped-query attention: query head h reads kv head h // GROUP, no copies; the
             dK/dV program of a kv head sums over its query heads in a loop;
  WINDOW     a sliding window (`window` keys, itself included), whose outside is skipped;
  SOFTCAP    scores softcap * tanh(scale * q k^T / softcap), forward and backward;
  DROPOUT    the seeded mask of kernels/dropout.py, made again per tile in the backward;
  VARLEN     packed sequences: program (block, sequence * head) reads where its sequence
             lies from cu_seqlens, and no sequence sees another;
  BLOCK_D    head dims that are multiples of 8 (80, 96, ...) padded to a power of two, the
             padding columns masked;
  SPLIT_GRID batch x heads over grid axes 1 and 2, past CUDA's 65,535 programs per axis.
The launch config's variant fields are constexpr switches too (kernels/triton_configs.py):
  DQ_ATOMIC  the single-pass backward above (dK/dV kernel only).

The forward has variants too, chosen by the launch config (LaunchConfig's variant fields,
kernels/triton_configs.py), off unless a config turns them on; they change how its tiles are
read and handed out, never what a tile computes:
  TMA        Q, K, V and O through tensor descriptors made on the device (Hopper's TMA engine)
             instead of pointers. Their bounds (Tq, Tk, the head dim) do the masking. Inputs a
             descriptor cannot read (a head-dim stride other than 1, other strides or the start
             not 16-byte aligned: _descriptor_accepts), packed sequences and float32 inputs (whose
             small full-precision tiles spill with descriptors) take the pointer path.
             The descriptors need a little global memory per program, from triton.set_allocator's
             allocator: if none is set, one that takes it from PyTorch is (_ensure_allocator).
  PERSISTENT one program per SM, each looping over (query block, batch x head) tiles, causal
             ones heaviest first (_persistent_tile), so that the programs finish together.

Scores are scaled into base 2 (scale * log2(e)) so the kernels use exp2, which maps to
one hardware instruction.

Launching: block sizes, warps and stages come from the committed table in
kernels/triton_configs.py (no autotuning unless GPT_KERNELS_AUTOTUNE=1). Everything a
launch needs besides the tensors and the options' values (configs, grids, constexprs) is
worked out once per input signature (a _Plan) and cached, so an eager call costs a
dictionary lookup and the launches. The kernels do not specialize on the sequence lengths
or the options' values, so a growing KV cache (or a new dropout seed) never recompiles.

Routing, in one place (_decodes): a few new queries against a KV cache, with nothing to
differentiate, go to the split-KV decode kernel (kernels/triton_decode.py) instead.

Eager calls go through a torch.autograd.Function. Under torch.compile the same launchers
run inside torch.library custom ops (gpt_kernels::flash_attn_fwd, gpt_kernels::flash_attn_bwd,
gpt_kernels::flash_attn_decode) with fake implementations and autograd, which torch.compile
traces without graph breaks.

Without CUDA the kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, set up
by kernels/triton_runtime.py), which accepts CPU tensors: correct, and very slow, for tests.
"""

import functools  # noqa: I001 (kernels.triton_runtime must be imported before triton: see there)
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

import torch

from . import triton_runtime  # first: without CUDA it switches Triton to its interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import triton_configs, triton_decode  # noqa: E402
from .checks import check_attention_inputs, check_varlen_inputs  # noqa: E402
from .triton_common import (  # noqa: E402
    Options,
    Packing,
    arguments,
    batch_head_grid,
    block_ranges,
    lengths,
    padded_head_dim,
    split_grid_batch_head,
    sequence_span,
    strides,
    tanh,
    visible,
)
from .triton_configs import LaunchConfig  # noqa: E402
from .triton_decode import MAX_DECODE_Q_LEN  # noqa: E402
from .triton_dropout import dropout_kept, dropout_row_bits  # noqa: E402
from .triton_runtime import INTERPRET, dot, fp32_dot  # noqa: E402

# ---------------------------------------------------------------------------------------
# Small helpers shared by the forward and backward kernels
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
def _load(ptrs, mask, in_d, MASKED: tl.constexpr, PAD_D: tl.constexpr):
    """Load a tile; off-edge elements read as 0: rows past the end (`mask`, only checked when
    MASKED) and, when the head dim is padded to a power of two (PAD_D), the columns past it (in_d)."""
    if MASKED:
        if PAD_D:
            x = tl.load(ptrs, mask=mask & in_d, other=0.0)
        else:
            x = tl.load(ptrs, mask=mask, other=0.0)
    elif PAD_D:
        x = tl.load(ptrs, mask=in_d, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _atomic_add(ptrs, x, mask, in_d, MASKED: tl.constexpr, PAD_D: tl.constexpr):
    """Add a float32 tile into memory atomically (other programs add into the same elements),
    masked as _load masks: rows past the end only when MASKED, padding columns when PAD_D.
    Relaxed order: only the sum matters, and nothing reads it before the kernel ends."""
    if MASKED:
        if PAD_D:
            tl.atomic_add(ptrs, x, mask=mask & in_d, sem="relaxed")
        else:
            tl.atomic_add(ptrs, x, mask=mask, sem="relaxed")
    elif PAD_D:
        tl.atomic_add(ptrs, x, mask=in_d, sem="relaxed")
    else:
        tl.atomic_add(ptrs, x, sem="relaxed")


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
def _window_key_ranges(start_m, N_Q, N_K, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr):
    """With a sliding window, the key range of query block start_m as block_ranges splits it:
    masked at the window's far edge, unmasked, masked at the diagonal or the end of the keys.
    Key blocks wholly outside every row's window are skipped."""
    diag = N_K - N_Q
    first = start_m * BLOCK_M + diag  # position of the block's first query
    last = tl.minimum((start_m + 1) * BLOCK_M, N_Q) - 1 + diag  # and of its last one
    # Some row sees keys in [first - window + 1, end); every row sees those in [last - window + 1, full_end).
    if CAUSAL:
        end = tl.minimum(last + 1, N_K)
        full_end = tl.minimum(first + 1, N_K)
    else:
        end = N_K
        full_end = N_K
    return block_ranges(first - window + 1, last - window + 1, full_end, end, BLOCK_N)


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


@triton.jit
def _window_query_ranges(start_n, N_Q, N_K, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr):
    """With a sliding window, the query range of key block start_n as block_ranges splits it.
    Query blocks whose windows all end before these keys (or, causal, start after them) are skipped."""
    diag = N_K - N_Q
    first = start_n * BLOCK_N  # the block's first key
    last = tl.minimum(first + BLOCK_N, N_K) - 1  # and its last one
    # Query i (at position i + diag) sees key j iff j > i + diag - window, and with CAUSAL j <= i + diag.
    # So rows in [begin, end) see some of these keys, rows in [full_begin, full_end) all of them.
    end = tl.minimum(last + window - diag, N_Q)
    full_end = tl.minimum(first + window - diag, N_Q)
    if CAUSAL:
        begin = first - diag
        full_begin = last - diag
    else:
        begin = 0
        full_begin = 0
    # A key block running past Tk needs the key mask in every query block.
    full_end = tl.where(first + BLOCK_N <= N_K, full_end, 0)
    return block_ranges(begin, full_begin, full_end, end, BLOCK_M)


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  # running state: (BLOCK_M, BLOCK_D) f32, (BLOCK_M,) f32 x2; q (BLOCK_M, BLOCK_D)
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,  # this (batch, kv head)'s keys and values
    offs_m, offs_d, in_d, lo, hi, lo2, hi2, N_K, diag, qk_scale,
    softcap_scale, window, dropout_rows, dropout_threshold,  # the variants' values (None when off)
    kv_b, kv_h,  # with TMA: K and V are descriptors of the whole (B, H_kv, Tk, D) tensors, read at [kv_b, kv_h]
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr, FP32_DOT: tl.constexpr,
    TMA: tl.constexpr,
):
    """Fold key blocks [lo, hi) into the online softmax of one query block, and with WINDOW
    and MASKED those of [lo2, hi2) after them: both masked ranges of a window, in one loop."""
    offs_n0 = tl.arange(0, BLOCK_N)
    steps_end = hi
    if WINDOW and MASKED:
        steps_end = hi + (hi2 - lo2)
    for start_n in range(lo, steps_end, BLOCK_N):
        if WINDOW and MASKED:
            start_n = tl.where(start_n < hi, start_n, start_n - hi + lo2)
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        if TMA:  # the descriptor's bounds (Tk rows, HEAD_DIM columns) zero-fill what lies past them
            k = _load_block(K, kv_b, kv_h, start_n, BLOCK_N, BLOCK_D)  # (BLOCK_N, BLOCK_D)
            v = _load_block(V, kv_b, kv_h, start_n, BLOCK_N, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        else:
            in_k = offs_n[:, None] < N_K
            k = _load(_tile(K, offs_n, stride_kn, offs_d, stride_kd), in_k, in_d, MASKED, PAD_D)  # (BLOCK_N, BLOCK_D)
            v = _load(_tile(V, offs_n, stride_vn, offs_d, stride_vd), in_k, in_d, MASKED, PAD_D)  # (BLOCK_N, BLOCK_D)
        qk = dot(q, tl.trans(k), FP32_DOT)  # (BLOCK_M, BLOCK_N) raw scores
        if SOFTCAP:  # times qk_scale = softcap * log2(e) below: softcap * tanh(scale * q k^T / softcap)
            qk = tanh(qk * softcap_scale)
        if MASKED:
            qk = tl.where(visible(offs_m[:, None], offs_n[None, :], N_K, diag, window, CAUSAL, WINDOW),
                          qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = m_ij
            if WINDOW:  # a row may have seen no key yet (m = -inf): subtract 0, not -inf, so exp2 gives 0, not NaN
                m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            qk = qk - m_sub[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_ij
            qk = qk * qk_scale - m_ij[:, None]
        # Without a window m_ij is finite: every row sees at least key 0, and the first block
        # visited holds it, so exp2 never sees (-inf) - (-inf).
        p = tl.math.exp2(qk)  # (BLOCK_M, BLOCK_N) unnormalized probabilities
        alpha = tl.math.exp2(m_i - m_sub)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax sums every probability, dropped or not
        if DROPOUT:
            p = tl.where(dropout_kept(dropout_rows[:, None], offs_n[None, :], dropout_threshold), p, 0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _descriptor(base, batch, heads, rows, stride_b, stride_h, stride_row, HEAD_DIM: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """With TMA: a tensor descriptor of a whole (batch, heads, rows, HEAD_DIM) tensor with head-dim
    stride 1, read and written in (ROWS, BLOCK_D) tiles. Made on the device (tl.make_tensor_descriptor),
    so it takes the tensor's own strides: views of a fused QKV projection need no copy. Its bounds
    do the masking: loads past `rows` or HEAD_DIM read 0, stores past them are dropped."""
    return tl.make_tensor_descriptor(base, shape=[batch, heads, rows, HEAD_DIM],
                                     strides=[stride_b, stride_h, stride_row, 1], block_shape=[1, 1, ROWS, BLOCK_D])


@triton.jit
def _load_block(desc, b, h, row, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows [row, row + ROWS) of (batch b, head h) through a _descriptor, as a (ROWS, COLS) tile."""
    return desc.load([b, h, row, 0]).reshape(ROWS, COLS)


@triton.jit
def _persistent_tile(tile, blocks, batch_heads, CAUSAL: tl.constexpr):
    """With PERSISTENT: the (query block, batch*head) of tile number `tile`, in the schedule's order.

    Tiles run in rounds of batch_heads: round r holds the r-th heaviest query block of every head,
    and a program takes tiles program_id, program_id + programs, ... So with CAUSAL (where the last
    query blocks see the most keys) the longest tiles start first and the shortest fill in at the
    end (longest-processing-time first, FlashAttention-4's scheduler's idea). Odd rounds walk the
    heads backwards, so a program whose tile in one round came late in the heads gets an early one
    in the next, and the programs' totals even out.
    """
    rank = tile // batch_heads
    off_hb = tile % batch_heads
    off_hb = tl.where(rank % 2 == 1, batch_heads - 1 - off_hb, off_hb)
    start_m = rank
    if CAUSAL:
        start_m = blocks - 1 - rank
    return start_m, off_hb


@triton.jit
def _attn_fwd_tile(
    start_m, off_hb, Q, K, V, Out, Lse, q_start, k_start,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lse_h, H, N_Q, N_K, qk_scale, softcap_scale, window, dropout_seed, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
):
    """One query block `start_m` of one (batch, head) `off_hb`: its output rows and their LSE.
    With VARLEN, N_Q and N_K are its sequence's lengths, starting at rows q_start and k_start."""
    off_b = (off_hb // H).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    off_h = (off_hb % H).to(tl.int64)
    off_kv = off_h
    if GROUP > 1:  # grouped-query attention: query head h reads kv head h // GROUP
        off_kv = off_h // GROUP
    desc_b, desc_h, desc_kv = None, None, None
    if TMA:  # Q, K, V and Out are descriptors of the whole tensors: this tile's are read at its indices
        desc_b, desc_h = (off_hb // H).to(tl.int32), (off_hb % H).to(tl.int32)
        desc_kv = desc_h // GROUP
    else:  # point every base pointer at this program's (batch, head): below, only rows and columns
        if VARLEN:  # off_b is the sequence; its rows start at q_start and k_start (stride_qb etc. are 0)
            Q += q_start * stride_qm
            Out += q_start * stride_om
            K += k_start * stride_kn
            V += k_start * stride_vn
        Q += off_b * stride_qb + off_h * stride_qh
        K += off_b * stride_kb + off_kv * stride_kh
        V += off_b * stride_vb + off_kv * stride_vh
        Out += off_b * stride_ob + off_h * stride_oh
    if VARLEN:  # Lse (H, total_q)
        Lse += off_h * stride_lse_h + q_start
    else:  # Lse (B, H, Tq)
        Lse += off_hb.to(tl.int64) * N_Q

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_q = offs_m[:, None] < N_Q
    in_d = offs_d[None, :] < HEAD_DIM  # BLOCK_D pads the head dim to a power of two
    if HEAD_DIM < BLOCK_D:
        in_q = in_q & in_d
    # Rows past Tq load zeros and compute harmless values that are never stored.
    if TMA:
        q = _load_block(Q, desc_b, desc_h, start_m * BLOCK_M, BLOCK_M, BLOCK_D)  # (BLOCK_M, BLOCK_D)
    else:
        q = tl.load(_tile(Q, offs_m, stride_qm, offs_d, stride_qd), mask=in_q, other=0.0)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running unnormalized output
    dropout_rows = None
    if DROPOUT:  # the mask's hash of (seed, batch, head, query), continued per key in the loop
        dropout_rows = dropout_row_bits(dropout_seed, off_b, off_h, offs_m)

    if WINDOW:
        # First the key blocks every row sees, unmasked; then in one loop the masked ones at the
        # window's far edge and at the diagonal or the end of the keys (a third loop spilled
        # registers). Blocks before the first and after the last are skipped.
        lo, full_lo, full_hi, hi = _window_key_ranges(start_m, N_Q, N_K, window, BLOCK_M, BLOCK_N, CAUSAL)
        diag = N_K - N_Q
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                        offs_m, offs_d, in_d, full_lo, full_hi, None, None, N_K, diag, qk_scale,
                                        softcap_scale, window, dropout_rows, dropout_threshold, desc_b, desc_kv,
                                        BLOCK_N, BLOCK_D, CAUSAL, WINDOW, SOFTCAP, DROPOUT, HEAD_DIM < BLOCK_D, False,
                                        FP32_DOT, TMA)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                        offs_m, offs_d, in_d, lo, full_lo, full_hi, hi, N_K, diag, qk_scale,
                                        softcap_scale, window, dropout_rows, dropout_threshold, desc_b, desc_kv,
                                        BLOCK_N, BLOCK_D, CAUSAL, WINDOW, SOFTCAP, DROPOUT, HEAD_DIM < BLOCK_D, True,
                                        FP32_DOT, TMA)
    else:
        full_end, end = _key_ranges(start_m, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
        diag = N_K - N_Q
        # Phase 1: key blocks every row sees in full, no mask. Phase 2: the blocks crossing
        # the causal diagonal or the end of the keys. Blocks after `end` are skipped.
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                        offs_m, offs_d, in_d, 0, full_end, None, None, N_K, diag, qk_scale,
                                        softcap_scale, window, dropout_rows, dropout_threshold, desc_b, desc_kv,
                                        BLOCK_N, BLOCK_D, CAUSAL, WINDOW, SOFTCAP, DROPOUT, HEAD_DIM < BLOCK_D, False,
                                        FP32_DOT, TMA)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                        offs_m, offs_d, in_d, full_end, end, None, None, N_K, diag, qk_scale,
                                        softcap_scale, window, dropout_rows, dropout_threshold, desc_b, desc_kv,
                                        BLOCK_N, BLOCK_D, CAUSAL, WINDOW, SOFTCAP, DROPOUT, HEAD_DIM < BLOCK_D, True,
                                        FP32_DOT, TMA)

    if VARLEN or WINDOW:
        # Rows that saw no key (l = 0): those of a sequence without keys, which are 0 with lse -inf,
        # and padding rows past Tq whose window ends past the keys (never stored).
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_i[:, None]
    if DROPOUT:  # the survivors, scaled by 1 / (1 - p)
        acc = acc * dropout_scale
    # Base-2 LSE, kept in the units the backward uses: converting to natural log and back
    # would add two roundings, and at large logits each costs accuracy in the gradients.
    lse = m_i + tl.math.log2(l_i)
    if TMA:
        Out.store([desc_b, desc_h, start_m * BLOCK_M, 0], acc.to(Out.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        tl.store(_tile(Out, offs_m, stride_om, offs_d, stride_od), acc.to(Out.dtype.element_ty), mask=in_q)
    tl.store(Lse + offs_m, lse, mask=offs_m < N_Q)


# Lengths change every decoding step, a packed batch's total (stride_lse_h) every batch, the seed every
# training step: none is specialized on, so none recompiles.
@triton.jit(do_not_specialize=["stride_lse_h", "N_Q", "N_K", "batch_heads", "window", "dropout_seed",
                               "dropout_threshold"])
def _attn_fwd(
    Q, K, V, Out, Lse, Cu_seqlens_q, Cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lse_h, H, N_Q, N_K, batch_heads,
    qk_scale,  # softmax scale * log2(e) (with SOFTCAP: softcap * log2(e))
    softcap_scale, window, dropout_seed, dropout_threshold, dropout_scale,  # None when their switch is off
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, SPLIT_GRID: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, PERSISTENT: tl.constexpr,  # the variants (LaunchConfig.tma, .persistent)
):
    # The variants change how tiles are read and handed out, never what a tile computes:
    #   TMA         Q, K, V and Out through tensor descriptors (Hopper's TMA engine), not pointers;
    #   PERSISTENT  grid (programs,): each program loops over tiles, in _persistent_tile's order.
    if TMA:  # (batch_heads is passed with TMA: the descriptors' batch bound)
        batch = batch_heads // H
        Q = _descriptor(Q, batch, H, N_Q, stride_qb, stride_qh, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D)
        K = _descriptor(K, batch, H // GROUP, N_K, stride_kb, stride_kh, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D)
        V = _descriptor(V, batch, H // GROUP, N_K, stride_vb, stride_vh, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D)
        Out = _descriptor(Out, batch, H, N_Q, stride_ob, stride_oh, stride_om, HEAD_DIM, BLOCK_M, BLOCK_D)
    if PERSISTENT:
        # grid: (programs,), at most one per SM; tiles: cdiv(Tq, BLOCK_M) x B * H (max_seqlen_q and
        # sequences * H with VARLEN), heaviest first
        # (disable_licm: nothing hoisted out of this loop stays live across every tile; that made
        # the head dim 128 forward spill.)
        blocks = tl.cdiv(N_Q, BLOCK_M)
        for tile in tl.range(tl.program_id(0), blocks * batch_heads, tl.num_programs(0), disable_licm=True):
            start_m, off_hb = _persistent_tile(tile, blocks, batch_heads, CAUSAL)
            q_start, k_start, len_q, len_k = None, None, N_Q, N_K
            if VARLEN:
                q_start, len_q = sequence_span(Cu_seqlens_q, off_hb // H)
                k_start, len_k = sequence_span(Cu_seqlens_k, off_hb // H)
            if start_m * BLOCK_M < len_q:  # (a short sequence has fewer query blocks than the longest)
                _attn_fwd_tile(start_m, off_hb, Q, K, V, Out, Lse, q_start, k_start,
                               stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                               stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                               stride_lse_h, H, len_q, len_k, qk_scale, softcap_scale, window, dropout_seed,
                               dropout_threshold, dropout_scale, HEAD_DIM, BLOCK_D, GROUP, CAUSAL, WINDOW, SOFTCAP,
                               DROPOUT, VARLEN, FP32_DOT, BLOCK_M, BLOCK_N, TMA)
    else:
        # grid: (cdiv(Tq, BLOCK_M), B * H), or (cdiv(max_seqlen_q, BLOCK_M), sequences * H) with VARLEN
        start_m = tl.program_id(0)
        off_hb = tl.program_id(1)
        if SPLIT_GRID:
            off_hb = split_grid_batch_head(off_hb)
            if off_hb >= batch_heads:
                return
        q_start, k_start = None, None
        if VARLEN:  # this program's sequence: where its rows start, and its lengths
            q_start, N_Q = sequence_span(Cu_seqlens_q, (off_hb // H).to(tl.int64))
            k_start, N_K = sequence_span(Cu_seqlens_k, (off_hb // H).to(tl.int64))
            if start_m * BLOCK_M >= N_Q:
                return
        _attn_fwd_tile(start_m, off_hb, Q, K, V, Out, Lse, q_start, k_start,
                       stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                       stride_lse_h, H, N_Q, N_K, qk_scale, softcap_scale, window, dropout_seed, dropout_threshold,
                       dropout_scale, HEAD_DIM, BLOCK_D, GROUP, CAUSAL, WINDOW, SOFTCAP, DROPOUT, VARLEN, FP32_DOT,
                       BLOCK_M, BLOCK_N, TMA)


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
# The variants change three lines of it:
#   dropout (kept mask M, survivors scaled by s = 1 / (1 - p)): O = (P * M * s) V, so
#       dV = (P * M * s)^T dO and dP = (dO V^T) * M * s; delta = rowsum(dO * O) still holds;
#   softcap: scores c = softcap * tanh(scale * q k^T / softcap), so dS is taken through
#       dc / d(scale * q k^T) = 1 - tanh^2;
#   GQA: dK and dV of a kv head sum over the query heads that read it. The dK/dV program of
#       a kv head loops over that group of query heads, in order: still no atomics.
#
# Precision note: LSE2 is a float32 near the largest logit L, so it carries an absolute
# rounding error of about eps * |L|, and every rebuilt probability a relative error of
# that size. For ordinary logits (|L| ~ 10) this is invisible; at |L| ~ 1e4 it is ~1e-3,
# the usual limit of FlashAttention-style backward passes.


@triton.jit(do_not_specialize=["stride_lse_h", "N_Q", "batch_heads"])
def _attn_bwd_preprocess(
    O, DO, Delta, Cu_seqlens_q,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lse_h, H, N_Q, batch_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, SPLIT_GRID: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # grid: (cdiv(Tq, BLOCK_M), B * H), as the forward's
    start_m = tl.program_id(0)
    off_hb = tl.program_id(1)
    if SPLIT_GRID:
        off_hb = split_grid_batch_head(off_hb)
        if off_hb >= batch_heads:
            return
    off_b = (off_hb // H).to(tl.int64)
    off_h = (off_hb % H).to(tl.int64)
    if VARLEN:
        q_start, N_Q = sequence_span(Cu_seqlens_q, off_b)
        if start_m * BLOCK_M >= N_Q:
            return
        O += q_start * stride_om
        DO += q_start * stride_dom
    O += off_b * stride_ob + off_h * stride_oh
    DO += off_b * stride_dob + off_h * stride_doh
    if VARLEN:
        Delta += off_h * stride_lse_h + q_start
    else:
        Delta += off_hb.to(tl.int64) * N_Q

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_q = offs_m[:, None] < N_Q
    if HEAD_DIM < BLOCK_D:
        in_q = in_q & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(_tile(O, offs_m, stride_om, offs_d, stride_od), mask=in_q, other=0.0)
    do = tl.load(_tile(DO, offs_m, stride_dom, offs_d, stride_dod), mask=in_q, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BLOCK_M,)
    tl.store(Delta + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,  # (BLOCK_N, BLOCK_D): f32 accumulators, and this program's keys/values
    Q, DO, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,  # queries and dO
    Lse, Delta, lse_head_stride,  # the float32 base-2 LSE and delta rows of the query heads
    DQ, stride_dqh, stride_dqm, stride_dqd, sm_scale,  # with DQ_ATOMIC: the float32 dQ of the query heads
    offs_n, offs_d, in_d, lo, hi, N_Q, N_K, diag, qk_scale,
    softcap_scale, window, dropout_seed, dropout_threshold, dropout_scale, off_b, off_h,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) of the GROUP query heads
    off_h, off_h + 1, ... (Q, DO, Lse and Delta point at the first), one head after another.
    With DQ_ATOMIC, also add each tile's share of dQ into DQ (float32, same heads) atomically.

    With GQA one loop walks GROUP x the block range, not a loop per head around the block loop:
    nested loops kept more values live across the inner one, and spilled registers.
    Works on transposed tiles (keys as rows) so that P^T and dS^T come out directly in
    the shape the dK/dV matmuls need, with no transpose of computed values.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    steps_end = hi
    if GROUP > 1:
        steps_end = lo + GROUP * (hi - lo)
    for start_m in range(lo, steps_end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        head = off_h
        Q_h, DO_h, Lse_h, Delta_h, DQ_h = Q, DO, Lse, Delta, DQ
        if GROUP > 1:  # step start_m - lo of GROUP x (hi - lo): head g of the group, its block start_m
            g = (start_m - lo) // (hi - lo)
            start_m = tl.multiple_of(start_m - g * (hi - lo), BLOCK_M)
            head = off_h + g
            Q_h, DO_h = Q + g * stride_qh, DO + g * stride_doh
            Lse_h, Delta_h = Lse + g * lse_head_stride, Delta + g * lse_head_stride
            if DQ_ATOMIC:
                DQ_h = DQ + g * stride_dqh
        offs_m = start_m + offs_m0
        in_q = offs_m < N_Q
        q = _load(_tile(Q_h, offs_m, stride_qm, offs_d, stride_qd), in_q[:, None], in_d, MASKED, PAD_D)
        do = _load(_tile(DO_h, offs_m, stride_dom, offs_d, stride_dod), in_q[:, None], in_d, MASKED, PAD_D)
        lse2 = _load(Lse_h + offs_m, in_q, None, MASKED, False)  # (BLOCK_M,)
        delta = _load(Delta_h + offs_m, in_q, None, MASKED, False)  # (BLOCK_M,)

        qkT = dot(k, tl.trans(q), FP32_DOT)  # (BLOCK_N, BLOCK_M) raw scores, transposed
        if SOFTCAP:
            qkT = tanh(qkT * softcap_scale)  # kept for the derivative 1 - tanh^2 below
        logits = qkT * qk_scale - lse2[None, :]
        if MASKED:
            # Also drop query rows past Tq: here they would be summed into dK and dV.
            ok = visible(offs_m[None, :], offs_n[:, None], N_K, diag, window, CAUSAL, WINDOW) & in_q[None, :]
            logits = tl.where(ok, logits, float("-inf"))
        pT = tl.math.exp2(logits)  # P^T, already normalized
        if DROPOUT:
            rows = dropout_row_bits(dropout_seed, off_b, head, offs_m)
            keptT = dropout_kept(rows[None, :], offs_n[:, None], dropout_threshold)
            dv += dot(tl.where(keptT, pT * dropout_scale, 0.0).to(do.dtype), do, FP32_DOT)
        else:
            dv += dot(pT.to(do.dtype), do, FP32_DOT)  # (BLOCK_N, BLOCK_D)
        if SOFTCAP:  # fold the cap's derivative into P^T now: tanh need not stay live across the next dot
            pT = pT * (1.0 - qkT * qkT)
        dpT = dot(v, tl.trans(do), FP32_DOT)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            dpT = tl.where(keptT, dpT * dropout_scale, 0.0)
        dsT = pT * (dpT - delta[None, :])
        dk += dot(dsT.to(q.dtype), q, FP32_DOT)  # (BLOCK_N, BLOCK_D), scaled by the caller
        if DQ_ATOMIC:  # the single-pass backward: dQ's share of this tile pair, dS K, added in place
            dq = dot(tl.trans(dsT.to(k.dtype)), k, FP32_DOT) * sm_scale  # (BLOCK_M, BLOCK_D)
            _atomic_add(_tile(DQ_h, offs_m, stride_dqm, offs_d, stride_dqd), dq, in_q[:, None], in_d, MASKED, PAD_D)
    return dk, dv


@triton.jit(do_not_specialize=["stride_lse_h", "N_Q", "N_K", "batch_heads", "window", "dropout_seed",
                               "dropout_threshold"])
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, DQ, Lse, Delta, Cu_seqlens_q, Cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,  # DQ and its strides: None unless DQ_ATOMIC
    stride_lse_h, H, N_Q, N_K, batch_heads, sm_scale, qk_scale,
    softcap_scale, window, dropout_seed, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, SPLIT_GRID: tl.constexpr, DQ_ATOMIC: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Tk, BLOCK_N), B * H), H the kv heads; BLOCK_N keys per program, BLOCK_M queries per step.
    # DQ_ATOMIC (LaunchConfig.dq_atomic): the single-pass backward, which also adds dQ into DQ (float32).
    start_n = tl.program_id(0)
    off_hb = tl.program_id(1)
    if SPLIT_GRID:
        off_hb = split_grid_batch_head(off_hb)
        if off_hb >= batch_heads:
            return
    off_b = (off_hb // H).to(tl.int64)
    off_h = (off_hb % H).to(tl.int64)  # the kv head; with GQA its query heads are off_h * GROUP + g
    if VARLEN:
        q_start, N_Q = sequence_span(Cu_seqlens_q, off_b)
        k_start, N_K = sequence_span(Cu_seqlens_k, off_b)
        if start_n * BLOCK_N >= N_K:
            return
        Q += q_start * stride_qm
        DO += q_start * stride_dom
        K += k_start * stride_kn
        V += k_start * stride_vn
        DK += k_start * stride_dkn
        DV += k_start * stride_dvn
        if DQ_ATOMIC:
            DQ += q_start * stride_dqm
    q_head = off_h
    if GROUP > 1:
        q_head = off_h * GROUP  # the group's first query head
    Q += off_b * stride_qb + q_head * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + q_head * stride_doh
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dvb + off_h * stride_dvh
    if DQ_ATOMIC:
        DQ += off_b * stride_dqb + q_head * stride_dqh
    # That head's rows of the float32 base-2 LSE and delta: (B, H * GROUP, Tq), or (H * GROUP, total_q) with VARLEN
    if VARLEN:
        lse_head_stride = stride_lse_h
        Lse += q_head * stride_lse_h + q_start
        Delta += q_head * stride_lse_h + q_start
    else:
        lse_head_stride = N_Q
        if GROUP > 1:
            Lse += (off_b * H * GROUP + q_head) * N_Q
            Delta += (off_b * H * GROUP + q_head) * N_Q
        else:
            Lse += off_hb.to(tl.int64) * N_Q
            Delta += off_hb.to(tl.int64) * N_Q

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_k = offs_n[:, None] < N_K
    in_d = offs_d[None, :] < HEAD_DIM
    if HEAD_DIM < BLOCK_D:
        in_k = in_k & in_d
    k = tl.load(_tile(K, offs_n, stride_kn, offs_d, stride_kd), mask=in_k, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(_tile(V, offs_n, stride_vn, offs_d, stride_vd), mask=in_k, other=0.0)  # (BLOCK_N, BLOCK_D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    diag = N_K - N_Q
    if WINDOW:
        lo, full_lo, full_hi, end = _window_query_ranges(start_n, N_Q, N_K, window, BLOCK_M, BLOCK_N, CAUSAL)
    else:
        lo, full_lo, full_hi, end = _query_ranges(start_n, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    # Query blocks before `lo` and from `end` cannot see any of these keys and are skipped.
    # With GQA each range is walked for each query head of the group in turn: a fixed order.
    # The blocks crossing the diagonal (or the window's edge):
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom,
                                  stride_dod, Lse, Delta, lse_head_stride, DQ, stride_dqh, stride_dqm, stride_dqd,
                                  sm_scale, offs_n, offs_d, in_d, lo, full_lo, N_Q, N_K, diag, qk_scale,
                                  softcap_scale, window, dropout_seed, dropout_threshold, dropout_scale, off_b,
                                  q_head, GROUP, BLOCK_M, CAUSAL, WINDOW, SOFTCAP, DROPOUT, HEAD_DIM < BLOCK_D,
                                  True, DQ_ATOMIC, FP32_DOT)
    # those fully visible:
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom,
                                  stride_dod, Lse, Delta, lse_head_stride, DQ, stride_dqh, stride_dqm, stride_dqd,
                                  sm_scale, offs_n, offs_d, in_d, full_lo, full_hi, N_Q, N_K, diag, qk_scale,
                                  softcap_scale, window, dropout_seed, dropout_threshold, dropout_scale, off_b,
                                  q_head, GROUP, BLOCK_M, CAUSAL, WINDOW, SOFTCAP, DROPOUT, HEAD_DIM < BLOCK_D,
                                  False, DQ_ATOMIC, FP32_DOT)
    # the ragged end of Tq or Tk (or the window's):
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom,
                                  stride_dod, Lse, Delta, lse_head_stride, DQ, stride_dqh, stride_dqm, stride_dqd,
                                  sm_scale, offs_n, offs_d, in_d, full_hi, end, N_Q, N_K, diag, qk_scale,
                                  softcap_scale, window, dropout_seed, dropout_threshold, dropout_scale, off_b,
                                  q_head, GROUP, BLOCK_M, CAUSAL, WINDOW, SOFTCAP, DROPOUT, HEAD_DIM < BLOCK_D,
                                  True, DQ_ATOMIC, FP32_DOT)

    dk *= sm_scale
    tl.store(_tile(DK, offs_n, stride_dkn, offs_d, stride_dkd), dk.to(DK.dtype.element_ty), mask=in_k)
    tl.store(_tile(DV, offs_n, stride_dvn, offs_d, stride_dvd), dv.to(DV.dtype.element_ty), mask=in_k)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,  # dq (BLOCK_M, BLOCK_D) f32; q, do (BLOCK_M, BLOCK_D); lse2, delta (BLOCK_M,)
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,  # this (batch, kv head)'s keys and values
    offs_m, offs_d, in_d, lo, hi, lo2, hi2, N_K, diag, qk_scale,
    softcap_scale, window, dropout_rows, dropout_threshold, dropout_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Accumulate dQ of one query block over key blocks [lo, hi), and with WINDOW and MASKED
    [lo2, hi2) after them (as the forward's inner loop)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    steps_end = hi
    if WINDOW and MASKED:
        steps_end = hi + (hi2 - lo2)
    for start_n in range(lo, steps_end, BLOCK_N):
        if WINDOW and MASKED:
            start_n = tl.where(start_n < hi, start_n, start_n - hi + lo2)
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        in_k = offs_n[:, None] < N_K
        k = _load(_tile(K, offs_n, stride_kn, offs_d, stride_kd), in_k, in_d, MASKED, PAD_D)  # (BLOCK_N, BLOCK_D)
        v = _load(_tile(V, offs_n, stride_vn, offs_d, stride_vd), in_k, in_d, MASKED, PAD_D)  # (BLOCK_N, BLOCK_D)
        qk = dot(q, tl.trans(k), FP32_DOT)  # (BLOCK_M, BLOCK_N)
        if SOFTCAP:
            qk = tanh(qk * softcap_scale)  # kept for the derivative 1 - tanh^2 below
        logits = qk * qk_scale - lse2[:, None]
        if MASKED:
            logits = tl.where(visible(offs_m[:, None], offs_n[None, :], N_K, diag, window, CAUSAL, WINDOW),
                              logits, float("-inf"))
        p = tl.math.exp2(logits)  # (BLOCK_M, BLOCK_N), already normalized
        if SOFTCAP:  # fold the cap's derivative into P now: tanh need not stay live across the next dot
            p = p * (1.0 - qk * qk)
        dp = dot(do, tl.trans(v), FP32_DOT)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            kept = dropout_kept(dropout_rows[:, None], offs_n[None, :], dropout_threshold)
            dp = tl.where(kept, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, FP32_DOT)  # (BLOCK_M, BLOCK_D), scaled by the caller
    return dq


@triton.jit(do_not_specialize=["stride_lse_h", "N_Q", "N_K", "batch_heads", "window", "dropout_seed",
                               "dropout_threshold"])
def _attn_bwd_dq(
    Q, K, V, DO, DQ, Lse, Delta, Cu_seqlens_q, Cu_seqlens_k,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lse_h, H, N_Q, N_K, batch_heads, sm_scale, qk_scale,
    softcap_scale, window, dropout_seed, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, SPLIT_GRID: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Tq, BLOCK_M), B * H), as the forward's
    start_m = tl.program_id(0)
    off_hb = tl.program_id(1)
    if SPLIT_GRID:
        off_hb = split_grid_batch_head(off_hb)
        if off_hb >= batch_heads:
            return
    off_b = (off_hb // H).to(tl.int64)
    off_h = (off_hb % H).to(tl.int64)
    off_kv = off_h
    if GROUP > 1:
        off_kv = off_h // GROUP
    if VARLEN:
        q_start, N_Q = sequence_span(Cu_seqlens_q, off_b)
        k_start, N_K = sequence_span(Cu_seqlens_k, off_b)
        if start_m * BLOCK_M >= N_Q:
            return
        Q += q_start * stride_qm
        DO += q_start * stride_dom
        DQ += q_start * stride_dqm
        K += k_start * stride_kn
        V += k_start * stride_vn
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_kv * stride_kh
    V += off_b * stride_vb + off_kv * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DQ += off_b * stride_dqb + off_h * stride_dqh
    if VARLEN:
        Lse += off_h * stride_lse_h + q_start
        Delta += off_h * stride_lse_h + q_start
    else:
        Lse += off_hb.to(tl.int64) * N_Q
        Delta += off_hb.to(tl.int64) * N_Q

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # Rows past Tq load zeros (LSE and delta too) and produce finite values never stored.
    in_q = offs_m < N_Q
    in_d = offs_d[None, :] < HEAD_DIM
    in_qd = in_q[:, None]
    if HEAD_DIM < BLOCK_D:
        in_qd = in_qd & in_d
    q = tl.load(_tile(Q, offs_m, stride_qm, offs_d, stride_qd), mask=in_qd, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(_tile(DO, offs_m, stride_dom, offs_d, stride_dod), mask=in_qd, other=0.0)
    lse2 = tl.load(Lse + offs_m, mask=in_q, other=0.0)  # (BLOCK_M,)
    delta = tl.load(Delta + offs_m, mask=in_q, other=0.0)  # (BLOCK_M,)
    dropout_rows = None
    if DROPOUT:
        dropout_rows = dropout_row_bits(dropout_seed, off_b, off_h, offs_m)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if WINDOW:
        lo, full_lo, full_hi, hi = _window_key_ranges(start_m, N_Q, N_K, window, BLOCK_M, BLOCK_N, CAUSAL)
        diag = N_K - N_Q
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                offs_m, offs_d, in_d, full_lo, full_hi, None, None, N_K, diag, qk_scale,
                                softcap_scale, window, dropout_rows, dropout_threshold, dropout_scale,
                                BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DROPOUT, HEAD_DIM < BLOCK_D, False, FP32_DOT)
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                offs_m, offs_d, in_d, lo, full_lo, full_hi, hi, N_K, diag, qk_scale,
                                softcap_scale, window, dropout_rows, dropout_threshold, dropout_scale,
                                BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DROPOUT, HEAD_DIM < BLOCK_D, True, FP32_DOT)
    else:
        full_end, end = _key_ranges(start_m, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
        diag = N_K - N_Q
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                offs_m, offs_d, in_d, 0, full_end, None, None, N_K, diag, qk_scale,
                                softcap_scale, window, dropout_rows, dropout_threshold, dropout_scale,
                                BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DROPOUT, HEAD_DIM < BLOCK_D, False, FP32_DOT)
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                offs_m, offs_d, in_d, full_end, end, None, None, N_K, diag, qk_scale,
                                softcap_scale, window, dropout_rows, dropout_threshold, dropout_scale,
                                BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DROPOUT, HEAD_DIM < BLOCK_D, True, FP32_DOT)

    dq *= sm_scale
    tl.store(_tile(DQ, offs_m, stride_dqm, offs_d, stride_dqd), dq.to(DQ.dtype.element_ty), mask=in_qd)


# ---------------------------------------------------------------------------------------
# Launchers: one kernel launch each, given its tensors, the call's options and its _Launch
# ---------------------------------------------------------------------------------------

_PREPROCESS_BLOCK_M = 32 if INTERPRET else 128


class _Launch(NamedTuple):
    """One kernel launch minus its tensors: kernel[grid](tensors, strides, sizes, **options, **meta)."""

    grid: tuple[int, ...]
    # constexprs (HEAD_DIM, BLOCK_D, GROUP, the variant's switches, FP32_DOT, BLOCK_M, BLOCK_N),
    # num_warps, num_stages, and batch_heads (the programs the grid serves, when SPLIT_GRID)
    meta: dict


def _cu_seqlens(packing: Packing | None) -> tuple:
    return (None, None) if packing is None else (packing.cu_seqlens_q, packing.cu_seqlens_k)


def _lse_row(q: torch.Tensor, packing: Packing | None):
    """stride_lse_h: with packed sequences lse is (H, total_q); dense (B, H, Tq) needs none."""
    return None if packing is None else q.shape[0]


def _run_fwd(q, k, v, out, lse, options: Options, packing: Packing | None, launch: _Launch):
    packed = packing is not None
    if launch.meta["TMA"]:
        if not all(map(_descriptor_accepts, (q, k, v, out))):  # the rule of LaunchConfig.tma: else pointers
            launch = launch._replace(meta={**launch.meta, "TMA": False})
        elif q.is_cuda:
            _ensure_allocator()
    _attn_fwd[launch.grid](q, k, v, out, lse, *_cu_seqlens(packing),
                           *strides(q, packed), *strides(k, packed), *strides(v, packed), *strides(out, packed),
                           _lse_row(q, packing), q.shape[1], *lengths(q, k, packing),
                           **arguments(options), **launch.meta)


# Without a GPU, the persistent forward's programs: fewer than the tests' tiles, so that the loop runs.
INTERPRETER_PROGRAMS = 3


def _programs_per_device(device: torch.device) -> int:
    """How many programs a persistent kernel launches: one per streaming multiprocessor."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def _descriptor_accepts(t: torch.Tensor) -> bool:
    """Whether a (B, H, T, D) tensor can be read through a TMA descriptor: head-dim stride 1, the
    other strides positive (not broadcast) and, like the start, 16-byte aligned (a contiguous tensor,
    or views of a fused QKV projection, with head dims that are multiples of 8 in 16-bit). Others
    take the pointer path."""
    size = t.element_size()
    aligned = all(s > 0 and s * size % 16 == 0 for s in t.stride()[:-1])
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and aligned


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need a little global memory per program, which Triton asks
    triton.set_allocator's allocator for at launch. If none is set in this thread (the setting is
    a context variable), set one that takes it from PyTorch's caching allocator; an allocator the
    user set is kept."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_allocator)


def _torch_allocator(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _run_preprocess(out, do, delta, packing: Packing | None, launch: _Launch):
    packed = packing is not None
    _attn_bwd_preprocess[launch.grid](out, do, delta, _cu_seqlens(packing)[0],
                                      *strides(out, packed), *strides(do, packed),
                                      _lse_row(out, packing), out.shape[1], lengths(out, out, packing)[0],
                                      **launch.meta)


def _run_dkdv(q, k, v, do, dk, dv, dq, lse, delta, options: Options, packing: Packing | None, launch: _Launch):
    """dq: the float32 dQ the single-pass backward (DQ_ATOMIC) adds into, zeros before; else None."""
    packed = packing is not None
    dq_strides = (None,) * 4 if dq is None else strides(dq, packed)
    _attn_bwd_dkdv[launch.grid](q, k, v, do, dk, dv, dq, lse, delta, *_cu_seqlens(packing),
                                *strides(q, packed), *strides(k, packed), *strides(v, packed),
                                *strides(do, packed), *strides(dk, packed), *strides(dv, packed), *dq_strides,
                                _lse_row(q, packing), k.shape[1], *lengths(q, k, packing),
                                sm_scale=options.scale, **arguments(options), **launch.meta)


def _run_dq(q, k, v, do, dq, lse, delta, options: Options, packing: Packing | None, launch: _Launch):
    packed = packing is not None
    _attn_bwd_dq[launch.grid](q, k, v, do, dq, lse, delta, *_cu_seqlens(packing),
                              *strides(q, packed), *strides(k, packed), *strides(v, packed),
                              *strides(do, packed), *strides(dq, packed),
                              _lse_row(q, packing), q.shape[1], *lengths(q, k, packing),
                              sm_scale=options.scale, **arguments(options), **launch.meta)


def _empty(shape, dtype, device, nan_fill: bool) -> torch.Tensor:
    """torch.empty, or NaN-filled (Switches.nan_fill) so that tests catch unwritten tiles."""
    if nan_fill:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _lse_shape(q: torch.Tensor, packing: Packing | None) -> tuple[int, ...]:
    """(B, H, Tq), or (H, total_q) for packed sequences (FlashAttention's varlen layout)."""
    return tuple(q.shape[:3]) if packing is None else (q.shape[1], q.shape[0])


def _runs(launch: _Launch) -> bool:
    """Whether a launch has programs (a grid axis of 0, e.g. no queries at all, launches nothing)."""
    return 0 not in launch.grid


def _forward(q, k, v, options: Options, packing: Packing | None, plan: "_Plan"):
    """Launch the forward kernel; returns out (shaped like q) and the base-2 lse, float32 (_lse_shape)."""
    nan_fill = plan.switches.nan_fill
    out = _empty(q.shape, q.dtype, q.device, nan_fill)
    lse = _empty(_lse_shape(q, packing), torch.float32, q.device, nan_fill)
    if out.numel() and _runs(plan.forward):
        _run_fwd(q, k, v, out, lse, options, packing, plan.forward)
    return out, lse


def _backward(do, q, k, v, out, lse, options: Options, packing: Packing | None, plan: "_Plan"):
    """Launch the backward kernels; returns dq, dk, dv shaped like q, k, v.

    Two passes (dK/dV, then dQ), or with options.deterministic False the single pass whose dK/dV
    kernel also adds dQ into a float32 buffer with atomics, then cast to q's dtype (_Plan.backward).
    """
    nan_fill = plan.switches.nan_fill
    if plan.batch * plan.heads == 0:
        return tuple(_empty(t.shape, t.dtype, t.device, nan_fill) for t in (q, k, v))
    preprocess, dkdv, dq_launch = plan.backward if options.deterministic else plan.single_pass_backward
    single_pass = dq_launch is None
    # The single pass adds into dq_sum from many programs, so it starts at zero (never NaN-filled).
    dq_sum = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if single_pass else None
    dq = None if single_pass else _empty(q.shape, q.dtype, q.device, nan_fill)
    dk = _empty(k.shape, k.dtype, k.device, nan_fill)
    dv = _empty(v.shape, v.dtype, v.device, nan_fill)
    delta = _empty(lse.shape, torch.float32, q.device, nan_fill)
    if _runs(preprocess):  # (no queries: nothing to do but the zero dK, dV below)
        _run_preprocess(out, do, delta, packing, preprocess)
    if _runs(dkdv):  # also without queries: it writes the zero gradients
        _run_dkdv(q, k, v, do, dk, dv, dq_sum, lse, delta, options, packing, dkdv)
    if single_pass:
        dq = dq_sum.to(q.dtype)  # (float32 inputs: the buffer itself)
    elif _runs(dq_launch):
        _run_dq(q, k, v, do, dq, lse, delta, options, packing, dq_launch)
    return dq, dk, dv


def _decode(q, k, v, options: Options, packing: Packing | None, plan: "_Plan") -> torch.Tensor:
    """The split-KV decode kernels (kernels/triton_decode.py) with this plan's launch."""
    return triton_decode.decode(q, k, v, options, packing, plan.decode)


# ---------------------------------------------------------------------------------------
# Plans: the launch parameters of one input signature, worked out once
# ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Plan:
    """How to launch the kernels for one input signature: shapes, dtype, device and the variant
    (which of causal, window, softcap and dropout are on; their values come with each call).

    The forward's launch is worked out at the first forward, the backward's at the first
    backward (so inference never tunes a backward kernel), then kept.
    configs: explicit LaunchConfigs per kernel (tests, kernels.compile_check); None takes them
    from the table in kernels/triton_configs.py, or from the tuner when switches.autotune is on.
    """

    batch: int  # B, or the number of packed sequences
    heads: int  # query heads
    kv_heads: int
    q_len: int  # Tq, or max_seqlen_q for packed sequences
    kv_len: int  # Tk, or max_seqlen_k
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    variant: tuple[bool, bool, bool, bool]  # Options.variant: causal, window, softcap, dropout on?
    window: int | None  # sizes the decode kernel's splits (only the keys inside the window are read)
    packed: bool
    switches: triton_runtime.Switches
    configs: dict[str, LaunchConfig] | None = None

    @property
    def causal(self) -> bool:
        return self.variant[0]

    @property
    def length_class(self) -> str:
        """The config class of q_len: "decode" (<= 16), "short", "medium" or "long"."""
        return triton_configs.length_class(self.q_len)

    @property
    def block_d(self) -> int:
        """The head dim the tiles are padded to (a power of two) and the config table is keyed by."""
        return padded_head_dim(self.head_dim)

    @functools.cached_property
    def forward(self) -> _Launch:
        return self._launch("fwd", self._config("fwd"))

    @functools.cached_property
    def backward(self) -> tuple[_Launch, _Launch, _Launch | None]:
        """The preprocess, dK/dV and dQ launches of the deterministic backward: two passes, unless
        a forced dK/dV config has dq_atomic (then that single pass, and no dQ launch)."""
        return self._backward(self._config("dkdv"))

    @functools.cached_property
    def single_pass_backward(self) -> tuple[_Launch, _Launch, None]:
        """deterministic=False: the dK/dV config with dq_atomic (triton_configs.single_pass), which
        adds dQ in with atomics; no dQ launch. A forced config (self.configs) is launched as forced."""
        config = self._config("dkdv")
        return self._backward(config if self.configs is not None else triton_configs.single_pass(config))

    def _backward(self, dkdv: LaunchConfig) -> tuple[_Launch, _Launch, _Launch | None]:
        batch_heads, split_grid = batch_head_grid(self.batch * self.heads)
        preprocess = _Launch((triton.cdiv(self.q_len, _PREPROCESS_BLOCK_M), *batch_heads),
                             {"HEAD_DIM": self.head_dim, "BLOCK_D": self.block_d, "VARLEN": self.packed,
                              "SPLIT_GRID": split_grid, "BLOCK_M": _PREPROCESS_BLOCK_M,
                              "batch_heads": self.batch * self.heads if split_grid else None})
        dq = None if dkdv.dq_atomic else self._launch("dq", self._config("dq"))
        return preprocess, self._launch("dkdv", dkdv), dq

    @functools.cached_property
    def decode(self) -> triton_decode.DecodeLaunch:
        """The split-KV decode kernels' launch (q_len <= MAX_DECODE_Q_LEN, no gradient needed)."""
        config = None if self.configs is None else _supported("decode", self.configs["decode"])
        return triton_decode.decode_launch(
            self.batch, self.heads, self.kv_heads, self.q_len, self.kv_len, self.head_dim, self.dtype,
            self.device, self.variant, self.window, self.packed, config=config,
        )

    def _launch(self, kernel: str, cfg: LaunchConfig) -> _Launch:
        _supported(kernel, cfg)
        # fwd and dq: one program per query block and query head; dkdv: per key block and kv head.
        heads = self.kv_heads if kernel == "dkdv" else self.heads
        blocks = triton.cdiv(self.kv_len, cfg.block_n) if kernel == "dkdv" else triton.cdiv(self.q_len, cfg.block_m)
        batch_heads, split_grid = batch_head_grid(self.batch * heads)
        if cfg.persistent:  # one program per SM (fewer if there are fewer tiles), batch x heads in the loop
            batch_heads, split_grid = (), False
            blocks = max(1, min(_programs_per_device(self.device), blocks * self.batch * heads))
        causal, window, softcap, dropout = self.variant
        meta = dict(HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, GROUP=self.heads // max(self.kv_heads, 1),
                    CAUSAL=causal, WINDOW=window, SOFTCAP=softcap, DROPOUT=dropout, VARLEN=self.packed,
                    SPLIT_GRID=split_grid, FP32_DOT=fp32_dot(self.dtype),
                    BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    batch_heads=self.batch * heads if split_grid or cfg.persistent or cfg.tma else None)
        if kernel == "fwd":
            # Packed sequences end inside the tensors, where a descriptor's bounds cannot stop, and
            # float32's small tiles of full-precision products, which spill with descriptors: pointers.
            tma = cfg.tma and not self.packed and self.dtype != torch.float32
            meta.update(TMA=tma, PERSISTENT=cfg.persistent)
        if kernel == "dkdv":
            meta["DQ_ATOMIC"] = cfg.dq_atomic
        return _Launch((blocks, *batch_heads), meta)

    def _table_config(self, kernel: str) -> tuple[str, LaunchConfig]:
        """The architecture and the committed config (the interpreter's own, without a GPU)."""
        if INTERPRET:
            return "interpreter", triton_configs.INTERPRETER_CONFIGS[kernel]
        arch = triton_configs.arch_of(torch.cuda.get_device_capability(self.device))
        dtype_class = triton_configs.DTYPE_CLASSES[self.dtype]
        return arch, triton_configs.table_config(arch, kernel, dtype_class, self.causal, self.length_class,
                                                 self.block_d)

    @property
    def _plain(self) -> "_Plan":
        """The plain attention of the same sizes (dense, one kv head per query head, no window,
        softcap or dropout): what the tuner times. Every variant takes the plain one's configs."""
        return _Plan(self.batch, self.heads, self.heads, self.q_len, self.kv_len, self.head_dim, self.dtype,
                     self.device, (self.causal, False, False, False), None, False, self.switches)

    def _config(self, kernel: str) -> LaunchConfig:
        if self.configs is not None:
            return self.configs[kernel]
        arch, table_config = self._table_config(kernel)
        if not self.switches.autotune:
            return table_config
        if self.kv_heads != self.heads or self.packed or any(self.variant[1:]):
            return self._plain._config(kernel)
        head_dim, dtype_class, length = self.block_d, triton_configs.DTYPE_CLASSES[self.dtype], self.length_class
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
        B, H, Tq, D = self.batch, self.heads, self.q_len, self.head_dim
        e = SimpleNamespace(options=Options(self.causal, D**-0.5),
                            q=torch.randn(B, H, Tq, D, dtype=self.dtype, device=self.device))
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
            _run_fwd(e.q, e.k, e.v, e.out, e.lse, e.options, None, launch)
        elif kernel == "dkdv":  # (the tuner times two-pass configs: no dQ buffer)
            _run_dkdv(e.q, e.k, e.v, e.do, e.dk, e.dv, None, e.lse, e.delta, e.options, None, launch)
        else:
            _run_dq(e.q, e.k, e.v, e.do, e.dq, e.lse, e.delta, e.options, None, launch)


def _supported(kernel: str, cfg: LaunchConfig) -> LaunchConfig:
    """cfg, if `kernel` implements every variant field it sets; else a one-line ValueError."""
    unsupported = triton_configs.unsupported_variants(kernel, cfg)
    if unsupported:
        raise ValueError(f"cannot launch {kernel} with {cfg.label()}: {'; '.join(unsupported)}")
    return cfg


@functools.cache
def _tuned_configs(directory, device_name: str) -> triton_configs.TunedConfigs:
    return triton_configs.TunedConfigs(triton_configs.tuning_file(directory, device_name, triton.__version__))


SUPPORTED_DTYPES = tuple(triton_configs.DTYPE_CLASSES)
MAX_HEAD_DIM = max(triton_configs.HEAD_DIMS)  # head dims: multiples of 8 up to this (padded to the table's)
_MAX_PLANS = 4096  # decoding adds one signature per kv length
_PLANS: dict[tuple, _Plan] = {}  # a cache: each plan is a pure function of its key


def _check_supported(q: torch.Tensor, k: torch.Tensor, packed: bool) -> None:
    """Raise ValueError for inputs these kernels cannot take.

    Only what is special to these kernels: the shared checks (kernels/checks.py) are not repeated.
    """
    head_dim = q.shape[-1]
    if head_dim % 8 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"triton attention supports head_dim a multiple of 8 from 8 to {MAX_HEAD_DIM}, got {head_dim}; "
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
    if not packed and k.shape[2] == 0:
        raise ValueError("triton attention needs kv_len >= 1")


def _plan_for(q, k, v, options: Options, packing: Packing | None = None) -> _Plan:
    """The plan for these inputs. The first time their signature is seen, the inputs are
    checked (the shared checks, then _check_supported); later calls with it are trusted."""
    switches = triton_runtime.SWITCHES
    bounds = None if packing is None else (packing.max_seqlen_q, packing.max_seqlen_k)
    try:
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
               options.variant, options.window, bounds, switches)
    except AttributeError:  # not tensors: the checks below say so
        key = None
    plan = _PLANS.get(key)
    if plan is None:
        if packing is None:
            check_attention_inputs(q, k, v, options.causal)
            batch, q_len, kv_len = q.shape[0], q.shape[2], k.shape[2]
        else:
            check_varlen_inputs(q, k, v, *packing, options.causal)
            batch, (q_len, kv_len) = packing.sequences, bounds
        _check_supported(q, k, packing is not None)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(batch, q.shape[1], k.shape[1], q_len, kv_len, q.shape[-1], q.dtype, q.device,
                                   options.variant, options.window, packing is not None, switches)
    return plan


def _decodes(q_len: int, options: Options, needs_grad: bool) -> bool:
    """The one routing rule, for eager and traced calls alike: a few new queries against a KV
    cache (q_len <= MAX_DECODE_Q_LEN, max_seqlen_q for packed sequences) that nothing will
    differentiate and that drop nothing go to the split-KV decode kernel; the rest to the
    FlashAttention forward (which saves what the backward needs)."""
    return q_len <= MAX_DECODE_Q_LEN and not needs_grad and options.dropout_p == 0


# ---------------------------------------------------------------------------------------
# The eager path: an autograd.Function straight to the launchers
# ---------------------------------------------------------------------------------------


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, options: Options, packing: Packing | None, plan: _Plan):
        out, lse = _forward(q, k, v, options, packing, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options, ctx.packing, ctx.plan = options, packing, plan
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, ctx.options, ctx.packing, ctx.plan)
        return dq, dk, dv, None, None, None


# ---------------------------------------------------------------------------------------
# The traced path: torch.library custom ops, for torch.compile
# ---------------------------------------------------------------------------------------
# The ops take the options and the packing as separate arguments (a schema has no structs):
# window and softcap None when off; cu_seqlens None for dense inputs.


def _packing(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> Packing | None:
    return None if cu_seqlens_q is None else Packing(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@torch.library.custom_op("gpt_kernels::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
    window: int | None = None, softcap: float | None = None, dropout_p: float = 0.0, dropout_seed: int = 0,
    deterministic: bool = True, cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (shaped like q) in q's dtype, and lse float32 for the backward: (B, H, Tq), or
    (H, total_q) for packed sequences (cu_seqlens given).

    lse is the base-2 log-sum-exp of the scaled (capped, masked) scores: log2(sum_j 2**(s_ij * log2(e)))
    for s = scale * q k^T, i.e. the natural logsumexp times log2(e). deterministic changes nothing
    here: it travels with the forward's inputs to its backward (flash_attn_bwd).
    """
    options = Options(causal, scale, window, softcap, dropout_p, dropout_seed, deterministic)
    packing = _packing(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _forward(q, k, v, options, packing, _plan_for(q, k, v, options, packing))


@flash_attn_fwd.register_fake
def _(q, k, v, causal, scale, window=None, softcap=None, dropout_p=0.0, dropout_seed=0, deterministic=True,
      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    packing = _packing(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_supported(q, k, packing is not None)  # at trace time: fail while compiling, not at the first run
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, packing), dtype=torch.float32)


@torch.library.custom_op("gpt_kernels::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
    window: int | None = None, softcap: float | None = None, dropout_p: float = 0.0, dropout_seed: int = 0,
    deterministic: bool = True, cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, in the inputs' dtype) from the forward's out and lse; deterministic
    False allows the single-pass backward (dQ added with atomics)."""
    options = Options(causal, scale, window, softcap, dropout_p, dropout_seed, deterministic)
    packing = _packing(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _backward(grad_out, q, k, v, out, lse, options, packing, _plan_for(q, k, v, options, packing))


@flash_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *options, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.options, ctx.max_seqlens = options, (max_seqlen_q, max_seqlen_k)
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, grad_out, grad_lse):
    # lse is an auxiliary output for the backward pass; it is not differentiable.
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(grad_out, q, k, v, out, lse, *ctx.options, cu_seqlens_q, cu_seqlens_k,
                                *ctx.max_seqlens)
    return dq, dk, dv, *[None] * 11


flash_attn_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


@torch.library.custom_op("gpt_kernels::flash_attn_decode", mutates_args=())
def flash_attn_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
    window: int | None = None, softcap: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> torch.Tensor:
    """The split-KV decode kernels' out (shaped like q): inference only, q_len <= MAX_DECODE_Q_LEN."""
    options = Options(causal, scale, window, softcap)
    packing = _packing(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _decode(q, k, v, options, packing, _plan_for(q, k, v, options, packing))


@flash_attn_decode.register_fake
def _(q, k, v, causal, scale, window=None, softcap=None, cu_seqlens_q=None, cu_seqlens_k=None,
      max_seqlen_q=0, max_seqlen_k=0):
    _check_supported(q, k, cu_seqlens_q is not None)
    return q.new_empty(q.shape)


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
    window: int | None = None, softcap: float | None = None, dropout_p: float = 0.0, dropout_seed: int = 0,
    deterministic: bool = True,
) -> torch.Tensor:
    """Fused softmax(scale * q k^T [+ masks]) v for q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D).

    Differentiable; any strides are accepted (no copies). Returns (B, Hq, Tq, D) in q's dtype.
    The options mean what kernels.attention says; kernels.attention is the usual way in, and
    validates them (here the inputs are checked the first time their signature is seen).
    deterministic=False lets the backward take the single pass (dQ added with atomics).
    """
    options = Options(causal, scale, window, softcap, dropout_p, dropout_seed, deterministic)
    return _attend(q, k, v, options, None)


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, *, causal: bool, scale: float,
    window: int | None = None, softcap: float | None = None, dropout_p: float = 0.0, dropout_seed: int = 0,
    deterministic: bool = True,
) -> torch.Tensor:
    """attention() over packed sequences, q (total_q, Hq, D), k/v (total_k, Hkv, D), as
    kernels.varlen_attention describes them (which also checks the cu_seqlens' contents)."""
    options = Options(causal, scale, window, softcap, dropout_p, dropout_seed, deterministic)
    return _attend(q, k, v, options, Packing(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


def _attend(q, k, v, options: Options, packing: Packing | None) -> torch.Tensor:
    packed = () if packing is None else tuple(packing)
    if torch.compiler.is_compiling():  # traced: the custom ops, which torch.compile sees through
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        q_len = q.shape[2] if packing is None else packing.max_seqlen_q
        if _decodes(q_len, options, needs_grad):
            return flash_attn_decode(q, k, v, *options[:4], *packed)
        return flash_attn_fwd(q, k, v, *options, *packed)[0]
    plan = _plan_for(q, k, v, options, packing)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttention.apply(q, k, v, options, packing, plan)
    # Nothing to differentiate: skip autograd's bookkeeping.
    if _decodes(plan.q_len, options, needs_grad=False):
        return _decode(q, k, v, options, packing, plan)
    return _forward(q, k, v, options, packing, plan)[0]
