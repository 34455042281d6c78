"""The split-KV decode kernel (kernels/triton_decode.py) against the float64 reference.

Decoding shapes: q_len 1, 3 and 16 against caches of 1, 17, 300 and 1000 keys, in
float32, float16 and bfloat16, causal and not, with strided views as a GPT block and
its KV cache make them. Every result is compared to kernels.reference in float64 with
the rule in tests/tolerances.py. Without CUDA the kernels run through Triton's
interpreter, whose small key blocks make the longer caches span several splits, so the
combine step is exercised; tests that depend on that assert the split count.
"""

import pytest
import torch
from helpers import make_qkv
from tolerances import assert_close_to_reference

from kernels import reference, triton_decode
from kernels.triton_decode import decode_attention, decode_config, decode_split_plan, split_plan

CUDA = torch.cuda.is_available()
# With CUDA the kernels are compiled, and compiled Triton cannot read CPU tensors.
interpreter_only = pytest.mark.skipif(not triton_decode.INTERPRET, reason="compiled Triton needs CUDA tensors")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")
DEVICES = [pytest.param("cpu", marks=interpreter_only), pytest.param("cuda", marks=cuda_only)]


def check_decode(q, k, v, *, causal, scale=None, run=decode_attention):
    """run(q, k, v, causal=, scale=) against float64; returns its output."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = run(q, k, v, causal=causal, scale=scale)
    assert out.dtype == q.dtype and out.device == q.device
    exact = reference.attention(q.double(), k.double(), v.double(), causal=causal, scale=scale)
    baseline = reference.attention(q, k, v, causal=causal, scale=scale, upcast=False)  # the error q's dtype forces
    assert_close_to_reference("out", out, exact, baseline)
    return out


def with_split_size(split_size):
    """A `run` for check_decode that forces split_size keys per split."""

    def run(q, k, v, *, causal, scale):
        num_splits = -(-k.shape[2] // split_size)
        return triton_decode._decode(q, k, v, causal, scale, num_splits, split_size)

    return run


# ---------------------------------------------------------------------------------------
# The split policy
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_len", [1, 15, 16, 17, 300, 1000, 8191])
@pytest.mark.parametrize("batch_heads, programs, block_n", [(1, 8, 16), (2, 8, 16), (8, 264, 64), (64, 264, 64)])
def test_split_plan_covers_the_cache_without_empty_splits(kv_len, batch_heads, programs, block_n):
    num_splits, split_size = split_plan(kv_len, batch_heads, block_n, programs)
    assert split_size % block_n == 0
    assert (num_splits - 1) * split_size < kv_len <= num_splits * split_size  # last split not empty
    # Whole blocks per split can round the count down, but never below half of what was asked.
    wanted = min(max(-(-programs // batch_heads), 1), -(-kv_len // block_n))
    assert wanted / 2 <= num_splits <= wanted


@interpreter_only
@pytest.mark.parametrize("kv_len, splits", [(1, 1), (17, 2), (300, 4), (1000, 4)])
def test_interpreter_caches_span_several_splits(kv_len, splits):
    """The plan the tests below run under: 4 splits for 2 heads once the cache is long."""
    q, k, _ = make_qkv(1, 2, 1, kv_len, 32, dtype=torch.float32, device="cpu")
    assert decode_split_plan(q, k)[0] == splits


# ---------------------------------------------------------------------------------------
# Parity with the float64 reference
# ---------------------------------------------------------------------------------------

# (q_len, kv_len, causal). Causal needs q_len <= kv_len, so the longer queries against a
# 1-key cache run non-causal; the rest of the non-causal cases are a subset.
LENGTHS = [
    (1, 1, True),
    (1, 17, True),
    (1, 300, True),
    (1, 1000, True),
    (3, 17, True),
    (3, 300, True),
    (3, 1000, True),
    (16, 17, True),
    (16, 300, True),
    (16, 1000, True),
    (3, 1, False),
    (16, 1, False),
    (1, 300, False),
    (3, 1000, False),
    (16, 17, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_len, kv_len, causal", LENGTHS)
def test_lengths_float32(device, q_len, kv_len, causal):
    q, k, v = make_qkv(1, 2, q_len, kv_len, 32, dtype=torch.float32, device=device)
    check_decode(q, k, v, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_len, kv_len, causal", [(1, 1000, True), (3, 300, True), (16, 17, True), (16, 300, False)])
def test_16_bit_dtypes(device, dtype, q_len, kv_len, causal):
    q, k, v = make_qkv(1, 2, q_len, kv_len, 64, dtype=dtype, device=device)
    check_decode(q, k, v, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "head_dim, dtype",
    [
        (16, torch.float32),
        (64, torch.float32),
        (128, torch.bfloat16),
        (128, torch.float32),
        (256, torch.float16),
        (256, torch.float32),
    ],
)
def test_head_dims(device, head_dim, dtype):
    q, k, v = make_qkv(1, 1, 3, 100, head_dim, dtype=dtype, device=device)
    check_decode(q, k, v, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_len, kv_len", [(1, 300), (16, 1000)])
def test_several_splits(device, q_len, kv_len):
    """The combine step: the plan splits these caches, and the result is still exact."""
    q, k, v = make_qkv(2, 1, q_len, kv_len, 32, dtype=torch.bfloat16, device=device)
    assert decode_split_plan(q, k)[0] > 1
    check_decode(q, k, v, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_one_key_block_per_split(device, causal):
    """As many splits as key blocks (63 under the interpreter): every split boundary is crossed."""
    q, k, v = make_qkv(1, 1, 3, 1000, 32, dtype=torch.float32, device=device)
    check_decode(
        q, k, v, causal=causal, run=with_split_size(decode_config(32, torch.float32, torch.device("cpu")).block_n)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_rows_that_see_no_key_of_a_split(device):
    """Causal, 16 queries, one key past a block: the last split holds only that key, which
    only the last query sees. The other 15 rows get lse = -inf there and must ignore it."""
    block_n = decode_config(32, torch.float32, torch.device("cpu")).block_n
    q, k, v = make_qkv(1, 2, 16, block_n + 1, 32, dtype=torch.float32, device=device)
    check_decode(q, k, v, causal=True, run=with_split_size(block_n))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_large_logits(device, causal):
    """Scores around 1e4 in float32: the splits' lse values differ by thousands, and the
    combine's weights 2^(lse_s - M) must neither overflow nor lose the largest split."""
    q, k, v = make_qkv(1, 2, 3, 300, 32, dtype=torch.float32, device=device, scale_inputs=50.0, seed=2)
    v = v / 50.0
    assert float((q @ k.transpose(-2, -1)).abs().max()) * 32**-0.5 > 5e3
    check_decode(q, k, v, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
def test_all_equal_scores(device):
    """q = 0 makes every score equal: query i's output is the mean of the values it sees."""
    q, k, v = make_qkv(1, 1, 16, 300, 32, dtype=torch.float32, device=device)
    q = torch.zeros_like(q)
    out = decode_attention(q, k, v, causal=True, scale=1.0)
    seen = torch.arange(300 - 16 + 1, 300 + 1, device=device, dtype=torch.float32)[:, None]  # keys row i sees
    expected = v.cumsum(2)[:, :, 300 - 16 :] / seen
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Layouts, determinism, rejected input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views(device, dtype):
    """q a view of a fused QKV projection; k, v the first kv_len rows of a preallocated
    cache; one of them with head_dim not innermost. No input is contiguous."""
    B, H, Tq, Tk, D = 2, 2, 3, 300, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, Tq, 3 * H * D, generator=g).to(dtype).to(device)
    q = qkv.view(B, Tq, 3, H, D)[:, :, 0].transpose(1, 2)  # (B, H, Tq, D), strides (3HDTq, D, 3HD, 1)
    k = torch.randn(B, H, 512, D, generator=g).to(dtype).to(device)[:, :, :Tk]
    v = torch.randn(B, H, D, 512, generator=g).to(dtype).to(device).transpose(2, 3)[:, :, :Tk]
    assert not any(t.is_contiguous() for t in (q, k, v)) and v.stride(-1) != 1
    check_decode(q, k, v, causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_bit_deterministic(device):
    q, k, v = make_qkv(2, 3, 16, 1000, 32, dtype=torch.bfloat16, device=device)
    assert decode_split_plan(q, k)[0] > 1
    first = check_decode(q, k, v, causal=True, scale=0.2)
    second = decode_attention(q, k, v, causal=True, scale=0.2)
    assert torch.equal(first, second)


def test_long_queries_are_rejected():
    q, k, v = make_qkv(1, 2, 17, 40, 32, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="q_len <= 16, got 17"):
        decode_attention(q, k, v, causal=True, scale=0.2)


# ---------------------------------------------------------------------------------------
# CUDA only: long caches, and one compilation for a whole generation
# ---------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_len", [4096, 8191])
@pytest.mark.parametrize("q_len", [1, 16])
def test_cuda_long_cache_bfloat16(head_dim, kv_len, q_len):
    q, k, v = make_qkv(2, 8, q_len, kv_len, head_dim, dtype=torch.bfloat16, device="cuda")
    assert decode_split_plan(q, k)[0] > 1
    check_decode(q, k, v, causal=True)


@cuda_only
def test_cuda_growing_cache_compiles_nothing_new():
    """After the first call, new cache lengths and query lengths reuse the same binaries."""
    import triton

    q, k, v = make_qkv(1, 8, 1, 100, 64, dtype=torch.bfloat16, device="cuda")
    decode_attention(q, k, v, causal=True, scale=0.125)
    compiled = []

    def count_compilation(*, fn, **kwargs):  # called before Triton compiles a new variant
        compiled.append(fn.name)

    triton.knobs.runtime.jit_cache_hook = count_compilation
    try:
        for kv_len in range(101, 140):
            for q_len in (1, 3, 16):
                q, k, v = make_qkv(1, 8, q_len, kv_len, 64, dtype=torch.bfloat16, device="cuda")
                decode_attention(q, k, v, causal=True, scale=0.125)
    finally:
        triton.knobs.runtime.jit_cache_hook = None
    assert compiled == []
