"""Peak memory of causal attention forward+backward, per backend and sequence length.

The reference materializes (T, T) score and probability matrices, so its peak grows as T^2;
sdpa's fused kernels and ours keep only O(T) state (output, log-sum-exp, gradients).

* test_peak_memory (benchmark): fixed batch and heads, growing T; extra_info["peak_bytes"] is the
  peak allocated during one forward+backward beyond the inputs already held (q, k, v, dout).
  CUDA: torch.cuda.max_memory_allocated. CPU: the allocation events of torch.profiler
  (profile_memory=True), summed in time order; no tracemalloc. Our kernel runs interpreted on
  CPU, so it is measured there only at the shortest lengths (TRITON_CPU_MEMORY_MAX_LEN).

That our kernel's memory is O(T) is a correctness property, asserted by tests/test_attention_memory.py.
"""

import pytest

from bench import common

if common.ON_CUDA:
    MEMORY_SHAPE = dict(batch=1, heads=8, head_dim=128)
    MEMORY_DTYPE = "bfloat16"
    MEMORY_SEQLENS = [s for s in common.SEQLENS if s >= 1024] or common.SEQLENS
else:
    MEMORY_SHAPE = dict(batch=1, heads=4, head_dim=64)
    MEMORY_DTYPE = "float32"
    MEMORY_SEQLENS = common.SEQLENS
MEMORY_BACKENDS = ("reference", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "triton")
# Interpreted on CPU, our kernel's tiles live in NumPy arrays that torch.profiler does not see, as
# on a GPU they live in on-chip memory: what is measured is what it allocates through torch
# (output, log-sum-exp, gradients), i.e. what would occupy GPU memory. Seconds per call up to 512.
TRITON_CPU_MEMORY_MAX_LEN = 512


def _fwd_bwd(backend, seqlen, batch, heads, head_dim, dtype, device=common.DEVICE):
    attn = common.attention_fn(backend, seqlen, device)
    q, k, v = common.make_qkv(batch, heads, seqlen, head_dim, common.dtype_of(dtype), requires_grad=True, device=device)
    return common.pass_fn(attn, q, k, v, "fwd_bwd")


@pytest.mark.parametrize("backend", MEMORY_BACKENDS)
@pytest.mark.parametrize("seqlen", MEMORY_SEQLENS, ids=lambda t: f"T{t}")
def test_peak_memory(benchmark, seqlen, backend):
    interpreted = backend == "triton" and not common.ON_CUDA
    reason = common.skip_reason(backend, None if interpreted else seqlen)
    if interpreted and seqlen > TRITON_CPU_MEMORY_MAX_LEN:
        reason = (
            f"{common.INTERPRETER_REASON}; its memory is measured on CPU only up to seqlen "
            f"{TRITON_CPU_MEMORY_MAX_LEN} (a call at 1024 takes about a minute)"
        )
    if reason:
        pytest.skip(reason)
    benchmark.group = f"memory fwd_bwd {MEMORY_DTYPE} d{MEMORY_SHAPE['head_dim']} T{seqlen}"
    benchmark.extra_info.update(
        kind="memory",
        backend=backend,
        mode="fwd_bwd",
        causal=True,
        dtype=MEMORY_DTYPE,
        seqlen=seqlen,
        **MEMORY_SHAPE,
        device=common.DEVICE,
        device_name=common.environment()["device_name"],
    )

    def measure() -> int:
        fn = _fwd_bwd(backend, seqlen, dtype=MEMORY_DTYPE, **MEMORY_SHAPE)
        with common.backend_context(backend):
            if interpreted:  # nothing to warm up, and every call takes seconds
                peak = common.peak_bytes(fn)
                benchmark.pedantic(fn, rounds=1, iterations=1)
                return peak
            # Timing first also warms up: autotuning and lazy workspaces are not part of the steady-state peak.
            common.run_benchmark(benchmark, fn, budget_s=common.TIME_BUDGET_S / 2)
            return common.peak_bytes(fn)

    peak, skip = common.run_unless_expected_failure(measure, backend, f"T={seqlen}")
    if skip is not None:
        pytest.skip(skip)
    tensor_bytes = (
        MEMORY_SHAPE["batch"]
        * MEMORY_SHAPE["heads"]
        * seqlen
        * MEMORY_SHAPE["head_dim"]
        * common.dtype_of(MEMORY_DTYPE).itemsize
    )
    benchmark.extra_info.update(peak_bytes=peak, peak_mib=peak / 2**20, peak_per_qkv_tensor=peak / tensor_bytes)
