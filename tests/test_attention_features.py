"""Every attention feature, alone and in every combination, against an independent float64 oracle.

The features: grouped-query attention, a sliding window, a logit softcap, packed
variable-length sequences, causal or not, dropout. All 64 combinations run on the
reference backend (exact in every dtype: tolerances.assert_exact_in_dtype), on triton
(through Triton's interpreter without CUDA) and on sdpa where it can express them (the
ratio rule of tests/tolerances.py), outputs and all three gradients, in float32, float16
and bfloat16. The oracle (tests/helpers.py) loops over every (batch, head, query) and
shares no code with kernels/. Edge cases follow: windows of 1 and longer than the
sequence, MQA, q_len != kv_len, empty and length-1 sequences, head dims 8/80/96/128,
float16 scores beyond float16's range.

The shapes are small (the interpreter runs every program of a launch in Python), but they
cross the interpreter's 16- and 32-row blocks where it matters: tests/test_triton_attention.py
sweeps the triton kernels' block edges with the same oracle.
"""

import itertools
from dataclasses import dataclass

import pytest
import torch
from helpers import attention_oracle, make_qkv, make_varlen, varlen_attention_oracle
from tolerances import assert_close_to_reference, assert_exact_in_dtype

import kernels
from kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FEATURES = ("gqa", "window", "softcap", "varlen", "causal", "dropout")
BACKENDS = ("reference", "sdpa", "triton")  # triton without CUDA: through Triton's interpreter
if torch.cuda.is_available():  # compiled Triton cannot read the CPU tensors these tests make
    BACKENDS = ("reference", "sdpa")


def serving(features) -> tuple[str, ...]:
    """The backends that serve a call with these features (kernels.FEATURES; causal is plain)."""
    needs = set(features) - {"causal"}
    return tuple(backend for backend in BACKENDS if needs <= kernels.FEATURES[backend])


@dataclass
class Case:
    """One call: dense or packed inputs and the options; runs any attention function on them."""

    inputs: tuple  # (q, k, v) or (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    options: dict
    varlen: bool

    def run(self, fn, upcast_inputs=False, **extra):
        """out and the gradients of (q, k, v) under a fixed random output gradient."""
        tensors = [t.detach().double() if upcast_inputs else t.detach() for t in self.inputs[:3]]
        q, k, v = (t.requires_grad_() for t in tensors)
        out = fn(q, k, v, *self.inputs[3:], **self.options, **extra)
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(self.inputs[0].dtype).to(out.dtype)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))

    def oracle(self):
        if self.varlen:
            return self.run(lambda q, k, v, cq, ck, mq, mk, **o: varlen_attention_oracle(q, k, v, cq, ck, **o), True)
        return self.run(attention_oracle, upcast_inputs=True)

    def backend(self, name):
        api = kernels.varlen_attention if self.varlen else kernels.attention
        return self.run(api, backend=name)

    def baseline(self):
        """The reference with every step in the inputs' dtype: the error the dtype forces."""
        fn = reference.varlen_attention if self.varlen else reference.attention
        options = {"scale": self.inputs[0].shape[-1] ** -0.5, **self.options}  # the dispatcher's default
        return Case(self.inputs, options, self.varlen).run(fn, upcast=False)


def make_case(features, dtype, seed=0, **overrides) -> Case:
    """B = 2 (or 4 ragged sequences), 4 query heads (2 kv heads with gqa), 5 queries against 8 keys."""
    features = set(features)
    kv_heads = 2 if "gqa" in features else 4
    options = {"causal": "causal" in features}
    if "window" in features:
        options["window"] = 3
    if "softcap" in features:
        options["softcap"] = 1.5  # scores reach ~3 here, so the cap bends them
    if "dropout" in features:
        options.update(dropout_p=0.3, dropout_seed=1234)
    options.update(overrides)
    if "varlen" in features:
        # an empty sequence, one query against several keys, fewer queries than keys, a long one
        inputs = make_varlen([3, 0, 1, 5], [4, 0, 3, 8], 4, 16, kv_heads=kv_heads, dtype=dtype, seed=seed)
        return Case(inputs, options, varlen=True)
    return Case(make_qkv(2, 4, 5, 8, 16, kv_heads=kv_heads, dtype=dtype, seed=seed), options, varlen=False)


