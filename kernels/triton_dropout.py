"""The dropout mask of kernels/dropout.py, computed inside a Triton kernel, bit for bit.

A fused attention kernel calls these per tile, in the forward and again in the backward,
so the mask never exists in memory:

    rows = dropout_row_bits(seed, batch, head, offs_m)            # once per query block
    kept = dropout_kept(rows[:, None], offs_n[None, :], threshold)  # per (BLOCK_M, BLOCK_N) tile
    p = tl.where(kept, p * (1 / (1 - dropout_p)), 0.0)

threshold is kernels.dropout.drop_threshold(dropout_p); offs_m and offs_n are positions
within the (batch row's) sequence. All arithmetic is uint32, where multiplication wraps
around modulo 2**32: exactly what kernels.dropout.hash32 computes in int64 lanes.
"""

from . import triton_runtime  # noqa: F401, I001 (first: without CUDA it switches Triton to its interpreter)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def dropout_hash32(x):
    """kernels.dropout.hash32 on uint32 values."""
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


@triton.jit
def dropout_row_bits(seed, batch, head, query):
    """The hash of (seed, batch, head, query) that every key of a query row continues from (uint32)."""
    bits = dropout_hash32(seed.to(tl.uint32))
    bits = dropout_hash32(bits ^ batch.to(tl.uint32))
    bits = dropout_hash32(bits ^ head.to(tl.uint32))
    return dropout_hash32(bits ^ query.to(tl.uint32))


@triton.jit
def dropout_kept(row_bits, key, threshold):
    """True where the probability of (row, key) survives: the hash is at or above threshold.

    threshold is kernels.dropout.drop_threshold(p), in any integer type that holds its 32 bits
    (the attention kernels pass it as the int32 with those bits): compared as uint32.
    """
    return dropout_hash32(row_bits ^ key.to(tl.uint32)) >= threshold.to(tl.uint32)
