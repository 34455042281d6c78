"""Peak memory of causal attention forward + backward, per backend and sequence length.

    pytest bench/test_memory.py --benchmark-only

The reference materializes (T, T) score and probability matrices, so its peak grows as T²;
sdpa's fused kernels and ours keep O(T) state (output, log-sum-exp, gradients). The peak is
what one fwd + bwd allocates beyond its inputs (bench.measure.memory): torch.cuda's allocator
statistics on a GPU, torch.profiler's allocation events on a CPU. That our kernel's memory is
O(T) is a correctness property, asserted on a GPU by tests/test_attention_memory.py.
"""

from dataclasses import replace

import pytest

from bench import backends, measure, plans
from bench.flops import AttentionShape

PLAN = plans.suite()
MEMORY_BACKENDS = tuple(b for b in backends.names() if b != "flex")
# Interpreted on a CPU, our kernel's tiles live in NumPy arrays that torch.profiler does not see,
# as on a GPU they live in on-chip memory: what is measured is what it allocates through torch
# (output, log-sum-exp, gradients), what would occupy GPU memory. Seconds per call up to 512.
INTERPRETED_MAX_LEN = 512


@pytest.mark.parametrize("backend", MEMORY_BACKENDS)
@pytest.mark.parametrize("seqlen", PLAN.memory_seqlens, ids=lambda t: f"T{t}")
def test_peak_memory(bench, seqlen, backend):
    interpreted = backends.BACKENDS[backend].ours and PLAN.device != "cuda"
    if backends.BACKENDS[backend].cuda_only and PLAN.device != "cuda":
        pytest.skip(f"{backend} is a CUDA kernel; this run is on {PLAN.device}")
    if interpreted and seqlen > INTERPRETED_MAX_LEN:
        pytest.skip(f"our kernel runs interpreted on a CPU: its memory is measured up to T {INTERPRETED_MAX_LEN}")
    batch, heads, head_dim = PLAN.memory_shape
    shape = AttentionShape(batch, heads, seqlen, head_dim)
    # Interpreted, one call (nothing to warm up, seconds each); else half the usual timing.
    few = replace(PLAN.timer, min_calls=1, max_calls=1, warmup=0) if interpreted else PLAN.timer
    timer = bench.timer(replace(few, cpu_seconds=few.cpu_seconds / 2, rep_ms=few.rep_ms // 2))
    key = measure.attention_key(backend, "fwd_bwd", PLAN.memory_dtype, shape)
    bench("memory", key, lambda: measure.memory(bench.run, backend, shape, PLAN.memory_dtype, timer))