def check(case: Case, backends=BACKENDS):
    """The reference exact in its dtype, the other backends within the ratio rule, for out and grads."""
    exact = case.oracle()
    dtype = case.inputs[0].dtype
    baseline = case.baseline() if dtype != torch.float64 else None
    for backend in backends:
        got = case.backend(backend)
        for name, a, e, b in zip(("out", "dq", "dk", "dv"), got, exact, baseline or exact):
            assert a.dtype == dtype
            if backend == "reference":
                assert_exact_in_dtype(f"reference {name}", a, e)
            else:
                assert_close_to_reference(f"{backend} {name}", a, e, b)


def combination_id(features) -> str:
    return "-".join(features) or "plain"


COMBINATIONS = [tuple(f for f, on in zip(FEATURES, bits) if on) for bits in itertools.product((0, 1), repeat=6)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("features", COMBINATIONS, ids=combination_id)
def test_every_combination(features, dtype):
    case = make_case(features, dtype)
    check(case, backends=serving(features))
    for backend in set(BACKENDS) - set(serving(features)):
        with pytest.raises(ValueError, match=f"not supported by the {backend} backend"):
            case.backend(backend)


@pytest.mark.parametrize("features", [(), ("gqa", "window", "softcap", "dropout", "causal")], ids=combination_id)
def test_float64_reference_matches_the_oracle_to_rounding(features):
    check(make_case(features, torch.float64), backends=("reference",))


# ---------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2, 8, 9, 100])
@pytest.mark.parametrize("causal", [True, False])
def test_windows_from_one_key_to_longer_than_the_sequence(window, causal):
    """window=1 with causal: each query sees itself only. window >= kv_len: no window at all."""
    case = make_case(("gqa",), torch.float32, window=window, causal=causal)
    check(case)
    if window >= 8 + 5:  # longer than any query's distance to key 0: the same as no window
        plain = make_case(("gqa",), torch.float32, causal=causal)
        for backend in BACKENDS:
            torch.testing.assert_close(case.backend(backend)[0], plain.backend(backend)[0], rtol=0, atol=0)


def test_causal_window_of_one_returns_each_querys_own_value():
    q, k, v = make_qkv(1, 2, 6, 6, 8)
    for backend in BACKENDS:
        out = kernels.attention(q, k, v, causal=True, window=1, backend=backend)
        torch.testing.assert_close(out, v, rtol=0, atol=1e-6)


LENGTHS = [(1, 9, True), (4, 9, True), (9, 9, True), (9, 4, False), (1, 1, True)]  # (q_len, kv_len, causal)


@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=lambda h: {1: "mqa", 2: "gqa", 4: "mha"}[h])
@pytest.mark.parametrize("q_len, kv_len, causal", LENGTHS)
def test_head_groupings_and_lengths(kv_heads, q_len, kv_len, causal):
    q, k, v = make_qkv(2, 4, q_len, kv_len, 16, kv_heads=kv_heads, seed=q_len + kv_len)
    check(Case((q, k, v), {"causal": causal}, varlen=False))


def test_gqa_equals_attention_with_the_kv_heads_repeated():
    """Query head h reads kv head h // (Hq // Hkv): the same as repeat_interleave'd k and v."""
    q, k, v = make_qkv(2, 6, 5, 7, 8, kv_heads=2)
    for backend in BACKENDS:
        grouped = kernels.attention(q, k, v, backend=backend)
        repeated = kernels.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), backend=backend)
        torch.testing.assert_close(grouped, repeated)


