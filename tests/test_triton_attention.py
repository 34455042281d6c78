"""The fused Triton attention kernel against the float64 reference.

Without CUDA the kernels run through Triton's CPU interpreter, which is slow, so the
cross product of shapes, dtypes and layouts is covered sparsely: a full length/causal
sweep at one head dim and dtype, a head-dim sweep at one length, a dtype sweep at a few
shapes. Every test compares against kernels.reference in float64 with the rule in
tests/tolerances.py. The CUDA cases are the same tests on device="cuda", plus bigger
shapes that only make sense on a GPU, and a run of every autotuning candidate.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from helpers import make_qkv
from tolerances import assert_close_to_reference, lse_recompute_atol

import kernels
from kernels import reference, triton_attention, triton_configs, triton_runtime  # without CUDA: warns (interpreter)
from kernels.triton_configs import LaunchConfig

CUDA = torch.cuda.is_available()
# With CUDA the kernels are compiled, and compiled Triton cannot read CPU tensors.
interpreter_only = pytest.mark.skipif(not triton_attention.INTERPRET, reason="compiled Triton needs CUDA tensors")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")
DEVICES = [pytest.param("cpu", marks=interpreter_only), pytest.param("cuda", marks=cuda_only)]


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


def check_against_reference(q, k, v, *, causal, scale=None, do=None, triton_fn=None, grad_atol=None):
    """Run the Triton backend forward + backward and compare all four results to float64.

    do: the output gradient (default: random); triton_fn(q, k, v, do) -> (out, dq, dk, dv)
    replaces the public entry point; grad_atol(expected_grad) -> float is an extra
    allowance for the gradients (default none). Returns the Triton results.
    """
    scale_f = q.shape[-1] ** -0.5 if scale is None else scale
    if do is None:
        do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype).to(q.device)

    if triton_fn is None:
        got = attention_and_grads(kernels.attention, q, k, v, do, causal=causal, scale=scale, backend="triton")
    else:
        got = triton_fn(q, k, v, do)
    exact = attention_and_grads(reference.attention, *(t.double() for t in (q, k, v, do)), causal=causal, scale=scale_f)
    # The same reference in the tested dtype sets how much error that dtype forces.
    baseline = attention_and_grads(reference.attention, q, k, v, do, causal=causal, scale=scale_f, upcast=False)
    for name, a, e, b in zip(("out", "dq", "dk", "dv"), got, exact, baseline):
        assert a.dtype == q.dtype and a.device == q.device
        extra = grad_atol(e) if grad_atol is not None and name != "out" else 0.0
        assert_close_to_reference(name, a, e, b, extra_atol=extra)
    return got


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


def with_configs(fwd, dkdv, dq, causal, scale):
    """triton_fn for check_against_reference: the launchers with the given LaunchConfigs."""

    def run(q, k, v, do):
        plan = triton_attention._Plan(
            q.shape,
            k.shape[2],
            q.dtype,
            q.device,
            causal,
            triton_runtime.Switches(),
            configs={"fwd": fwd, "dkdv": dkdv, "dq": dq},
        )
        out, lse = triton_attention._forward(q, k, v, scale, plan)
        return (out, *triton_attention._backward(do, q, k, v, out, lse, scale, plan))

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
    assert triton_attention._plan_for(q, k, v, causal).switches.nan_fill  # the switch reaches the launchers
    assert triton_attention._empty((2,), torch.float32, device, nan_fill=True).isnan().all()
    for name, t in zip(("out", "dq", "dk", "dv"), check_against_reference(q, k, v, causal=causal)):
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    q, k, v = make_qkv(1, 2, 77, 77, 32, dtype=torch.bfloat16, device=device)
    do = torch.randn(q.shape).to(q.dtype).to(device)
    first = attention_and_grads(kernels.attention, q, k, v, do, causal=True, backend="triton")
    second = attention_and_grads(kernels.attention, q, k, v, do, causal=True, backend="triton")
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


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


@pytest.mark.parametrize("head_dim", [48, 512])
def test_unsupported_head_dim_is_rejected(head_dim):
    q = torch.randn(1, 1, 4, head_dim)
    with pytest.raises(ValueError, match=r"head_dim in \(16, 32, 64, 128, 256\), got " + str(head_dim)):
        kernels.attention(q, q, q, backend="triton")


def test_unsupported_dtype_is_rejected():
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtypes float32, float16, bfloat16, got torch.float64"):
        kernels.attention(q, q, q, backend="triton")


# ---------------------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch agree."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 1, 17, 17, 16, dtype=torch.float32, device=device))
    torch.library.opcheck(torch.ops.gpt_kernels.flash_attn_fwd, (q, k, v, True, 0.25))
    out, lse = torch.ops.gpt_kernels.flash_attn_fwd(q, k, v, True, 0.25)
    do = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.gpt_kernels.flash_attn_bwd, (do, q.detach(), k.detach(), v.detach(), out.detach(), lse, True, 0.25)
    )


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
def test_eager_and_compiled_paths_agree_exactly(device):
    """Eager calls take the autograd.Function, traced ones the custom ops: same launchers,
    same configs, so the same bits in the output and all three gradients."""
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 33, 40, 16, dtype=torch.float32, device=device)
    do = torch.randn(q.shape).to(device)

    def attend(q, k, v):
        return kernels.attention(q, k, v, causal=True, backend="triton")

    eager = attention_and_grads(attend, q, k, v, do)
    compiled = attention_and_grads(torch.compile(attend, fullgraph=True, backend="inductor"), q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), eager, compiled):
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


@pytest.mark.skipif(CUDA, reason="the interpreter is only switched on automatically without CUDA")
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


@cuda_only
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_long_sequence_bfloat16(head_dim, causal):
    q, k, v = make_qkv(1, 2, 4096, 4096, head_dim, dtype=torch.bfloat16, device="cuda")
    check_against_reference(q, k, v, causal=causal)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_training_shape_fused_qkv(dtype):
    q, k, v = make_qkv(4, 12, 1024, 1024, 64, dtype=dtype, device="cuda", layout="fused_qkv")
    check_against_reference(q, k, v, causal=True)


@cuda_only
def test_cuda_decoding_long_cache():
    q, k, v = make_qkv(2, 8, 1, 3001, 128, dtype=torch.bfloat16, device="cuda")
    check_against_reference(q, k, v, causal=True)


@cuda_only
@pytest.mark.parametrize("head_dim, causal, q_len, kv_len", [(64, True, 300, 300), (128, False, 200, 333)])
def test_cuda_every_autotune_candidate(head_dim, causal, q_len, kv_len):
    """Whatever config the autotuner picks must be correct: run each candidate (ragged lengths)."""
    q, k, v = make_qkv(1, 2, q_len, kv_len, head_dim, dtype=torch.bfloat16, device="cuda")
    arch = triton_configs.arch_of(torch.cuda.get_device_capability())
    fwd, dkdv, dq = (
        triton_configs.candidates(arch, kernel, "16-bit", causal, triton_configs.length_class(q_len), head_dim)
        for kernel in triton_configs.KERNELS
    )
    for i in range(max(len(fwd), len(dkdv), len(dq))):
        configs = fwd[i % len(fwd)], dkdv[i % len(dkdv)], dq[i % len(dq)]
        check_against_reference(q, k, v, causal=causal, triton_fn=with_configs(*configs, causal, head_dim**-0.5))
