"""The attention API: masks, backend dispatch, and one-line errors for every bad input.

What each feature computes is checked against a float64 oracle in
tests/test_attention_features.py; the dropout mask in tests/test_dropout.py.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import make_qkv, make_varlen

import kernels
from kernels.reference import causal_mask, visible_keys

CPU_BACKENDS = ["reference", "sdpa"]  # triton has its own suite (tests/test_triton_attention.py)


def test_causal_mask_square_is_lower_triangular():
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_causal_mask_is_bottom_right_aligned_for_kv_cache():
    # 2 new queries at positions 3 and 4 of a 5-token sequence
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)


def test_window_counts_the_keys_a_query_sees_itself_included():
    # queries at positions 2, 3, 4 of 5 keys; window 2: the key itself and the one before
    causal = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(visible_keys(3, 5, causal=True, window=2), causal)
    # without causal the window limits only how far back a query looks
    ahead = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(visible_keys(3, 5, causal=False, window=2), ahead)
    assert torch.equal(visible_keys(3, 5, causal=True, window=100), causal_mask(3, 5))


def test_reference_matches_explicit_loop():
    """The vectorized reference equals attention computed one query at a time."""
    q, k, v = make_qkv(2, 3, 3, 5, 16, dtype=torch.float64)
    out = kernels.attention(q, k, v, backend="reference")
    for i in range(3):
        visible = i + 5 - 3 + 1  # keys 0..i+2
        scores = q[..., i : i + 1, :] @ k[..., :visible, :].transpose(-2, -1) / 4.0  # 1/sqrt(head_dim 16)
        weights = torch.softmax(scores, dim=-1)  # (2, 3, 1, visible)
        torch.testing.assert_close(out[..., i : i + 1, :], weights @ v[..., :visible, :])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_changing_a_key_never_changes_earlier_outputs(backend):
    q, k, v = make_qkv(2, 3, 8, 8, 16, dtype=torch.float64)
    out = kernels.attention(q, k, v, backend=backend)
    t = 5
    k2, v2 = k.clone(), v.clone()
    k2[..., t, :] += 3.0
    v2[..., t, :] -= 3.0
    out2 = kernels.attention(q, k2, v2, backend=backend)
    torch.testing.assert_close(out2[..., :t, :], out[..., :t, :], rtol=0, atol=0)
    assert not torch.allclose(out2[..., t:, :], out[..., t:, :])


def test_the_models_plain_causal_call_is_sdpas_own():
    """The model's call (causal, default scale) reaches SDPA's is_causal path unchanged: same bits."""
    q, k, v = make_qkv(2, 4, 9, 9, 16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(kernels.attention(q, k, v, causal=True, backend="sdpa"), expected)


# ---------------------------------------------------------------------------------------
# Choosing a backend
# ---------------------------------------------------------------------------------------


def test_auto_resolves_by_device():
    assert kernels.resolve_backend("auto", "cpu") == "sdpa"
    assert kernels.resolve_backend("auto", "cuda") == "triton"
    assert set(kernels.BACKENDS) == {"reference", "sdpa", "triton"}
    assert set(kernels.FEATURES) == set(kernels.BACKENDS)
    assert kernels.FEATURES["reference"] == {"gqa", "window", "softcap", "dropout", "varlen"}
    assert kernels.FEATURES["triton"] == kernels.FEATURES["reference"]


@pytest.mark.parametrize(
    "device, needs, chosen",
    [
        ("cpu", set(), "sdpa"),
        ("cpu", {"gqa", "window", "varlen"}, "sdpa"),
        ("cpu", {"softcap"}, "reference"),
        ("cpu", {"window", "dropout"}, "reference"),
        ("cuda", set(), "triton"),
        ("cuda", {"window"}, "triton"),  # the first of triton, sdpa, reference that does windows
        ("cuda", {"gqa", "softcap", "dropout", "varlen"}, "triton"),
    ],
)
def test_auto_takes_the_first_backend_that_can_serve_the_call(device, needs, chosen):
    assert kernels._select_backend("auto", torch.device(device), needs) == chosen


def test_auto_on_cpu_serves_softcap_and_dropout_with_the_reference():
    q, k, v = make_qkv(1, 2, 5, 5, 8)
    options = dict(softcap=2.0, dropout_p=0.2, dropout_seed=3)
    expected = kernels.attention(q, k, v, **options, backend="reference")
    assert torch.equal(kernels.attention(q, k, v, **options), expected)


def test_unknown_backend_names_the_choices():
    q, k, v = make_qkv(1, 1, 4, 4, 8)
    with pytest.raises(
        ValueError, match="unknown attention backend 'flash'; choose one of reference, sdpa, triton, auto"
    ):
        kernels.attention(q, k, v, backend="flash")


# ---------------------------------------------------------------------------------------
# Bad input: one line that names the argument
# ---------------------------------------------------------------------------------------


def one_line_error(call, message: str, error=ValueError):
    with pytest.raises(error) as err:
        call()
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda q, k, v: (q[0], k, v), "q must have 4 dims (batch, heads, seq_len, head_dim)"),
        (lambda q, k, v: (q, k[:1], v[:1]), "q and k must have the same batch size, got q 2 and k 1"),
        (lambda q, k, v: (q, k[:, :4], v[:, :4]), "q's head count must be a multiple of k's"),
        (lambda q, k, v: (q, k[..., :8], v[..., :8]), "share head_dim"),
        (lambda q, k, v: (q, k, v[..., :8]), "k and v must have the same shape (v's head_dim equal to k's)"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), "head_dim must be >= 1"),
        (lambda q, k, v: (q, k.float(), v.float()), "k has dtype torch.float32 but q has torch.float64"),
        (lambda q, k, v: (q, k.long(), v), "k must be a floating-point tensor"),
        (lambda q, k, v: (q, 1.0, v), "k must be a torch.Tensor"),
        (lambda q, k, v: (q, k[:, :, :3], v[:, :, :3]), "causal attention needs q_len <= kv_len"),
    ],
)
@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_bad_tensors(make, message, backend):
    q, k, v = make(*make_qkv(2, 6, 7, 7, 16, dtype=torch.float64))
    one_line_error(lambda: kernels.attention(q, k, v, backend=backend), message)


def test_mismatched_devices_are_rejected():
    q, k, v = make_qkv(1, 1, 4, 4, 8)
    one_line_error(
        lambda: kernels.attention(q, k.to("meta"), v.to("meta"), backend="reference"), "k is on meta but q is on cpu"
    )


BAD_OPTIONS = [
    ({"causal": "no"}, "causal must be True or False, got 'no' (str)"),
    ({"causal": 1}, "causal must be True or False, got 1 (int)"),
    ({"causal": None}, "causal must be True or False"),
    ({"scale": 0.0}, "scale must be a finite number > 0"),
    ({"scale": -0.125}, "scale must be a finite number > 0"),
    ({"scale": float("nan")}, "scale must be a finite number > 0"),
    ({"scale": float("inf")}, "scale must be a finite number > 0"),
    ({"scale": "0.1"}, "scale must be a finite number > 0"),
    ({"scale": True}, "scale must be a finite number > 0"),
    ({"window": 0}, "window must be an int >= 1"),
    ({"window": -4}, "window must be an int >= 1"),
    ({"window": 2.5}, "window must be an int >= 1"),
    ({"window": True}, "window must be an int >= 1"),
    ({"softcap": 0.0}, "softcap must be a finite number > 0"),
    ({"softcap": -30.0}, "softcap must be a finite number > 0"),
    ({"softcap": float("inf")}, "softcap must be a finite number > 0"),
    ({"softcap": float("nan")}, "softcap must be a finite number > 0"),
    ({"dropout_p": -0.1}, "dropout_p must be a number in [0, 1)"),
    ({"dropout_p": 1.0}, "dropout_p must be a number in [0, 1)"),
    ({"dropout_p": float("nan")}, "dropout_p must be a number in [0, 1)"),
    ({"dropout_p": True}, "dropout_p must be a number in [0, 1)"),
    ({"dropout_p": 0.1, "dropout_seed": -1}, "dropout_seed must be an int in [0, 2**32)"),
    ({"dropout_p": 0.1, "dropout_seed": 2**32}, "dropout_seed must be an int in [0, 2**32)"),
    ({"dropout_p": 0.1, "dropout_seed": 1.5}, "dropout_seed must be an int in [0, 2**32)"),
    ({"deterministic": "no"}, "deterministic must be True (bit-identical gradients run to run) or False"),
    ({"deterministic": 0}, "got 0 (int)"),
    ({"deterministic": None}, "deterministic must be True"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS)
@pytest.mark.parametrize("backend", [*kernels.BACKENDS, "auto"])
def test_bad_options_on_every_backend(options, message, backend):
    """Checked once by the dispatcher, so every backend refuses them alike (sdpa no longer
    returns NaN for scale <= 0 on the CPU, and no backend takes causal="no" as True)."""
    q, k, v = make_qkv(1, 2, 4, 4, 16)
    one_line_error(lambda: kernels.attention(q, k, v, backend=backend, **options), message)
    packed = make_varlen([2, 2], [2, 2], 2, 16)
    one_line_error(lambda: kernels.varlen_attention(*packed, backend=backend, **options), message)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reference_and_sdpa_ignore_deterministic(backend):
    """deterministic=False allows a nondeterministic backward; these backends have no other one to
    take, so the output and the gradients are the default call's, bit for bit (dense and packed)."""

    def grads(fn, *inputs, **options):
        leaves = [t.detach().requires_grad_() for t in inputs[:3]]
        out = fn(*leaves, *inputs[3:], backend=backend, **options)
        return (out, *torch.autograd.grad(out, leaves, torch.ones_like(out)))

    dense = make_qkv(1, 4, 9, 9, 16, kv_heads=2)
    packed = make_varlen([3, 5], [4, 5], 2, 16)
    for fn, inputs in ((kernels.attention, dense), (kernels.varlen_attention, packed)):
        for a, b in zip(grads(fn, *inputs), grads(fn, *inputs, deterministic=False)):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"softcap": 30.0}, "softcap= is not supported by the sdpa backend; use backend='reference'"),
        ({"dropout_p": 0.1}, "dropout_p > 0 is not supported by the sdpa backend; use backend='reference'"),
    ],
)
def test_what_sdpa_cannot_express_is_refused(options, message):
    q, k, v = make_qkv(1, 2, 4, 4, 16)
    one_line_error(lambda: kernels.attention(q, k, v, backend="sdpa", **options), message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors need the interpreter")
@pytest.mark.parametrize("head_dim", [12, 264])
def test_head_dims_triton_cannot_take_are_refused(head_dim):
    q, k, v = make_qkv(1, 2, 4, 4, head_dim, kv_heads=1)
    one_line_error(
        lambda: kernels.attention(q, k, v, backend="triton", window=2),
        f"triton attention supports head_dim a multiple of 8 from 8 to 256, got {head_dim}; "
        "use backend='sdpa' or 'reference' for other sizes",
    )


def _with(packed, **changes):
    """The packed inputs (q, k, v, cu_q, cu_k, max_q, max_k) with some replaced, by name."""
    names = ("q", "k", "v", "cu_q", "cu_k", "max_q", "max_k")
    return [changes.get(name, value) for name, value in zip(names, packed)]


def _cu(*values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"q": torch.randn(1, 7, 2, 8)}, "q must have 3 dims (total_tokens, heads, head_dim)"),
        ({"k": torch.randn(9, 3, 8), "v": torch.randn(9, 3, 8)}, "q's head count must be a multiple of k's"),
        ({"cu_q": [0, 3, 7]}, "cu_seqlens_q must be a torch.Tensor of int32, got list"),
        ({"cu_q": _cu(0, 3, 7).long()}, "cu_seqlens_q must be int32 (FlashAttention's convention), got torch.int64"),
        ({"cu_k": _cu(0, 3, 9)[None]}, "cu_seqlens_k must be 1-D with batch + 1 entries"),
        ({"cu_k": _cu()}, "cu_seqlens_k must be 1-D with batch + 1 entries"),
        ({"cu_q": _cu(0, 3, 7).to("meta")}, "cu_seqlens_q is on meta but q is on cpu"),
        ({"cu_q": _cu(0, 7)}, "cu_seqlens_q and cu_seqlens_k must have one entry per sequence plus one each"),
        ({"cu_q": _cu(1, 3, 7)}, "cu_seqlens_q must start at 0, got 1"),
        ({"cu_k": _cu(0, 10, 9)}, "cu_seqlens_k must be non-decreasing"),
        ({"cu_q": _cu(0, 3, 6)}, "cu_seqlens_q ends at 6 but q holds 7 tokens (q.shape[0])"),
        ({"cu_k": _cu(0, 3, 10)}, "cu_seqlens_k ends at 10 but k holds 9 tokens (k.shape[0])"),
        ({"max_q": 3}, "max_seqlen_q must be an int >= the longest sequence in cu_seqlens_q (4), got 3"),
        ({"max_k": 6.0}, "max_seqlen_k must be an int >= the longest sequence in cu_seqlens_k (6), got 6.0"),
        (
            {"cu_q": _cu(0, 4, 7), "cu_k": _cu(0, 3, 9)},
            "causal attention needs each sequence's q length <= its k length (the mask is aligned bottom-right), "
            "but sequence 0 has 4 queries and 3 keys",
        ),
    ],
)
def test_bad_packed_sequences(changes, message):
    packed = make_varlen([3, 4], [3, 6], 2, 8)  # cu_seqlens_q [0, 3, 7], cu_seqlens_k [0, 3, 9]
    one_line_error(lambda: kernels.varlen_attention(*_with(packed, **changes), backend="reference"), message)


# ---------------------------------------------------------------------------------------
# The triton backend through the new API (its own suite: tests/test_triton_attention.py)
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors need the interpreter")
def test_triton_plain_call_matches_the_reference():
    q, k, v = make_qkv(1, 2, 20, 24, 16)
    expected = kernels.attention(q.double(), k.double(), v.double(), scale=0.3, backend="reference")
    out = kernels.attention(q, k, v, causal=True, scale=0.3, backend="triton")
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors need the interpreter")
@pytest.mark.parametrize("q_len", [5, 40], ids=["decode-kernel", "forward-kernel"])
@pytest.mark.parametrize("shape", [(0, 2), (2, 0)], ids=["batch-0", "heads-0"])
def test_triton_empty_batch_or_heads_gives_an_empty_result(shape, q_len):
    for grad in (False, True):
        q, k, v = (torch.randn(*shape, t, 16, requires_grad=grad) for t in (q_len, 50, 50))
        out = kernels.attention(q, k, v, causal=True, backend="triton")
        assert out.shape == q.shape
        if grad:
            out.sum().backward()
            assert q.grad.shape == q.shape and k.grad.shape == k.shape
