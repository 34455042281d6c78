"""Attention alone: causal forward and forward+backward, every backend, TFLOP/s.

    PYTHONPATH=. pytest bench/test_attention.py --benchmark-only

test_attention is the main grid (bench.common: seqlen x head_dim x dtype, constant tokens per
call). test_attention_tiny (CPU only) times our kernel at a problem small enough for Triton's
CPU interpreter, next to reference and sdpa on the same problem.

One benchmark group per problem (pass, dtype, head_dim, seqlen), so pytest-benchmark's table and
--benchmark-compare line the backends up against each other; extra_info holds the shape, the
FLOP count (bench.flops), TFLOP/s at the median time and the device. The ratio to sdpa is added
when the session ends (bench/conftest.py) and tabulated by `python -m bench.report`.
"""

import pytest

import kernels
from bench import common
from bench.flops import (
    CPU_MODEL_DIM,
    CPU_TOKENS,
    GPU_MODEL_DIM,
    GPU_TOKENS,
    PASSES,
    AttentionShape,
    attention_flops,
    constant_token_shape,
    tflops,
)

TOKENS, MODEL_DIM = (GPU_TOKENS, GPU_MODEL_DIM) if common.ON_CUDA else (CPU_TOKENS, CPU_MODEL_DIM)
TINY_SHAPE = AttentionShape(batch=1, heads=2, seqlen=128, head_dim=64)
TINY_BACKENDS = kernels.BACKENDS  # ours, next to reference and sdpa on the same problem


def bench_attention(
    benchmark, backend: str, mode: str, dtype: str, shape: AttentionShape, suite: str, **run_options
) -> None:
    seqlen, head_dim = shape.seqlen, shape.head_dim
    benchmark.group = f"attention{'' if suite == 'main' else ' ' + suite} {mode} {dtype} d{head_dim} T{seqlen}"
    flops = attention_flops(shape.batch, shape.heads, seqlen, seqlen, head_dim, causal=True, mode=mode)
    benchmark.extra_info.update(
        kind="attention",
        suite=suite,
        backend=backend,
        mode=mode,
        causal=True,
        dtype=dtype,
        **shape.as_dict(),
        flops=flops,
        device=common.DEVICE,
        device_name=common.environment()["device_name"],
    )

    def measure():
        attn = common.attention_fn(backend, seqlen)
        q, k, v = common.make_qkv(
            shape.batch, shape.heads, seqlen, head_dim, common.dtype_of(dtype), requires_grad=(mode == "fwd_bwd")
        )
        with common.backend_context(backend):
            return common.run_benchmark(benchmark, common.pass_fn(attn, q, k, v, mode), **run_options)

    median, skip = common.run_unless_expected_failure(measure, backend, f"{shape}")
    if skip is not None:
        pytest.skip(skip)
    if median is not None:
        benchmark.extra_info["tflops"] = tflops(flops, median)


@pytest.mark.parametrize("backend", common.ATTENTION_BACKENDS)
@pytest.mark.parametrize("seqlen", common.SEQLENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("head_dim", common.HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", common.DTYPES)
@pytest.mark.parametrize("mode", PASSES)
def test_attention(benchmark, mode, dtype, head_dim, seqlen, backend):
    reason = common.skip_reason(backend, seqlen)
    if reason:
        pytest.skip(reason)
    shape = constant_token_shape(seqlen, head_dim, tokens=TOKENS, model_dim=MODEL_DIM)
    bench_attention(benchmark, backend, mode, dtype, shape, suite="main")


@pytest.mark.skipif(common.ON_CUDA, reason="CUDA runs our kernel compiled in the main grid (test_attention)")
@pytest.mark.parametrize("backend", TINY_BACKENDS)
@pytest.mark.parametrize("mode", PASSES)
def test_attention_tiny(benchmark, mode, backend):
    """CPU only: batch 1, 2 heads, seqlen 128, head dim 64, float32; 2 to 5 s per interpreted call."""
    reason = common.skip_reason(backend)
    if reason:
        pytest.skip(reason)
    bench_attention(benchmark, backend, mode, "float32", TINY_SHAPE, suite="tiny", min_rounds=3, max_rounds=50)
