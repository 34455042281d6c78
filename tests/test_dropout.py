"""The seeded attention-dropout mask (kernels/dropout.py): its definition, the same bits from a
Triton kernel (kernels/triton_dropout.py), its statistics, and how the backends use it."""

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from helpers import REPO, dropout_bits_oracle, dropout_kept_oracle, make_qkv, make_varlen

import kernels
from kernels import dropout, triton_dropout  # without CUDA: switches Triton to its interpreter (warns)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter takes CPU tensors
SEEDS = [0, 1, 12345, 2**31 + 5, 2**32 - 1]


def grid(batch, head, q_len, kv_len, first_query=0, first_key=0):
    """Index tensors that broadcast to a (len(batch), len(head), q_len, kv_len) mask."""
    return (
        torch.as_tensor(batch).view(-1, 1, 1, 1),
        torch.as_tensor(head).view(1, -1, 1, 1),
        torch.arange(first_query, first_query + q_len).view(1, 1, -1, 1),
        torch.arange(first_key, first_key + kv_len).view(1, 1, 1, -1),
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_follows_its_definition(seed, p):
    """Against the definition written again with Python integers, at small and at huge indices
    (where an int64 product would overflow if the multiplier were not below 2**31)."""
    for batch, head, first in (([0, 1], [0, 3], 0), ([70000], [63], 2**31 + 7)):
        mask = dropout.keep_mask(seed, *grid(batch, head, 3, 5, first, first), p)
        for index in torch.cartesian_prod(*(torch.arange(n) for n in mask.shape)).tolist():
            b, h, i, j = index
            expected = dropout_kept_oracle(seed, batch[b], head[h], first + i, first + j, p)
            assert bool(mask[tuple(index)]) == expected, (seed, p, index)


def test_the_threshold_is_exact():
    """A probability whose hash equals the threshold survives; one more unit of p drops it."""
    for seed, index in ((3, (0, 1, 2, 3)), (2**32 - 1, (5, 0, 9, 1))):
        bits = dropout_bits_oracle(seed, *index)
        indices = [torch.tensor(i) for i in index]
        assert bool(dropout.keep_mask(seed, *indices, bits / 2**32))
        assert not bool(dropout.keep_mask(seed, *indices, (bits + 1) / 2**32))


@triton.jit
def _mask_kernel(Kept, seed, batch, head, threshold, Q_LEN: tl.constexpr, KV_LEN: tl.constexpr):
    """One (Q_LEN, KV_LEN) tile of the mask, made the way a fused attention kernel makes it."""
    offs_m = tl.program_id(0) * Q_LEN + tl.arange(0, Q_LEN)
    offs_n = tl.program_id(1) * KV_LEN + tl.arange(0, KV_LEN)
    rows = triton_dropout.dropout_row_bits(seed, batch, head, offs_m)
    kept = triton_dropout.dropout_kept(rows[:, None], offs_n[None, :], threshold)
    tl.store(Kept + offs_m[:, None] * (tl.num_programs(1) * KV_LEN) + offs_n[None, :], kept.to(tl.int8))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_triton_makes_the_same_mask_bit_for_bit(seed, p):
    """What lets a fused kernel drop exactly what the reference drops, in forward and backward."""
    kept = torch.empty(32, 64, dtype=torch.int8, device=DEVICE)
    _mask_kernel[(2, 2)](kept, seed, 3, 5, dropout.drop_threshold(p), Q_LEN=16, KV_LEN=32)
    expected = dropout.keep_mask(seed, *grid([3], [5], 32, 64), p)[0, 0]
    assert torch.equal(kept.bool().cpu(), expected)


def compiled_mask_ptx(arch: int = 90) -> str:
    """The PTX of _mask_kernel for sm_{arch} (run with TRITON_INTERPRET=0: no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"Kept": "*i8", "seed": "i64", "batch": "i32", "head": "i32", "threshold": "i64"}
    source = ASTSource(
        fn=_mask_kernel,
        signature={**signature, "Q_LEN": "constexpr", "KV_LEN": "constexpr"},
        constexprs={"Q_LEN": 16, "KV_LEN": 32},
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}).asm["ptx"]


def test_the_mask_compiles_for_sm90_with_unsigned_shifts():
    """On a GPU the same code compiles, and its right shifts are the logical (unsigned) ones."""
    code = "import test_dropout\nprint(test_dropout.compiled_mask_ptx())\n"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO / "tests", env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shr.u32" in result.stdout and "shr.s32" not in result.stdout


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_a_fraction_p_is_dropped(p):
    kept = dropout.keep_mask(7, *grid(range(2), range(4), 64, 64), p)
    n = kept.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs((1 - kept.double().mean()) - p) < 5 * sigma


@pytest.mark.parametrize("axis", [0, 1, 2, 3], ids=["batch", "head", "query", "key"])
def test_neighbouring_decisions_are_independent(axis):
    """Along every index, two neighbours agree as often as independent coins do: p^2 + (1-p)^2."""
    p = 0.3
    kept = dropout.keep_mask(99, *grid(range(16), range(16), 32, 32), p)
    agree = (kept.narrow(axis, 1, 15 if axis < 2 else 31) == kept.narrow(axis, 0, 15 if axis < 2 else 31)).double()
    expected = p**2 + (1 - p) ** 2
    sigma = (expected * (1 - expected) / agree.numel()) ** 0.5
    assert abs(float(agree.mean()) - expected) < 5 * sigma


def test_seeds_give_different_masks():
    masks = [dropout.keep_mask(seed, *grid([0], [0], 16, 16), 0.5) for seed in SEEDS]
    for a in range(len(masks)):
        for b in range(a):
            assert not torch.equal(masks[a], masks[b])


# ---------------------------------------------------------------------------------------
# Dropout through the API
# ---------------------------------------------------------------------------------------


def test_a_seed_fixes_the_output_and_none_follows_torch_manual_seed():
    q, k, v = make_qkv(2, 2, 6, 6, 8)
    first = kernels.attention(q, k, v, dropout_p=0.4, dropout_seed=5)
    assert torch.equal(kernels.attention(q, k, v, dropout_p=0.4, dropout_seed=5), first)
    assert not torch.equal(kernels.attention(q, k, v, dropout_p=0.4, dropout_seed=6), first)
    torch.manual_seed(0)
    drawn = kernels.attention(q, k, v, dropout_p=0.4)
    again = kernels.attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(0)
    assert torch.equal(kernels.attention(q, k, v, dropout_p=0.4), drawn)
    assert not torch.equal(again, drawn)  # each call draws a new seed


def test_the_backward_uses_the_forwards_mask():
    """gradcheck compares autograd's gradients with finite differences of the forward: it passes
    only if the backward differentiates the very mask the forward applied."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 3, 4, 5, 4, kv_heads=1, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda q, k, v: kernels.attention(q, k, v, dropout_p=0.5, dropout_seed=11, softcap=2.0, window=3), (q, k, v)
    )


