"""The fused Triton attention kernel against the float64 reference.

Without CUDA the kernels run through Triton's CPU interpreter, which is slow, so the
cross product of shapes, dtypes and layouts is covered sparsely: a full length/causal
sweep at one head dim and dtype, a head-dim sweep at one length, a dtype sweep at a few
shapes. Every test compares against kernels.reference in float64 with the rule in
tests/tolerances.py. The CUDA cases are the same tests on device="cuda", plus bigger
shapes that only make sense on a GPU, and a run of every autotuning candidate.
"""

import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from helpers import make_qkv, make_varlen
from tolerances import assert_close_to_reference, lse_recompute_atol

import kernels
from kernels import reference, triton_attention, triton_common, triton_configs, triton_runtime  # warns: interpreter
from kernels.triton_common import Options
from kernels.triton_configs import LaunchConfig

# With CUDA the kernels are compiled, and compiled Triton cannot read CPU tensors.
interpreter_only = pytest.mark.skipif(not triton_attention.INTERPRET, reason="compiled Triton needs CUDA tensors")
DEVICES = [pytest.param("cpu", marks=interpreter_only), pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def default_switches(monkeypatch):
    """Every test starts from the default switches (table configs, no NaN fill), whatever
    the environment says: tuning every shape here would take many minutes on a GPU, and
    test_cuda_every_autotune_candidate checks every candidate config instead."""
    monkeypatch.setattr(triton_runtime, "SWITCHES", triton_runtime.Switches())


def attention_and_grads(fn, q, k, v, do, **kwargs):
    """out and (dq, dk, dv) of fn(q, k, v) for output gradient do."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out.detach(), *grads)


def check_against_reference(
    q, k, v, *, causal, scale=None, do=None, triton_fn=None, grad_atol=None, deterministic=True, **options
):
    """Run the Triton backend forward + backward and compare all four results to float64.

    do: the output gradient (default: random); triton_fn(q, k, v, do) -> (out, dq, dk, dv)
    replaces the public entry point; grad_atol(expected_grad) -> float is an extra
    allowance for the gradients (default none); deterministic=False lets the backward take
    its single pass; options: window, softcap, dropout_p and dropout_seed, as
    kernels.attention takes them. Returns the Triton results.
    """
    scale_f = q.shape[-1] ** -0.5 if scale is None else scale
    if do is None:
        do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype).to(q.device)

    if triton_fn is None:
        triton_options = dict(scale=scale, backend="triton", deterministic=deterministic, **options)
        got = attention_and_grads(kernels.attention, q, k, v, do, causal=causal, **triton_options)
    else:
        got = triton_fn(q, k, v, do)
    exact = attention_and_grads(
        reference.attention, *(t.double() for t in (q, k, v, do)), causal=causal, scale=scale_f, **options
    )
    # The same reference in the tested dtype sets how much error that dtype forces.
    baseline = attention_and_grads(
        reference.attention, q, k, v, do, causal=causal, scale=scale_f, upcast=False, **options
    )
    for name, a, e, b in zip(("out", "dq", "dk", "dv"), got, exact, baseline):
        assert a.dtype == q.dtype and a.device == q.device
        extra = grad_atol(e) if grad_atol is not None and name != "out" else 0.0
        assert_close_to_reference(name, a, e, b, extra_atol=extra)
    return got


def check_varlen_against_reference(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic=True, **options
):
    """check_against_reference for packed sequences (kernels.reference.varlen_attention: each
    sequence as its own dense call, sequence s as batch row s of the dropout mask)."""
    packing = dict(
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k
    )
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype).to(q.device)
    got = attention_and_grads(
        kernels.varlen_attention, q, k, v, do, **packing, backend="triton", deterministic=deterministic, **options
    )

    def reference_in(dtype, **extra):
        def attend(q, k, v):
            return reference.varlen_attention(q, k, v, **packing, scale=q.shape[-1] ** -0.5, **options, **extra)

        return attention_and_grads(attend, *(t.to(dtype) for t in (q, k, v, do)))

    exact, baseline = reference_in(torch.float64), reference_in(q.dtype, upcast=False)
    for name, a, e, b in zip(("out", "dq", "dk", "dv"), got, exact, baseline):
        assert a.dtype == q.dtype and a.device == q.device
        assert_close_to_reference(name, a, e, b)
    return got


def check_inference_against_reference(q, k, v, *, causal, **options):
    """The triton backend without gradients (q_len <= 16 takes the decode kernel) against float64."""
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        out = kernels.attention(q, k, v, causal=causal, backend="triton", **options)
        exact = reference.attention(*(t.double() for t in (q, k, v)), causal=causal, scale=scale, **options)
        baseline = reference.attention(q, k, v, causal=causal, scale=scale, upcast=False, **options)
    assert_close_to_reference("out", out, exact, baseline)
    return out


# ---------------------------------------------------------------------------------------
# Parity with the float64 reference
# ---------------------------------------------------------------------------------------

# (Tq, Tk, causal): square lengths around the 16/32 block sizes, decoding (Tq=1 < Tk),
# fewer queries than keys (causal mask offset), and more queries than keys (non-causal).
LENGTHS = [
    (1, 1, True),
    (17, 17, True),
    (17, 17, False),
    (64, 64, True),
    (64, 64, False),
    (100, 100, True),
    (129, 129, True),
    (129, 129, False),
    (1, 64, True),
    (1, 33, False),
    (17, 64, True),
    (17, 64, False),
    (64, 17, False),
    (1, 17, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_len, kv_len, causal", LENGTHS)
def test_lengths_float32(device, q_len, kv_len, causal):
    q, k, v = make_qkv(1, 2, q_len, kv_len, 32, dtype=torch.float32, device=device)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [1, 2, 14, 15, 16, 30, 31, 47])
def test_causal_offsets(device, offset):
    """Tk = Tq + offset shifts the diagonal across the 16/32 blocks the interpreter uses.

    Off-by-one errors in the loop bounds only show when the diagonal lands just beside a
    block edge, so the offsets cover residues -2, -1, 0, 1, 2 modulo 16 and 32.
    """
    q, k, v = make_qkv(1, 1, 40, 40 + offset, 16, dtype=torch.float32, device=device, seed=offset)
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, heads", [(2, 3), (2, 1)])
def test_batch_and_heads(device, batch, heads):
    q, k, v = make_qkv(batch, heads, 40, 40, 16, dtype=torch.float32, device=device, seed=batch * 10 + heads)
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_head_dims_float16(device, head_dim, causal):
    q, k, v = make_qkv(1, 1, 70, 70, head_dim, dtype=torch.float16, device=device)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
def test_head_dim_256(device):
    q, k, v = make_qkv(1, 1, 40, 40, 256, dtype=torch.bfloat16, device=device)
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_len, kv_len, causal", [(100, 100, True), (17, 64, True), (64, 17, False)])
def test_dtypes(device, dtype, q_len, kv_len, causal):
    q, k, v = make_qkv(1, 2, q_len, kv_len, 64, dtype=dtype, device=device)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["fused_qkv", "d_strided"])
def test_non_contiguous_inputs(device, dtype, layout):
    q, k, v = make_qkv(2, 2, 50, 50, 32, dtype=dtype, device=device, layout=layout)
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_output_gradient(device):
    """dO from autograd can have any strides (here: expanded, stride 0 along the sequence)."""
    q, k, v = make_qkv(1, 2, 33, 33, 16, dtype=torch.float32, device=device)
    do = torch.randn(1, 2, 1, 16).to(device).expand(1, 2, 33, 16)
    check_against_reference(q, k, v, causal=True, do=do)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale, causal", [(0.05, True), (1.0, False)])
def test_custom_scale(device, scale, causal):
    q, k, v = make_qkv(1, 2, 45, 45, 32, dtype=torch.float32, device=device)
    check_against_reference(q, k, v, causal=causal, scale=scale)


def with_configs(fwd, dkdv, dq, causal, scale, **options):
    """triton_fn for check_against_reference: the launchers with the given LaunchConfigs."""
    options = Options(causal, scale, **options)

    def run(q, k, v, do):
        plan = dataclasses.replace(
            triton_attention._plan_for(q, k, v, options), configs={"fwd": fwd, "dkdv": dkdv, "dq": dq}
        )
        out, lse = triton_attention._forward(q, k, v, options, None, plan)
        return (out, *triton_attention._backward(do, q, k, v, out, lse, options, None, plan))

    return run


def blocks(m, n):
    return LaunchConfig(m, n, num_warps=4, num_stages=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "fwd, dkdv, dq",
    [
        # Block shapes besides the interpreter's defaults, so that the loop bounds are checked
        # with BLOCK_M < BLOCK_N, BLOCK_M > BLOCK_N and both equal, in every kernel.
        pytest.param(blocks(16, 16), blocks(16, 16), blocks(16, 16), id="equal"),
        pytest.param(blocks(16, 32), blocks(32, 16), blocks(32, 16), id="swapped"),
        pytest.param(blocks(64, 32), blocks(16, 64), blocks(64, 16), id="wide"),
    ],
)
@pytest.mark.parametrize("q_len, kv_len, causal", [(50, 80, True), (83, 50, False)])
def test_block_shapes(device, fwd, dkdv, dq, q_len, kv_len, causal):
    q, k, v = make_qkv(1, 1, q_len, kv_len, 16, dtype=torch.float32, device=device)
    check_against_reference(q, k, v, causal=causal, scale=0.2, triton_fn=with_configs(fwd, dkdv, dq, causal, 0.2))


# Windows around the interpreter's 16/32 blocks: one key, a block minus one, a block, a block
# plus one, two blocks plus one; each against block shapes in both orders.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [1, 15, 16, 17, 33])
@pytest.mark.parametrize(
    "fwd, dkdv, dq",
    [
        pytest.param(None, None, None, id="table"),
        pytest.param(blocks(16, 32), blocks(32, 16), blocks(32, 16), id="swapped"),
    ],
)
@pytest.mark.parametrize("q_len, kv_len, causal", [(50, 80, True), (83, 50, False)])
def test_window_edges(device, window, fwd, dkdv, dq, q_len, kv_len, causal):
    q, k, v = make_qkv(1, 1, q_len, kv_len, 16, dtype=torch.float32, device=device, seed=window)
    triton_fn = None if fwd is None else with_configs(fwd, dkdv, dq, causal, 0.25, window=window)
    check_against_reference(q, k, v, causal=causal, scale=0.25, window=window, triton_fn=triton_fn)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_keys_outside_every_window_are_never_read(device, causal):
    """Key blocks no query's window reaches are skipped, not masked: filled with NaN (which a
    masked load-and-multiply would spread), they leave out, dq, dk and dv exact, and their own
    dk and dv exactly 0. The last 40 queries see keys from 300 - 40 - 24 + 1 = 237 on."""
    q, k, v = make_qkv(1, 2, 40, 300, 16, kv_heads=1, dtype=torch.float32, device=device)
    nan_k, nan_v = k.clone(), v.clone()
    nan_k[:, :, :224], nan_v[:, :, :224] = float("nan"), float("nan")  # 224: the last multiple of 32 below 237
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    clean = check_against_reference(q, k, v, causal=causal, window=24, do=do)
    got = attention_and_grads(kernels.attention, q, nan_k, nan_v, do, causal=causal, window=24, backend="triton")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, clean):
        assert torch.equal(a, b), f"{name} changed when keys outside every window became NaN"
    assert torch.equal(got[2][:, :, :224], torch.zeros_like(got[2][:, :, :224]))
    with torch.no_grad():  # the decode kernel, for the last 16 queries
        out = kernels.attention(q[:, :, -16:], nan_k, nan_v, causal=causal, window=24, backend="triton")
        expected = kernels.attention(q[:, :, -16:], k, v, causal=causal, window=24, backend="triton")
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_heads", [1, 2], ids=["mqa", "gqa"])
@pytest.mark.parametrize("q_len, kv_len, causal", [(40, 40, True), (17, 64, True), (64, 17, False)])
def test_grouped_query_heads(device, kv_heads, q_len, kv_len, causal):
    """4 query heads on 1 or 2 kv heads: dK and dV sum over each kv head's query heads."""
    q, k, v = make_qkv(2, 4, q_len, kv_len, 16, kv_heads=kv_heads, dtype=torch.float32, device=device)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_softcap(device, dtype, causal):
    """Scores up to ~8 under a cap of 2: tanh saturates, and its derivative 1 - tanh^2 nears 0."""
    q, k, v = make_qkv(1, 2, 45, 45, 32, dtype=dtype, device=device, scale_inputs=2.0)
    check_against_reference(q, k, v, causal=causal, softcap=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_drops_exactly_the_references_probabilities(device, p):
    """v = I reads the dropped, rescaled weights out: the same zeros as the reference's mask, for
    probabilities above and below 1/2 (the threshold then passes 2**31), and the gradients too."""
    q, k, _ = make_qkv(2, 2, 20, 16, 16, dtype=torch.float32, device=device)
    v = torch.eye(16, device=device).expand(2, 2, 16, 16)
    options = dict(causal=False, dropout_p=p, dropout_seed=2**32 - 5)
    weights = kernels.attention(q, k, v, backend="triton", **options)
    expected = kernels.attention(q, k, v, backend="reference", **options)
    assert torch.equal(weights == 0, expected == 0)
    assert 0 < int((expected == 0).sum()) < expected.numel()
    check_against_reference(q, k, v.contiguous(), **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [8, 24, 80, 96, 112, 200])
def test_head_dims_padded_to_a_power_of_two(device, head_dim):
    """Head dims that are multiples of 8 but no power of two run on tiles of the next one, the
    padding columns masked (never read, never written): with GQA, a window and a softcap too."""
    q, k, v = make_qkv(1, 2, 40, 40, head_dim, kv_heads=1, dtype=torch.bfloat16, device=device)
    check_against_reference(q, k, v, causal=True)
    check_against_reference(q, k, v, causal=True, window=9, softcap=3.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_packed_sequences_across_block_edges(device, causal):
    """Ragged lengths around the 16/32 blocks, empty and single ones, 4 query heads on 2 kv heads:
    each sequence as its own dense call (kernels.reference in float64), none seeing another."""
    lengths_q = [0, 1, 17, 33, 5, 40]
    lengths_k = [0, 1, 20, 33, 70, 40] if causal else [3, 1, 20, 0, 70, 9]
    packed = make_varlen(lengths_q, lengths_k, 4, 16, kv_heads=2, device=device)
    check_varlen_against_reference(*packed, causal=causal, window=12, softcap=4.0, dropout_p=0.2, dropout_seed=11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_log_sum_exp(device, causal):
    """The saved LSE is the logsumexp of the scaled (masked) scores, in base 2."""
    q, k, v = make_qkv(1, 2, 37, 53, 32, dtype=torch.float32, device=device)
    _, lse2 = torch.ops.gpt_kernels.flash_attn_fwd(q, k, v, causal, 0.3)
    scores = (q.double() @ k.double().transpose(-2, -1)) * 0.3
    if causal:
        scores = scores.masked_fill(~reference.causal_mask(37, 53, device=device), float("-inf"))
    assert lse2.dtype == torch.float32 and lse2.shape == (1, 2, 37)
    expected = torch.logsumexp(scores, dim=-1) / math.log(2)  # the kernel keeps it in base 2
    torch.testing.assert_close(lse2.double(), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Every output element written, determinism, numerically hard inputs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_len, kv_len, causal", [(1, 1, True), (1, 40, True), (47, 47, True), (47, 21, False)])
def test_nan_filled_buffers_are_overwritten(device, q_len, kv_len, causal, monkeypatch):
    """With Switches.nan_fill every output buffer starts as NaN: a skipped tile shows."""
    monkeypatch.setattr(triton_runtime, "SWITCHES", triton_runtime.Switches(nan_fill=True))
    q, k, v = make_qkv(2, 1, q_len, kv_len, 16, dtype=torch.float16, device=device)
    assert triton_attention._plan_for(q, k, v, Options(causal, 0.25)).switches.nan_fill  # reaches the launchers
    assert triton_attention._empty((2,), torch.float32, device, nan_fill=True).isnan().all()
    for name, t in zip(("out", "dq", "dk", "dv"), check_against_reference(q, k, v, causal=causal)):
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kv_heads, options",
    [(2, {}), (1, dict(window=20, softcap=5.0, dropout_p=0.1, dropout_seed=3))],
    ids=["plain", "mqa-window-softcap-dropout"],
)
def test_backward_is_deterministic(device, kv_heads, options):
    """Also when dK and dV sum over a group of query heads: the sum runs in a fixed order."""
    q, k, v = make_qkv(1, 2, 77, 77, 32, kv_heads=kv_heads, dtype=torch.bfloat16, device=device)
    do = torch.randn(q.shape).to(q.dtype).to(device)
    first = attention_and_grads(kernels.attention, q, k, v, do, causal=True, backend="triton", **options)
    second = attention_and_grads(kernels.attention, q, k, v, do, causal=True, backend="triton", **options)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# ---------------------------------------------------------------------------------------
# The single-pass backward (deterministic=False: dQ added with atomics inside the dK/dV pass)
# ---------------------------------------------------------------------------------------


# (batch, q heads, kv heads, Tq, Tk, head dim, dtype, causal, options): every feature the dK/dV
# program's atomic dQ has to get right, lengths off the interpreter's 16/32 blocks.
SINGLE_PASS_CASES = [
    pytest.param(1, 2, 2, 50, 50, 16, torch.float32, True, {}, id="causal"),
    pytest.param(1, 2, 2, 17, 64, 16, torch.float32, True, {}, id="causal-fewer-queries"),
    pytest.param(1, 2, 2, 83, 50, 16, torch.float32, False, {}, id="full-more-queries"),
    pytest.param(2, 4, 1, 40, 40, 16, torch.float32, True, {}, id="mqa"),
    pytest.param(1, 4, 2, 50, 80, 16, torch.float32, True, dict(window=17), id="gqa-window"),
    pytest.param(1, 2, 2, 83, 50, 16, torch.float32, False, dict(window=15), id="full-window"),
    pytest.param(1, 2, 2, 45, 45, 32, torch.bfloat16, False, dict(softcap=2.0), id="softcap-bfloat16"),
    pytest.param(2, 2, 2, 20, 37, 16, torch.float32, False, dict(dropout_p=0.3, dropout_seed=7), id="dropout"),
    pytest.param(1, 2, 1, 40, 40, 80, torch.bfloat16, True, dict(window=9, softcap=3.0), id="padded-d80"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, causal, options", SINGLE_PASS_CASES)
def test_single_pass_backward(device, batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, causal, options):
    """deterministic=False against float64 with the same tolerance as the default backward, and
    dK, dV bit for bit the two-pass ones: the single pass changes only how dQ is summed."""
    q, k, v = make_qkv(batch, heads, q_len, kv_len, head_dim, kv_heads=kv_heads, dtype=dtype, device=device)
    scale = 0.3 if head_dim == 16 else None  # not a power of two: dQ's scaling rounds
    single = check_against_reference(q, k, v, causal=causal, scale=scale, deterministic=False, **options)
    if device == "cpu":  # (the interpreter: the same instructions give the same bits; a GPU's compiler may reorder)
        do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
        two_pass = attention_and_grads(kernels.attention, q, k, v, do, causal=causal, scale=scale, backend="triton",
                                       **options)  # fmt: skip
        assert torch.equal(single[2], two_pass[2]) and torch.equal(single[3], two_pass[3])


@pytest.mark.parametrize("device", DEVICES)
def test_single_pass_backward_of_packed_sequences(device):
    """varlen_attention(deterministic=False): empty, single and ragged sequences, GQA, a window,
    a softcap and dropout; dQ rows of a sequence without keys stay 0."""
    packed = make_varlen([0, 1, 17, 33, 5, 4], [0, 1, 20, 0, 70, 9], 4, 16, kv_heads=2, device=device)
    options = dict(window=12, softcap=4.0, dropout_p=0.2, dropout_seed=11)
    _, dq, _, _ = check_varlen_against_reference(*packed, causal=False, deterministic=False, **options)
    assert torch.equal(dq[18:51], torch.zeros_like(dq[18:51]))  # the 33 queries of the sequence with no keys


def backward_launches(monkeypatch) -> list[str]:
    """Records which backward kernels run: "dkdv" or "dkdv+dq_atomic" for the dK/dV pass, "dq" for the dQ one."""
    launched = []
    run_dkdv, run_dq = triton_attention._run_dkdv, triton_attention._run_dq

    def dkdv(*args):
        launched.append("dkdv+dq_atomic" if args[-1].meta["DQ_ATOMIC"] else "dkdv")
        return run_dkdv(*args)

    def dq(*args):
        launched.append("dq")
        return run_dq(*args)

    monkeypatch.setattr(triton_attention, "_run_dkdv", dkdv)
    monkeypatch.setattr(triton_attention, "_run_dq", dq)
    return launched


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_chooses_the_backward(device, monkeypatch):
    """deterministic=True (the default) launches dK/dV then dQ; False launches the single pass
    and no dQ kernel at all, eagerly, packed, and traced by torch.compile (the custom ops carry it)."""
    launched = backward_launches(monkeypatch)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 20, 20, 16, dtype=torch.float32, device=device))

    def backward(fn, **options):
        launched.clear()
        fn(q, k, v, causal=True, backend="triton", **options).sum().backward()
        return list(launched)

    assert backward(kernels.attention) == backward(kernels.attention, deterministic=True) == ["dkdv", "dq"]
    assert backward(kernels.attention, deterministic=False) == ["dkdv+dq_atomic"]
    torch._dynamo.reset()
    assert backward(torch.compile(kernels.attention, fullgraph=True), deterministic=False) == ["dkdv+dq_atomic"]
    assert backward(torch.compile(kernels.attention, fullgraph=True), deterministic=True) == ["dkdv", "dq"]
    q, k, v, *packing = make_varlen([3, 9], [5, 9], 2, 16, device=device)
    packed = [t.requires_grad_() for t in (q, k, v)] + packing
    launched.clear()
    kernels.varlen_attention(*packed, backend="triton", deterministic=False).sum().backward()
    assert launched == ["dkdv+dq_atomic"]


@pytest.mark.parametrize("device", DEVICES)
def test_a_forced_dq_atomic_config_runs_the_single_pass(device, monkeypatch):
    """A forced dK/dV config with dq_atomic (bench's triton-dq-atomic, the tuner's configs) takes the
    single pass whatever deterministic says; other kernels refuse the field with one line."""
    launched = backward_launches(monkeypatch)
    q, k, v = make_qkv(1, 2, 50, 80, 16, kv_heads=1, dtype=torch.float32, device=device)
    dkdv = blocks(32, 16)._replace(dq_atomic=True)
    triton_fn = with_configs(blocks(16, 32), dkdv, blocks(32, 16), True, 0.2, window=20)
    check_against_reference(q, k, v, causal=True, scale=0.2, window=20, triton_fn=triton_fn)
    assert launched == ["dkdv+dq_atomic"]
    forced = blocks(16, 32)._replace(dq_atomic=True)
    message = "cannot launch fwd with (16, 32, 4, 2)+dq_atomic: LaunchConfig.dq_atomic=True is a dkdv variant"
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        with_configs(forced, dkdv, blocks(32, 16), True, 0.2)(q, k, v, torch.ones_like(q))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_times_heads_beyond_one_grid_axis(device, monkeypatch):
    """Batch x heads above CUDA's 65,535 programs per grid axis spread over axes 1 and 2 (the
    limit lowered to 3 here, so that 2 x 4 = 8 programs take a 3 x 3 grid with one program
    to spare): forward, both backward passes (dK/dV over 2 x 2 kv heads) and decoding."""
    monkeypatch.setattr(triton_common, "GRID_AXIS_LIMIT", 3)
    monkeypatch.setattr(triton_attention, "_PLANS", {})
    q, k, v = make_qkv(2, 4, 40, 40, 16, kv_heads=2, dtype=torch.float32, device=device)
    check_against_reference(q, k, v, causal=True)
    check_against_reference(q, k, v, causal=False, window=7, dropout_p=0.2, dropout_seed=1)
    check_against_reference(q, k, v, causal=True, deterministic=False)
    plan = triton_attention._plan_for(q, k, v, Options(True, 0.25))
    assert plan.forward.grid[1:] == (3, 3) and plan.forward.meta["SPLIT_GRID"]
    assert plan.backward[1].grid[1:] == (2, 2)  # dK/dV: one program per kv head
    with torch.no_grad():
        out = kernels.attention(q[:, :, -3:], k, v, causal=True, backend="triton")
    assert triton_attention._plan_for(q[:, :, -3:], k, v, Options(True, 0.25)).decode.grid[1:] == (3, 3)
    torch.testing.assert_close(out, reference.attention(q[:, :, -3:], k, v, causal=True, scale=0.25))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_large_logits(device, causal):
    """Scores around 1e4 in float32: nothing overflows, and the output meets the usual rule.

    The gradients get the documented allowance for rebuilding P from a float32 LSE.
    """
    q, k, v = make_qkv(1, 2, 40, 40, 16, dtype=torch.float32, device=device, scale_inputs=50.0, seed=2)
    v = v / 50.0
    max_score = float(((q @ k.transpose(-2, -1)) * 16**-0.5).abs().max())
    assert max_score > 5e3
    check_against_reference(
        q, k, v, causal=causal, grad_atol=lambda expected: lse_recompute_atol(max_score, float(expected.abs().max()))
    )


@pytest.mark.parametrize("device", DEVICES)
def test_first_query_sees_only_first_key(device):
    """Causal with Tq == Tk: row 0 has one allowed key, so its output is v[0] and its dq is 0."""
    q, k, v = make_qkv(1, 2, 20, 20, 16, dtype=torch.float32, device=device)
    out, dq, dk, dv = check_against_reference(q, k, v, causal=True)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(dq[:, :, 0], torch.zeros_like(dq[:, :, 0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_all_equal_scores(device, causal):
    """q = 0 makes every score equal: each output row is the mean of the values it sees."""
    _, k, v = make_qkv(1, 1, 35, 35, 32, dtype=torch.float32, device=device)
    q = torch.zeros_like(k)
    out, *_ = check_against_reference(q, k, v, causal=causal)
    counts = torch.arange(1, 36, device=device, dtype=torch.float32)[:, None]
    expected = v.cumsum(2) / counts if causal else v.mean(2, keepdim=True).expand_as(v)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Unsupported inputs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [4, 12, 260, 512])
def test_unsupported_head_dim_is_rejected(head_dim):
    q = torch.randn(1, 1, 4, head_dim)
    with pytest.raises(ValueError, match=f"head_dim a multiple of 8 from 8 to 256, got {head_dim}; use backend="):
        kernels.attention(q, q, q, backend="triton")


def test_unsupported_dtype_is_rejected():
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtypes float32, float16, bfloat16, got torch.float64"):
        kernels.attention(q, q, q, backend="triton")


# ---------------------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["plain", "gqa-window-softcap-dropout-single-pass", "varlen"])
def test_opcheck(device, variant):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch agree, for the
    forward, the backward (also the single pass: deterministic False) and the decode op
    (inference only: inputs that need no gradient)."""
    if variant == "varlen":
        q, k, v, *packing = make_varlen([5, 0, 12], [9, 2, 12], 2, 16, kv_heads=1, device=device)
        options = (True, 0.25, 4, None, 0.0, 0, True, *packing)
    else:
        q, k, v = make_qkv(1, 2, 17, 17, 16, kv_heads=2 if variant == "plain" else 1, device=device)
        options = (True, 0.25) if variant == "plain" else (True, 0.25, 5, 2.5, 0.3, 2**32 - 1, False)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.gpt_kernels.flash_attn_fwd, (*inputs, *options))
    out, lse = torch.ops.gpt_kernels.flash_attn_fwd(*inputs, *options)
    detached = [t.detach() for t in (q, k, v)]
    torch.library.opcheck(
        torch.ops.gpt_kernels.flash_attn_bwd, (torch.randn_like(out), *detached, out.detach(), lse, *options)
    )
    decode_options = options[:4] + options[7:]  # no dropout (a training feature), no backward
    last = (detached[0][:, :, -3:], *detached[1:]) if variant != "varlen" else detached
    torch.library.opcheck(torch.ops.gpt_kernels.flash_attn_decode, (*last, *decode_options))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_without_graph_breaks(device):
    """fullgraph=True fails on any graph break, so this proves the op is traceable.

    Inductor also lowers the backward graph, which calls gpt_kernels::flash_attn_bwd.
    """
    torch._dynamo.reset()

    def block(x, w):
        q, k, v = (x @ w).view(1, 24, 3, 2, 16).unbind(2)
        out = kernels.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, backend="triton")
        return out.transpose(1, 2).reshape(1, 24, 32)

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    x = torch.randn(1, 24, 32, device=device)
    w = torch.randn(32, 96, device=device, requires_grad=True)
    y = compiled(x, w)
    y.sum().backward()
    w_grad, w.grad = w.grad, None
    expected = block(x, w)
    expected.sum().backward()
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(w_grad, w.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kv_heads, options",
    [
        (2, {}),
        (1, dict(window=9, softcap=3.0, dropout_p=0.25, dropout_seed=5)),
        (1, dict(window=9, softcap=3.0, dropout_p=0.25, dropout_seed=5, deterministic=False)),
    ],
    ids=["plain", "mqa-window-softcap-dropout", "mqa-window-softcap-dropout-single-pass"],
)
def test_eager_and_compiled_paths_agree_exactly(device, kv_heads, options):
    """Eager calls take the autograd.Function, traced ones the custom ops: same launchers,
    same configs, so the same bits in the output and all three gradients. (The single pass's
    atomic adds run in program order under the interpreter, so its dQ is repeatable there; on a
    GPU its last bits may differ between any two runs.)"""
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 33, 40, 16, kv_heads=kv_heads, dtype=torch.float32, device=device)
    do = torch.randn(q.shape).to(device)

    def attend(q, k, v):
        return kernels.attention(q, k, v, causal=True, backend="triton", **options)

    eager = attention_and_grads(attend, q, k, v, do)
    compiled = attention_and_grads(torch.compile(attend, fullgraph=True, backend="inductor"), q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), eager, compiled):
        if name == "dq" and device == "cuda" and options.get("deterministic") is False:
            torch.testing.assert_close(a, b)  # atomics on a GPU: the same sum, in some order
        else:
            assert torch.equal(a, b), f"{name} differs between the eager and the compiled path"


@pytest.mark.parametrize("device", DEVICES)
def test_eager_call_skips_the_custom_op_and_checks_once(device, monkeypatch):
    """The eager path goes straight to the launchers, and checks a signature only once."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 1, 19, 19, 16, dtype=torch.float32, device=device))
    checked = []
    monkeypatch.setattr(triton_attention, "check_attention_inputs", lambda *args: checked.append(args))
    monkeypatch.setattr(triton_attention, "_PLANS", {})
    outs = [triton_attention.attention(q, k, v, causal=True, scale=0.25) for _ in range(3)]
    assert len(checked) == 1
    assert type(outs[0].grad_fn).__name__ == "_FlashAttentionBackward"  # not the gpt_kernels op's
    assert torch.equal(outs[0], outs[2])


def test_direct_calls_get_the_shared_checks():
    """triton_attention.attention, called without kernels.attention, still rejects bad inputs."""
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="k has dtype torch.float16 but q has torch.float32"):
        triton_attention.attention(q, q.half(), q.half(), causal=True, scale=0.25)
    with pytest.raises(ValueError, match="q must be a torch.Tensor"):
        triton_attention.attention(1.0, q, q, causal=True, scale=0.25)


@triton.jit
def _to_bfloat16(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, tl.load(X + offs).to(tl.bfloat16))


@interpreter_only
def test_interpreter_rounds_bfloat16_casts_to_nearest_even():
    """float32 -> bfloat16 in a kernel rounds to nearest even, as a GPU's cvt.rn does (Triton's
    interpreter truncates unless kernels.triton_runtime fixes that): bfloat16 results under the
    interpreter then carry a GPU's error, not twice it. Ties and NaN included."""
    x = torch.cat([torch.randn(1000), torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), float("nan")])])
    y = torch.empty(1024, dtype=torch.bfloat16)
    _to_bfloat16[(1,)](torch.nn.functional.pad(x, (0, 20)), y, N=1024)
    expected = x.to(torch.bfloat16)
    assert torch.equal(y[:1000], expected[:1000]) and torch.equal(y[1000:1003], expected[1000:1003])
    assert y[1003].isnan()
    assert not torch.equal(y[:1000], x[:1000].view(torch.int32).bitwise_and(-65536).view(torch.float32).bfloat16())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only switched on automatically without CUDA")
def test_interpreter_works_when_triton_was_imported_first():
    """torch.compile imports triton before kernels.triton_attention can set TRITON_INTERPRET=1."""
    code = (
        "import torch, triton.language, kernels\n"
        "q, k, v = torch.randn(3, 1, 2, 20, 16).unbind(0)\n"
        "out = kernels.attention(q, k, v, causal=True, backend='triton')\n"
        "exact = kernels.reference.attention(q.double(), k.double(), v.double(), causal=True, scale=0.25)\n"
        "torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)\n"
    )
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# CUDA only: bigger shapes, and every autotuning config
# ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_long_sequence_bfloat16(head_dim, causal):
    q, k, v = make_qkv(1, 2, 4096, 4096, head_dim, dtype=torch.bfloat16, device="cuda")
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_training_shape_fused_qkv(dtype):
    q, k, v = make_qkv(4, 12, 1024, 1024, 64, dtype=dtype, device="cuda", layout="fused_qkv")
    check_against_reference(q, k, v, causal=True)


@pytest.mark.cuda
@pytest.mark.parametrize("q_len", [1, 16])
def test_cuda_decoding_long_cache(q_len, monkeypatch):
    """Without gradients, a few queries against a long cache take the split-KV decode kernel."""
    from kernels import triton_decode

    decoded = []
    decode = triton_decode.decode
    monkeypatch.setattr(triton_decode, "decode", lambda *args: decoded.append(1) or decode(*args))
    q, k, v = make_qkv(2, 8, q_len, 3001, 128, kv_heads=2, dtype=torch.bfloat16, device="cuda")
    check_inference_against_reference(q, k, v, causal=True)
    check_inference_against_reference(q, k, v, causal=True, window=1000, softcap=30.0)
    assert decoded == [1, 1]


@pytest.mark.cuda
def test_cuda_batch_times_heads_beyond_one_grid_axis():
    """1,100 x 64 = 70,400 (batch, head) programs: more than CUDA's 65,535 on one grid axis."""
    q, k, v = make_qkv(1100, 64, 32, 32, 16, kv_heads=16, dtype=torch.float16, device="cuda")
    check_against_reference(q, k, v, causal=True)
    check_inference_against_reference(q[:, :, -1:], k, v, causal=True)  # the decode kernel


@pytest.mark.cuda
def test_cuda_every_variant_compiles_once_for_every_value():
    """A new dropout seed, window or softcap value, or length, reuses the variant's binaries: the
    kernels take them as unspecialized arguments."""
    import triton as triton_

    def call(seed, window, softcap, length):
        q, k, v = (
            t.requires_grad_()
            for t in make_qkv(2, 4, length, length, 64, kv_heads=2, device="cuda", dtype=torch.bfloat16)
        )
        out = kernels.attention(
            q, k, v, window=window, softcap=softcap, dropout_p=0.1, dropout_seed=seed, backend="triton"
        )
        out.sum().backward()

    call(1, 64, 30.0, 200)
    compiled = []
    triton_.knobs.runtime.jit_cache_hook = lambda *, fn, **kwargs: compiled.append(fn.name)
    try:
        for seed, window, softcap, length in ((2**31 + 7, 16, 50.0, 333), (2**32 - 1, 1, 1.5, 64), (0, 4096, 7.0, 17)):
            call(seed, window, softcap, length)
    finally:
        triton_.knobs.runtime.jit_cache_hook = None
    assert compiled == []


@pytest.mark.cuda
@pytest.mark.parametrize("features", [(), ("gqa", "window", "softcap", "varlen", "dropout")], ids=["plain", "all"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_features(features, dtype):
    """The compiled variants against float64, at lengths where every kind of block occurs."""
    kv_heads = 2 if "gqa" in features else 8
    options = dict(window=100, softcap=20.0, dropout_p=0.1, dropout_seed=9) if "window" in features else {}
    if "varlen" in features:
        packed = make_varlen([0, 1, 300, 513], [7, 1, 300, 700], 8, 128, kv_heads=kv_heads, dtype=dtype, device="cuda")
        check_varlen_against_reference(*packed, causal=True, **options)
        short = make_varlen([1, 0, 16, 3], [9, 0, 700, 3000], 8, 128, kv_heads=kv_heads, dtype=dtype, device="cuda")
        with torch.no_grad():  # max_seqlen_q 16 without gradients: the decode kernel
            out = kernels.varlen_attention(*short, backend="triton", window=100, softcap=20.0)
            exact = reference.varlen_attention(
                *(t.double() for t in short[:3]), *short[3:], causal=True, scale=128**-0.5, window=100, softcap=20.0
            )
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    else:
        q, k, v = make_qkv(2, 8, 700, 700, 128, kv_heads=kv_heads, dtype=dtype, device="cuda")
        check_against_reference(q, k, v, causal=True, **options)
        check_inference_against_reference(q[:, :, -5:], k, v, causal=True, window=100, softcap=20.0)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim, causal, q_len, kv_len", [(64, True, 300, 300), (128, False, 200, 333)])
def test_cuda_every_autotune_candidate(head_dim, causal, q_len, kv_len):
    """Whatever config the autotuner picks must be correct: run each candidate (ragged lengths)."""
    q, k, v = make_qkv(1, 2, q_len, kv_len, head_dim, dtype=torch.bfloat16, device="cuda")
    arch = triton_configs.arch_of(torch.cuda.get_device_capability())
    fwd, dkdv, dq = (
        triton_configs.candidates(arch, kernel, "16-bit", causal, triton_configs.length_class(q_len), head_dim)
        for kernel in triton_configs.TUNED_KERNELS
    )
    for i in range(max(len(fwd), len(dkdv), len(dq))):
        configs = fwd[i % len(fwd)], dkdv[i % len(dkdv)], dq[i % len(dq)]
        check_against_reference(q, k, v, causal=causal, triton_fn=with_configs(*configs, causal, head_dim**-0.5))


# ---------------------------------------------------------------------------------------
# The forward's variants (LaunchConfig.tma, .persistent): the same attention, every feature
# ---------------------------------------------------------------------------------------

# The interpreter's forward tiles with each variant on (its dK/dV and dQ configs unchanged).
FORWARD_VARIANTS = {
    "tma": triton_configs.INTERPRETER_CONFIGS["fwd"]._replace(tma=True),
    "persistent": triton_configs.INTERPRETER_CONFIGS["fwd"]._replace(persistent=True),
    "tma-persistent": LaunchConfig(16, 32, 4, 1, tma=True, persistent=True),  # BLOCK_M < BLOCK_N too
}


class RecordedLaunches:
    """Stands in for a JIT kernel and keeps the keyword arguments (constexprs included) of its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({"grid": grid, **kwargs})
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def forward_launches(monkeypatch):
    recorded = RecordedLaunches(triton_attention._attn_fwd)
    monkeypatch.setattr(triton_attention, "_attn_fwd", recorded)
    return recorded.launches


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
@pytest.mark.parametrize(
    "case",
    [
        dict(q_len=70, kv_len=70, causal=True, layout="fused_qkv", dtype=torch.bfloat16),
        dict(q_len=37, kv_len=53, causal=True, head_dim=24, kv_heads=1, window=20, softcap=4.0, dropout_p=0.2),
        dict(q_len=53, kv_len=37, causal=False, kv_heads=2, softcap=3.0, dtype=torch.float32),
    ],
    ids=["causal-fused-bf16", "mqa-window-softcap-dropout-d24-fp16", "full-gqa-fp32"],
)
def test_forward_variants_against_float64(device, variant, case, forward_launches):
    """Each variant of the forward, through the interpreter (which runs tensor descriptors): plain
    causal on fused-QKV views, and with every feature on, a padded head dim (the descriptors' bounds
    zero the padding), more keys than queries and fewer. 2 x 4 heads in 16-32-row blocks: more
    tiles than the persistent grid's INTERPRETER_PROGRAMS, so its loop takes several each. float32
    takes the pointer path (its tiles spill with descriptors), 16-bit inputs the descriptors."""
    case = dict(case)
    shape = dict(q_len=case.pop("q_len"), kv_len=case.pop("kv_len"), head_dim=case.pop("head_dim", 16))
    layout, dtype, kv_heads = (
        case.pop("layout", "contiguous"),
        case.pop("dtype", torch.float16),
        case.pop("kv_heads", 4),
    )
    causal = case.pop("causal")
    q, k, v = make_qkv(2, 4, *shape.values(), kv_heads=kv_heads, dtype=dtype, device=device, layout=layout)
    cfg = FORWARD_VARIANTS[variant]
    default = triton_configs.INTERPRETER_CONFIGS
    options = dict(case, dropout_seed=7) if "dropout_p" in case else case
    triton_fn = with_configs(cfg, default["dkdv"], default["dq"], causal, q.shape[-1] ** -0.5, **options)
    check_against_reference(q, k, v, causal=causal, triton_fn=triton_fn, **options)
    (launch,) = forward_launches
    assert launch["TMA"] == (cfg.tma and dtype != torch.float32)  # the descriptors, not a silent fallback
    assert launch["PERSISTENT"] == cfg.persistent
    if cfg.persistent:
        assert launch["grid"] == (triton_attention.INTERPRETER_PROGRAMS,)
        assert triton_attention.INTERPRETER_PROGRAMS < 8 * triton.cdiv(shape["q_len"], cfg.block_m)


@pytest.mark.parametrize("device", DEVICES)
def test_tma_reads_nothing_past_the_tensors_bounds(device, forward_launches):
    """The descriptors are bounded by Tq, Tk and the head dim, not by the memory behind them: keys
    and values that are views of longer, NaN-filled buffers give the same bits as clean copies."""
    q, k, v = make_qkv(1, 2, 45, 45, 24, dtype=torch.bfloat16, device=device)
    poisoned = [torch.full((1, 2, 64, 32), float("nan"), dtype=torch.bfloat16, device=device) for _ in "kv"]
    for buffer, clean in zip(poisoned, (k, v)):
        buffer[:, :, :45, :24] = clean
    k_view, v_view = (buffer[:, :, :45, :24] for buffer in poisoned)  # row stride 32: 64 bytes, aligned
    cfg = FORWARD_VARIANTS["tma"]
    options = Options(True, 0.2)
    plan = dataclasses.replace(triton_attention._plan_for(q, k, v, options), configs={"fwd": cfg})
    clean, _ = triton_attention._forward(q, k, v, options, None, plan)
    viewed, _ = triton_attention._forward(q, k_view, v_view, options, None, plan)
    assert [launch["TMA"] for launch in forward_launches] == [True, True]
    assert torch.equal(clean, viewed)


@pytest.mark.parametrize("device", DEVICES)
def test_tma_takes_the_pointer_path_where_a_descriptor_cannot_read(device, forward_launches):
    """The documented rule: a head-dim stride other than 1, or a stride or start that is not a
    multiple of 16 bytes, runs the same tiles through pointers; packed sequences and float32 always do."""
    cfg = FORWARD_VARIANTS["tma"]
    default = triton_configs.INTERPRETER_CONFIGS
    q, k, v = make_qkv(1, 2, 40, 40, 16, dtype=torch.bfloat16, device=device, layout="d_strided")
    check_against_reference(
        q, k, v, causal=True, triton_fn=with_configs(cfg, default["dkdv"], default["dq"], True, 0.25)
    )
    odd = torch.randn(1, 2, 40, 17, device=device).bfloat16()[..., :16]  # row stride 17 elements: 34 bytes
    assert not triton_attention._descriptor_accepts(odd) and triton_attention._descriptor_accepts(q.contiguous())
    assert not triton_attention._descriptor_accepts(q.contiguous()[:, :1].expand(1, 2, 40, 16))  # broadcast heads
    check_against_reference(
        odd, k, v, causal=True, triton_fn=with_configs(cfg, default["dkdv"], default["dq"], True, 0.25)
    )
    fp32 = [t.float() for t in (q.contiguous(), k, v)]  # aligned, but float32
    assert triton_attention._descriptor_accepts(fp32[0])
    check_against_reference(*fp32, causal=True, triton_fn=with_configs(cfg, default["dkdv"], default["dq"], True, 0.25))
    assert [launch["TMA"] for launch in forward_launches] == [False, False, False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["tma", "tma-persistent"])
def test_forward_variants_on_packed_sequences(device, variant, forward_launches):
    """Packed sequences: the persistent grid's tiles past a short sequence's end are skipped; TMA
    falls back to pointers (a descriptor cannot stop at a sequence's end)."""
    q, k, v, cu_q, cu_k, max_q, max_k = make_varlen(
        [0, 1, 17, 40, 5], [3, 1, 20, 40, 70], 4, 16, kv_heads=2, dtype=torch.float16, device=device
    )
    options = Options(True, 0.25, window=12, softcap=4.0)
    packing = triton_common.Packing(cu_q, cu_k, max_q, max_k)
    plan = triton_attention._plan_for(q, k, v, options, packing)
    plan = dataclasses.replace(plan, configs={"fwd": FORWARD_VARIANTS[variant]})
    out, _ = triton_attention._forward(q, k, v, options, packing, plan)
    exact = reference.varlen_attention(
        q.double(), k.double(), v.double(), cu_q, cu_k, max_q, max_k, causal=True, scale=0.25, window=12, softcap=4.0
    )
    baseline = reference.varlen_attention(
        q, k, v, cu_q, cu_k, max_q, max_k, causal=True, scale=0.25, window=12, softcap=4.0, upcast=False
    )
    assert_close_to_reference("out", out, exact, baseline)
    (launch,) = forward_launches
    assert launch["TMA"] is False and launch["PERSISTENT"] == FORWARD_VARIANTS[variant].persistent


@triton.jit
def _schedule(Start, Head, blocks, batch_heads, TILES: tl.constexpr, CAUSAL: tl.constexpr):
    for tile in range(TILES):
        start_m, off_hb = triton_attention._persistent_tile(tile, blocks, batch_heads, CAUSAL)
        tl.store(Start + tile, start_m)
        tl.store(Head + tile, off_hb)


@interpreter_only
@pytest.mark.parametrize("causal", [True, False])
def test_persistent_schedule_runs_every_tile_once_heaviest_first(causal):
    """5 query blocks x 3 heads: every (block, head) exactly once; with CAUSAL the last query
    blocks (the most keys) first; each round of heads in the other direction than the last."""
    start, head = torch.empty(15, dtype=torch.int32), torch.empty(15, dtype=torch.int32)
    _schedule[(1,)](start, head, 5, 3, TILES=15, CAUSAL=causal)
    assert sorted(zip(start.tolist(), head.tolist())) == [(m, h) for m in range(5) for h in range(3)]
    expected_blocks = [4, 4, 4, 3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0] if causal else sorted([0, 1, 2, 3, 4] * 3)
    assert start.tolist() == expected_blocks
    assert head.tolist() == [0, 1, 2, 2, 1, 0] * 2 + [0, 1, 2]


def test_variants_a_kernel_does_not_have_are_refused():
    q, k, v = make_qkv(1, 1, 20, 20, 16)
    plan = triton_attention._plan_for(q, k, v, Options(True, 0.25))
    plain = triton_configs.INTERPRETER_CONFIGS["dkdv"]
    message = (
        r"cannot launch dkdv with \(16, 32, 4, 1\)\+tma\+persistent: LaunchConfig.tma=True is a fwd variant; "
        r"the dkdv kernel has none; LaunchConfig.persistent=True is a fwd variant; the dkdv kernel has none$"
    )
    with pytest.raises(ValueError, match=message):
        plan._launch("dkdv", plain._replace(tma=True, persistent=True))
    with pytest.raises(ValueError, match=r"LaunchConfig.warp_specialize is not available: Triton's warp-spec"):
        plan._launch("fwd", triton_configs.INTERPRETER_CONFIGS["fwd"]._replace(warp_specialize=True))


def test_the_tma_allocator_is_set_once_and_never_replaces_the_users():
    """Device-side descriptors need Triton's allocator: set when none is, left alone when the user set one."""
    import contextvars

    from triton.runtime import _allocation

    def in_fresh_context(user_allocator):
        if user_allocator is not None:
            triton.set_allocator(user_allocator)
        triton_attention._ensure_allocator()
        return _allocation._allocator.get()

    assert contextvars.Context().run(in_fresh_context, None) is triton_attention._torch_allocator
    mine = lambda size, alignment, stream: None  # noqa: E731
    assert contextvars.Context().run(in_fresh_context, mine) is mine


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["tma-persistent"])
def test_forward_variants_eager_and_compiled_agree_exactly(device, variant, monkeypatch):
    """With a variant as the forward's config, the eager and the torch.compile path give the same bits."""
    monkeypatch.setitem(triton_configs.INTERPRETER_CONFIGS, "fwd", FORWARD_VARIANTS[variant])
    monkeypatch.setattr(triton_attention, "_PLANS", {})
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 33, 40, 16, kv_heads=1, dtype=torch.bfloat16, device=device)
    do = torch.randn(q.shape).to(q.dtype).to(device)

    def attend(q, k, v):
        return kernels.attention(q, k, v, causal=True, backend="triton", window=9, softcap=3.0)

    eager = attention_and_grads(attend, q, k, v, do)
    compiled = attention_and_grads(torch.compile(attend, fullgraph=True, backend="inductor"), q, k, v, do)
    launch = triton_attention._plan_for(q, k, v, Options(True, 0.25, 9, 3.0)).forward
    assert launch.meta["PERSISTENT"] and launch.meta["TMA"]
    for name, a, b in zip(("out", "dq", "dk", "dv"), eager, compiled):
        assert torch.equal(a, b), f"{name} differs between the eager and the compiled path"
