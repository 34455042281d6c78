"""The attention API: the causal mask, backend dispatch and input validation."""

import pytest
import torch

import kernels
from kernels.reference import causal_mask

CPU_BACKENDS = ["reference", "sdpa"]  # triton has its own suite (tests/test_triton_attention.py)


def test_causal_mask_square_is_lower_triangular():
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_causal_mask_is_bottom_right_aligned_for_kv_cache():
    # 2 new queries at positions 3 and 4 of a 5-token sequence
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)


def _qkv(q_len=7, kv_len=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, q_len, 16, dtype=dtype, generator=g)
    k = torch.randn(2, 3, kv_len, 16, dtype=dtype, generator=g)
    v = torch.randn(2, 3, kv_len, 16, dtype=dtype, generator=g)
    return q, k, v


def test_reference_matches_explicit_loop():
    """The vectorized reference equals attention computed one query at a time."""
    q, k, v = _qkv(q_len=3, kv_len=5)
    out = kernels.attention(q, k, v, backend="reference")
    for i in range(3):
        visible = i + 5 - 3 + 1  # keys 0..i+2
        scores = q[..., i : i + 1, :] @ k[..., :visible, :].transpose(-2, -1) / 4.0  # 1/sqrt(head_dim 16)
        weights = torch.softmax(scores, dim=-1)  # (2, 3, 1, visible)
        torch.testing.assert_close(out[..., i : i + 1, :], weights @ v[..., :visible, :])


@pytest.mark.parametrize(
    "causal,q_len,kv_len",
    [(True, 7, 7), (True, 1, 9), (True, 3, 9), (False, 7, 7), (False, 3, 9), (False, 9, 3)],
)
def test_sdpa_matches_reference_in_float64(causal, q_len, kv_len):
    q, k, v = _qkv(q_len, kv_len)
    expected = kernels.attention(q, k, v, causal=causal, backend="reference")
    torch.testing.assert_close(kernels.attention(q, k, v, causal=causal, backend="sdpa"), expected)
    torch.testing.assert_close(
        kernels.attention(q, k, v, causal=causal, scale=0.3, backend="sdpa"),
        kernels.attention(q, k, v, causal=causal, scale=0.3, backend="reference"),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_changing_a_key_never_changes_earlier_outputs(backend):
    q, k, v = _qkv(q_len=8, kv_len=8)
    out = kernels.attention(q, k, v, backend=backend)
    t = 5
    k2, v2 = k.clone(), v.clone()
    k2[..., t, :] += 3.0
    v2[..., t, :] -= 3.0
    out2 = kernels.attention(q, k2, v2, backend=backend)
    torch.testing.assert_close(out2[..., :t, :], out[..., :t, :], rtol=0, atol=0)
    assert not torch.allclose(out2[..., t:, :], out[..., t:, :])


def test_auto_resolves_by_device():
    assert kernels.resolve_backend("auto", "cpu") == "sdpa"
    assert kernels.resolve_backend("auto", "cuda") == "triton"
    assert set(kernels.BACKENDS) == {"reference", "sdpa", "triton"}


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda q, k, v: (q[0], k, v), "q must have 4 dims"),
        (lambda q, k, v: (q, k[:1], v[:1]), "agree in (batch, heads)"),
        (lambda q, k, v: (q, k[..., :8], v[..., :8]), "share head_dim"),
        (lambda q, k, v: (q, k, v[:, :, :3]), "k and v must have the same shape"),
        (lambda q, k, v: (q, k.float(), v.float()), "k has dtype torch.float32 but q has torch.float64"),
        (lambda q, k, v: (q, k.long(), v), "k must be a floating-point tensor"),
        (lambda q, k, v: (q, k[:, :, :3], v[:, :, :3]), "causal attention needs q_len <= kv_len"),
    ],
)
def test_bad_input_raises_one_clear_value_error(make, message):
    q, k, v = make(*_qkv())
    with pytest.raises(ValueError) as err:
        kernels.attention(q, k, v, backend="reference")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_mismatched_devices_are_rejected():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        kernels.attention(q, k.to("meta"), v.to("meta"), backend="reference")


def test_unknown_backend_names_the_choices():
    q, k, v = _qkv()
    with pytest.raises(
        ValueError, match="unknown attention backend 'flash'; choose one of reference, sdpa, triton, auto"
    ):
        kernels.attention(q, k, v, backend="flash")
