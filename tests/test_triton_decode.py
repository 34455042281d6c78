"""The split-KV decode kernel (kernels/triton_decode.py) against the float64 reference.

Decoding shapes: q_len 1, 3 and 16 against caches of 1, 17, 300 and 1000 keys, in
float32, float16 and bfloat16, causal and not, with strided views as a GPT block and
its KV cache make them; grouped-query heads, sliding windows, a softcap, packed
sequences (varlen) and padded head dims. Every result is compared to kernels.reference
in float64 with the rule in tests/tolerances.py. Without CUDA the kernels run through
Triton's interpreter, whose small key blocks make the longer caches span several splits,
so the combine step is exercised; tests that depend on that assert the split count.
Last, the routing: generating text with a KV cache reaches the decode kernel, eagerly and
under torch.compile.
"""

import pytest
import torch
from helpers import make_qkv, make_varlen
from tolerances import assert_close_to_reference

import kernels
from gpt.model import GPT, GPTConfig
from kernels import reference, triton_attention, triton_decode
from kernels.triton_decode import decode_attention, decode_config, decode_split_plan, split_plan

# With CUDA the kernels are compiled, and compiled Triton cannot read CPU tensors.
interpreter_only = pytest.mark.skipif(not triton_decode.INTERPRET, reason="compiled Triton needs CUDA tensors")
DEVICES = [pytest.param("cpu", marks=interpreter_only), pytest.param("cuda", marks=pytest.mark.cuda)]


def check_decode(q, k, v, *, causal, scale=None, run=decode_attention, **options):
    """run(q, k, v, causal=, scale=, **options) against float64; returns its output."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = run(q, k, v, causal=causal, scale=scale, **options)
    assert out.dtype == q.dtype and out.device == q.device
    exact = reference.attention(q.double(), k.double(), v.double(), causal=causal, scale=scale, **options)
    baseline = reference.attention(q, k, v, causal=causal, scale=scale, upcast=False, **options)  # q's dtype's error
    assert_close_to_reference("out", out, exact, baseline)
    return out


def with_split_size(split_size):
    """A `run` for check_decode that forces split_size keys per split."""

    def run(q, k, v, **options):
        return decode_attention(q, k, v, split_size=split_size, **options)

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
# The features: grouped-query heads, windows, softcap, packed sequences, padded head dims
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_heads", [1, 2], ids=["mqa", "gqa"])
@pytest.mark.parametrize("q_len, kv_len, causal", [(1, 300, True), (16, 300, True), (3, 1000, False), (16, 1, False)])
def test_grouped_query_heads(device, kv_heads, q_len, kv_len, causal):
    q, k, v = make_qkv(2, 4, q_len, kv_len, 32, kv_heads=kv_heads, dtype=torch.float32, device=device)
    check_decode(q, k, v, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [1, 15, 16, 17, 40, 5000])
@pytest.mark.parametrize("q_len, causal", [(1, True), (16, True), (5, False)])
def test_windows(device, window, q_len, causal):
    """Windows of one key, around the interpreter's 16-key blocks, over several splits and longer
    than the cache; the splits cover only the keys some query's window reaches."""
    q, k, v = make_qkv(1, 2, q_len, 300, 32, dtype=torch.float32, device=device, seed=window)
    check_decode(q, k, v, causal=causal, window=window)
    for split_size in (16, 48):  # every split boundary next to the window's edge
        check_decode(q, k, v, causal=causal, window=window, run=with_split_size(split_size))
    num_splits, split_size = decode_split_plan(q, k, window)
    block_n = decode_config(32, torch.float32, q.device).block_n  # the splits start at a block's first key
    assert (num_splits - 1) * split_size < min(300, q_len + window - 1 + block_n - 1) <= num_splits * split_size


@interpreter_only
def test_a_window_reads_only_its_keys():
    """With a window of 40, a cache of 8,000 keys is split as a cache of 55 would be: the splits
    cover 2 x 32 keys (from the block holding the first key in the window), not 2 x 4,000."""
    q, k, _ = make_qkv(2, 2, 1, 8000, 32, device="cpu")
    assert decode_split_plan(q, k, window=40) == decode_split_plan(q, k[:, :, :55]) == (2, 32)
    assert decode_split_plan(q, k) == (2, 4000)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap(device, dtype):
    q, k, v = make_qkv(1, 2, 3, 300, 32, dtype=dtype, device=device, scale_inputs=2.0)
    check_decode(q, k, v, causal=True, softcap=2.0)
    check_decode(q, k, v, causal=True, softcap=2.0, window=30)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [8, 24, 80, 200])
