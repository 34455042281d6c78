"""Attention dropout whose mask is a pure function of where each score sits.

Dropout zeroes each attention probability with probability p and scales the survivors by
1 / (1 - p). A fused kernel never stores the (q_len, kv_len) probabilities, so it cannot
store their dropout mask either: it must be able to make the same mask again in the
backward pass. So the mask here comes from no random-number stream at all. Whether
probability (batch, head, query, key) is kept is decided by a hash of those four indices
and a seed:

    bits = hash32(hash32(hash32(hash32(hash32(seed) ^ batch) ^ head) ^ query) ^ key)
    kept = bits >= drop_threshold(p)          # i.e. dropped with probability p

- batch is the batch row (the sequence's index in kernels.varlen_attention), head the
  query head (each query head has its own probabilities, also under GQA), and query and
  key the positions within that row's own sequence, counted from 0.
- hash32 is a bijection of 32-bit unsigned integers (xor-shift and multiply by an odd
  constant, twice: the integer finalizer of Thomas Mueller's hash), so distinct keys of one
  row never collide, and a change in any index changes about half the bits.
- Everything is unsigned 32-bit arithmetic, which a Triton kernel computes natively
  (uint32 multiply wraps around) and PyTorch in int64 lanes reduced modulo 2**32 after each
  multiply. The multiplier is below 2**31, so no int64 product overflows. Both give the
  same bits: tests/test_dropout.py checks it against a Triton kernel, bit for bit.
- A kernel hoists the first four hashes out of its inner loop (they are per program or per
  row), leaving one xor and one hash32 per score.

kernels.reference builds its mask with keep_mask; the fused kernels recompute it per tile.
"""

import torch

UINT32 = 0xFFFFFFFF
SEED_LIMIT = 2**32  # seeds are 32-bit unsigned integers


def hash32(x):
    """Mix the bits of 32-bit unsigned integers (an int64 tensor holding values in [0, 2**32)).

    Written with operators alone, so the same three lines work on Python ints and, as
    uint32, in a Triton kernel (where `& UINT32` changes nothing).
    """
    x = ((x >> 16) ^ x) * 0x45D9F3B & UINT32
    x = ((x >> 16) ^ x) * 0x45D9F3B & UINT32
    return (x >> 16) ^ x


def drop_threshold(p: float) -> int:
    """The 32-bit threshold below which a hash means "dropped": a fraction p of all 2**32 values."""
    return int(p * 2**32)  # p < 1, so this is < 2**32; exact, since 2**32 is a power of two


def keep_mask(
    seed: int, batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor, p: float
) -> torch.Tensor:
    """True where an attention probability survives dropout with probability p.

    batch, head, query, key: integer index tensors that broadcast together, e.g. shapes
    (B, 1, 1, 1), (1, H, 1, 1), (1, 1, Tq, 1), (1, 1, 1, Tk) for a (B, H, Tq, Tk) mask.
    """
    bits = hash32(torch.tensor(seed, dtype=torch.int64, device=batch.device))
    for index in (batch, head, query, key):
        bits = hash32(bits ^ index.to(torch.int64))
    return bits >= drop_threshold(p)


def draw_seed() -> int:
    """A fresh seed from PyTorch's default generator (so torch.manual_seed makes runs repeat)."""
    return int(torch.randint(SEED_LIMIT, (), dtype=torch.int64))