def test_query_heads_sharing_a_kv_head_get_their_own_masks():
    """Under GQA the mask is indexed by query head: two identical queries of one group drop differently."""
    q, k, v = make_qkv(1, 2, 6, 6, 8, kv_heads=1)
    q = q[:, :1].expand(1, 2, 6, 8)  # both query heads ask the same questions of the one kv head
    out = kernels.attention(q, k, v, dropout_p=0.5, dropout_seed=1, backend="reference")
    assert not torch.allclose(out[:, 0], out[:, 1])
    plain = kernels.attention(q, k, v, backend="reference")
    torch.testing.assert_close(plain[:, 0], plain[:, 1], rtol=0, atol=0)


def test_packed_sequence_s_drops_like_batch_row_s():
    """varlen_attention counts positions from each sequence's start, and sequence s is batch row s."""
    q, k, v, cq, ck, mq, mk = make_varlen([5, 5, 5], [7, 7, 7], 4, 8, kv_heads=2)
    packed = kernels.varlen_attention(q, k, v, cq, ck, mq, mk, dropout_p=0.3, dropout_seed=8)
    batch = [t.view(3, -1, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]  # 3 sequences as 3 batch rows
    dense = kernels.attention(*batch, dropout_p=0.3, dropout_seed=8)
    torch.testing.assert_close(packed, dense.transpose(1, 2).reshape(15, 4, 8), rtol=1e-6, atol=1e-6)
