"""Peak memory of causal attention forward+backward, per backend and sequence length.

The reference materializes (T, T) score and probability matrices, so its peak grows as T^2;
sdpa's fused kernels and ours keep only O(T) state (output, log-sum-exp, gradients).

* test_peak_memory (benchmark): fixed batch and heads, growing T; extra_info["peak_bytes"] is the
  peak allocated during one forward+backward beyond the inputs already held (q, k, v, dout).
  CUDA: torch.cuda.max_memory_allocated. CPU: the allocation events of torch.profiler
  (profile_memory=True), summed in time order; no tracemalloc. Our kernel runs interpreted on
  CPU, so it is measured there only at the shortest lengths (TRITON_CPU_MEMORY_MAX_LEN).
* test_triton_memory_is_linear (plain test, CUDA only): a correctness assertion that runs in the
  normal test suite on a GPU.
"""
import pytest
import torch

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


def _cpu_peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()  # allocations positive, frees negative
        peak = max(peak, current)
    return peak


def peak_bytes(fn, device=common.DEVICE) -> int:
    """Peak memory allocated while fn() runs (its result freed at the end), beyond what was held before."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_bytes(fn)


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
        reason = (f"{common.INTERPRETER_REASON}; its memory is measured on CPU only up to seqlen "
                  f"{TRITON_CPU_MEMORY_MAX_LEN} (a call at 1024 takes about a minute)")
    if reason:
        pytest.skip(reason)
    benchmark.group = f"memory fwd_bwd {MEMORY_DTYPE} d{MEMORY_SHAPE['head_dim']} T{seqlen}"
    benchmark.extra_info.update(
        kind="memory", backend=backend, mode="fwd_bwd", causal=True, dtype=MEMORY_DTYPE, seqlen=seqlen,
        **MEMORY_SHAPE, device=common.DEVICE, device_name=common.environment()["device_name"],
    )
    skip = None
    try:
        fn = _fwd_bwd(backend, seqlen, dtype=MEMORY_DTYPE, **MEMORY_SHAPE)
        with common.backend_context(backend):
            if interpreted:  # nothing to warm up, and every call takes seconds
                peak = peak_bytes(fn)
                benchmark.pedantic(fn, rounds=1, iterations=1)
            else:
                # Timing first also warms up: autotuning and lazy workspaces are not part of the steady-state peak.
                common.run_benchmark(benchmark, fn, budget_s=common.TIME_BUDGET_S / 2)
                peak = peak_bytes(fn)
    except common.BackendUnavailable as err:
        skip = str(err)
    except RuntimeError as err:
        skip = common.skip_message(err, backend, f"T={seqlen}")
        if skip is None:
            raise
    if skip is not None:
        fn = None
        common.release_memory()
        pytest.skip(skip)
    tensor_bytes = MEMORY_SHAPE["batch"] * MEMORY_SHAPE["heads"] * seqlen * MEMORY_SHAPE["head_dim"] \
        * common.dtype_of(MEMORY_DTYPE).itemsize
    benchmark.extra_info.update(peak_bytes=peak, peak_mib=peak / 2**20, peak_per_qkv_tensor=peak / tensor_bytes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak GPU memory needs CUDA (torch.cuda memory stats)")
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_triton_memory_is_linear(backend):
    """Ours stays O(T): 4x the length costs ~4x the memory, and a handful of (B, H, T, D) tensors.

    The reference runs as a control: the same measurement must see its O(T^2) growth.
    """
    if backend == "triton" and common.triton_skip_reason() is not None:
        pytest.skip(common.triton_skip_reason())
    batch, heads, head_dim, dtype = 1, 8, 64, "float16"
    short, long = 2048, 8192
    peaks = {}
    for seqlen in (short, long):
        fn = _fwd_bwd(backend, seqlen, batch, heads, head_dim, dtype, device="cuda")
        fn()
        peaks[seqlen] = peak_bytes(fn, device="cuda")
        del fn
    growth = peaks[long] / max(peaks[short], 1)
    tensor_bytes = batch * heads * long * head_dim * 2  # one (B, H, T, D) fp16 tensor at the long length
    if backend == "reference":
        assert growth > 10, f"reference should grow ~16x (O(T^2)) from T={short} to {long}; measured {growth:.1f}x"
        return
    # out, dq, dk, dv, a float32 dq accumulator, log-sum-exp and delta: well under 16 tensors,
    # while one (B, H, T, T) fp16 score matrix at T=8192 alone is T / (H * D) = 16 tensors' worth per head.
    assert peaks[long] <= 16 * tensor_bytes + 8 * 2**20, (
        f"triton fwd+bwd at T={long} peaked at {peaks[long] / 2**20:.1f} MiB beyond its inputs, "
        f"more than 16 (B, H, T, D) tensors ({16 * tensor_bytes / 2**20:.1f} MiB): not O(T)"
    )
    assert growth < 6, f"triton peak memory grew {growth:.1f}x for 4x the length: not O(T) (linear would be ~4x)"
