"""Attention alone: causal forward and forward + backward, every registered backend, TFLOP/s.

    pytest bench/test_attention.py --benchmark-only

test_attention is the suite plan's grid (bench/plans.py: pass x dtype x head dim x T, constant
tokens per call). On a CPU our kernel runs through Triton's interpreter, so test_attention_tiny
times it (and every registered variant) on a problem small enough for that, next to reference
and sdpa on the same problem.
"""

from dataclasses import replace

import pytest

from bench import backends, measure, plans
from bench.flops import PASSES, constant_token_shape

PLAN = plans.suite()
INTERPRETED = "without CUDA our kernel runs through Triton's interpreter (NumPy), which says nothing about its speed"


def cannot_run_on_this_device(backend: str) -> str | None:
    if backends.BACKENDS[backend].cuda_only and PLAN.device != "cuda":
        return f"{backend} is a CUDA kernel; this run is on {PLAN.device}"
    return None


@pytest.mark.parametrize("backend", PLAN.table_backends)
@pytest.mark.parametrize("seqlen", PLAN.table_seqlens, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("head_dim", PLAN.table_head_dims, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", PLAN.table_dtypes)
@pytest.mark.parametrize("mode", PASSES)
def test_attention(bench, mode, dtype, head_dim, seqlen, backend):
    reason = cannot_run_on_this_device(backend)
    if PLAN.tiny is not None and backends.BACKENDS[backend].ours:
        reason = f"{INTERPRETED}; on a CPU test_attention_tiny times it"
    if reason:
        pytest.skip(reason)
    shape = constant_token_shape(seqlen, head_dim, PLAN.table_tokens, PLAN.table_model_dim)
    timer = bench.timer(PLAN.timer)
    key = measure.attention_key(backend, mode, dtype, shape)
    bench("kernel_table", key, lambda: measure.attention(bench.run, backend, mode, dtype, shape, timer))


@pytest.mark.skipif(PLAN.tiny is None, reason="on a GPU our kernel runs compiled, in test_attention's grid")
@pytest.mark.parametrize("backend", ("reference", "sdpa", *backends.ours()))
@pytest.mark.parametrize("mode", PASSES)
def test_attention_tiny(bench, mode, backend):
    """A CPU: batch 1, 2 heads, T 128, head dim 64, float32; seconds per interpreted call."""
    timer = bench.timer(replace(PLAN.timer, min_calls=3, max_calls=3, warmup=0))  # the first call warms up
    key = {**measure.attention_key(backend, mode, "float32", PLAN.tiny), "grid": "tiny"}
    bench("kernel_table", key, lambda: measure.attention(bench.run, backend, mode, "float32", PLAN.tiny, timer))