@pytest.mark.parametrize("head_dim", [8, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dims(head_dim, dtype):
    q, k, v = make_qkv(1, 2, 6, 6, head_dim, kv_heads=1, dtype=dtype)
    check(Case((q, k, v), {"causal": True, "window": 4}, varlen=False))


@pytest.mark.parametrize("causal", [True, False])
def test_ragged_sequences_with_empty_and_length_one(causal):
    lengths = [0, 1, 7, 0, 2, 1]
    case = Case(make_varlen(lengths, lengths, 4, 16, kv_heads=1), {"causal": causal, "window": 2}, varlen=True)
    check(case)


def test_all_sequences_empty():
    q, k, v, cq, ck, mq, mk = make_varlen([0, 0], [0, 0], 2, 8)
    for backend in BACKENDS:
        assert kernels.varlen_attention(q, k, v, cq, ck, mq, mk, backend=backend).shape == (0, 2, 8)


def test_a_sequence_with_queries_but_no_keys_gives_zeros():
    q, k, v, cq, ck, mq, mk = make_varlen([2, 3], [4, 0], 2, 8)
    first = [t.transpose(0, 1)[None] for t in (q[:2], k, v)]  # sequence 0 as a dense (1, H, T, D) call
    for backend in BACKENDS:
        out = kernels.varlen_attention(q, k, v, cq, ck, mq, mk, causal=False, backend=backend)
        assert torch.equal(out[2:], torch.zeros_like(out[2:]))
        dense = kernels.attention(*first, causal=False, backend=backend)
        torch.testing.assert_close(out[:2], dense[0].transpose(0, 1))


def test_varlen_equals_dense_attention_per_sequence():
    """No sequence sees another's keys, and each is aligned bottom-right on its own."""
    q, k, v, cq, ck, mq, mk = make_varlen([3, 5], [6, 5], 4, 16, kv_heads=2)
    for backend in BACKENDS:
        packed = kernels.varlen_attention(q, k, v, cq, ck, mq, mk, window=4, backend=backend)
        for s in range(2):
            q_s, k_s, v_s = (t[c[s] : c[s + 1]].transpose(0, 1)[None] for t, c in ((q, cq), (k, ck), (v, ck)))
            dense = kernels.attention(q_s, k_s, v_s, window=4, backend=backend)[0].transpose(0, 1)
            torch.testing.assert_close(packed[cq[s] : cq[s + 1]], dense)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_seqlen_may_be_an_upper_bound(backend):
    q, k, v, cq, ck, mq, mk = make_varlen([3, 5], [3, 5], 2, 8)
    exact = kernels.varlen_attention(q, k, v, cq, ck, mq, mk, backend=backend)
    assert torch.equal(kernels.varlen_attention(q, k, v, cq, ck, 100, 100, backend=backend), exact)


def test_softcap_bounds_the_scores():
    """With q k^T huge, a softcap of 1 keeps the weights near uniform: exp(+-1) apart at most."""
    q, k, v = make_qkv(1, 1, 4, 4, 8, scale_inputs=30.0, dtype=torch.float64)
    v = torch.eye(4, 8, dtype=torch.float64)[None, None]  # output row = the attention weights
    weights = kernels.attention(q, k, v, causal=False, softcap=1.0, backend="reference")[..., :4]
    assert float((weights.max(-1).values / weights.min(-1).values).max()) <= torch.e**2 + 1e-9  # per row
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 1, 4, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_scores_beyond_its_range(backend):
    """|q.k| up to ~1e5 overflows float16 (max 65,504); scaled by 1/4 the scores fit, so the answer exists."""
    q, k, v = make_qkv(1, 2, 12, 12, 16, dtype=torch.float16, scale_inputs=100.0, seed=3)
    v = v / 100
    assert float((q.float() @ k.float().transpose(-2, -1)).abs().max()) > 65504
    case = Case((q, k, v), {"causal": True}, varlen=False)
    exact, got = case.oracle(), case.backend(backend)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, exact):
        assert torch.isfinite(a).all(), f"{backend} {name} is not finite"
        if backend == "reference":
            assert_exact_in_dtype(f"reference {name}", a, e)
        else:
            assert_close_to_reference(f"{backend} {name}", a, e, case.baseline()[("out", "dq", "dk", "dv").index(name)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_gqa_inputs(backend):
    """A fused projection's strided q/k/v views (fewer k/v heads than q) need no copies to be right."""
    q, k, v = make_qkv(2, 4, 9, 9, 16, kv_heads=2, layout="fused_qkv")
    assert not q.is_contiguous()
    check(Case((q, k, v), {"causal": True, "window": 3}, varlen=False), backends=(backend,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_heads(backend):
    for shape_q, shape_kv in [((0, 4, 5, 8), (0, 2, 5, 8)), ((2, 0, 5, 8), (2, 0, 5, 8))]:
        q = torch.randn(shape_q, requires_grad=True)
        k, v = (torch.randn(shape_kv, requires_grad=True) for _ in "kv")
        out = kernels.attention(q, k, v, window=2, backend=backend)
        assert out.shape == shape_q
        out.sum().backward()
        assert q.grad.shape == shape_q