def test_padded_head_dims(device, head_dim):
    q, k, v = make_qkv(1, 2, 3, 100, head_dim, kv_heads=1, dtype=torch.bfloat16, device=device)
    check_decode(q, k, v, causal=True, window=20)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_packed_sequences(device, causal):
    """A batch of prompts of different lengths, decoding together: q_len up to 16 per sequence,
    empty sequences, and (causal=False) one with queries but no keys, whose rows are 0."""
    lengths_q = [1, 0, 16, 3, 2]
    lengths_k = [300, 0, 16, 1000, 0 if not causal else 5]
    q, k, v, cu_q, cu_k, max_q, max_k = make_varlen(lengths_q, lengths_k, 4, 32, kv_heads=2, device=device)
    for options in ({}, dict(window=40, softcap=3.0)):
        with torch.no_grad():
            out = kernels.varlen_attention(
                q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, backend="triton", **options
            )
        exact = reference.varlen_attention(
            q.double(), k.double(), v.double(), cu_q, cu_k, max_q, max_k, causal=causal, scale=32**-0.5, **options
        )
        baseline = reference.varlen_attention(
            q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=32**-0.5, upcast=False, **options
        )
        assert_close_to_reference("out", out, exact, baseline)


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
# Routing: which calls reach the decode kernel, eagerly and under torch.compile
# ---------------------------------------------------------------------------------------


class CountedLaunches:
    """Stands in for a JIT kernel and counts its launches: kernel[grid](...)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def decode_launches(monkeypatch):
    """The split kernel's launches (and the FlashAttention forward's, to tell them apart)."""
    counted = {
        "decode": CountedLaunches(triton_decode._decode_split),
        "fwd": CountedLaunches(triton_attention._attn_fwd),
    }
    monkeypatch.setattr(triton_decode, "_decode_split", counted["decode"])
    monkeypatch.setattr(triton_attention, "_attn_fwd", counted["fwd"])
    return counted


@pytest.mark.parametrize("device", DEVICES)
def test_the_routing_rule(device, decode_launches):
    """q_len <= 16 with nothing to differentiate and no dropout: the decode kernel; else the forward."""
    q, k, v = make_qkv(1, 2, 16, 40, 16, device=device)
    with torch.no_grad():
        kernels.attention(q, k, v, backend="triton")
        kernels.attention(q, k, v, window=8, softcap=2.0, backend="triton")
        assert (decode_launches["decode"].launches, decode_launches["fwd"].launches) == (2, 0)
        kernels.attention(torch.cat([q, q], 2), k, v, backend="triton")  # 32 queries
        kernels.attention(q, k, v, dropout_p=0.1, backend="triton")  # training
    kernels.attention(q.requires_grad_(), k, v, backend="triton")  # a gradient to compute
    assert (decode_launches["decode"].launches, decode_launches["fwd"].launches) == (2, 3)


def generate(model, compiled: bool):
    """8 tokens after a 20-token prompt, with the KV cache: the prompt's forward, then 7 steps of 1 query."""
    if compiled:
        torch._dynamo.reset()
        model.hidden_states = torch.compile(model.hidden_states, fullgraph=True, dynamic=True, backend="aot_eager")
    prompt = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(1))
    try:
        return model.generate(prompt, 8, generator=torch.Generator().manual_seed(2))
    finally:
        vars(model).pop("hidden_states", None)


@interpreter_only
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_generating_with_a_cache_decodes_with_the_decode_kernel(compiled, decode_launches, one_thread):
    """Under torch.compile(fullgraph=True) too (the custom op gpt_kernels::flash_attn_decode):
    2 layers x 7 single-query steps are 14 decode launches, the prompt 2 forward launches, and
    the tokens are the eager ones."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, d_model=32, head="full", attn="triton")
    model = GPT(config).eval()
    tokens = generate(model, compiled)
    assert (decode_launches["decode"].launches, decode_launches["fwd"].launches) == (14, 2)
    assert torch.equal(tokens, generate(model, compiled=False))


# ---------------------------------------------------------------------------------------
# CUDA only: long caches, and one compilation for a whole generation
# ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_len", [4096, 8191])
@pytest.mark.parametrize("q_len", [1, 16])
def test_cuda_long_cache_bfloat16(head_dim, kv_len, q_len):
    q, k, v = make_qkv(2, 8, q_len, kv_len, head_dim, dtype=torch.bfloat16, device="cuda")
    assert decode_split_plan(q, k)[0] > 1
    check_decode(q, k, v, causal=True)


@pytest.mark.cuda
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
