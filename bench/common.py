"""Shared pieces of the benchmark suites: device, grids, environment, attention callables, timing.

Grids depend on the device, so that one command works on a laptop CPU and on an H100:

    GPU   seqlen 512..16k, head_dim 64 and 128, bfloat16 and float16, 16k tokens per call
    CPU   seqlen 128..1024, head_dim 64 and 128, float32, 2k tokens per call

Environment variables override them (comma-separated lists):

    BENCH_DEVICE              cuda | cpu (default: cuda when available)
    BENCH_SEQLENS             e.g. 1024,4096
    BENCH_HEAD_DIMS           e.g. 128
    BENCH_DTYPES              e.g. bfloat16
    BENCH_TIME                seconds of timed rounds per benchmark (default 1.0 GPU, 0.5 CPU)
    BENCH_CPU_THREADS         torch.set_num_threads on CPU (default: torch's choice). On a shared
                              machine use 1: a multi-threaded op waits for every thread to get a
                              core, which measures the neighbours' load instead of the kernel
    BENCH_TRITON_CPU_MAX_LEN  longest seqlen of the main grid at which the Triton interpreter is
                              timed on CPU (default 0: only the tiny problem of test_attention_tiny)
"""

import contextlib
import datetime
import functools
import gc
import importlib.metadata
import math
import os
import platform
import time

import torch

import kernels
from bench.backends import ATTENTION_BACKENDS, CUDA_ONLY_BACKENDS  # noqa: F401 (the suites read common.ATTENTION_BACKENDS)
from gpt.errors import first_line


def _env_list(name: str, default, cast=str) -> list:
    raw = os.environ.get(name, "").strip()
    return [cast(x) for x in raw.split(",") if x.strip()] if raw else list(default)


DEVICE = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE == "cuda"
if ON_CUDA and not torch.cuda.is_available():
    raise RuntimeError("BENCH_DEVICE=cuda but torch.cuda.is_available() is False")

if not ON_CUDA and os.environ.get("BENCH_CPU_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_CPU_THREADS"]))

SEQLENS = _env_list("BENCH_SEQLENS", [512, 1024, 2048, 4096, 8192, 16384] if ON_CUDA else [128, 256, 512, 1024], int)
HEAD_DIMS = _env_list("BENCH_HEAD_DIMS", [64, 128], int)
DTYPES = _env_list("BENCH_DTYPES", ["bfloat16", "float16"] if ON_CUDA else ["float32"])
TIME_BUDGET_S = float(os.environ.get("BENCH_TIME", "1.0" if ON_CUDA else "0.5"))
MIN_ROUNDS, MAX_ROUNDS = (10, 500) if ON_CUDA else (5, 50)
WARMUP_ROUNDS = 3 if ON_CUDA else 1
# On CPU our kernel runs interpreted (~12 s for one forward at seqlen 128 and 16 x 4 heads on a
# 2-core machine), so the CPU grid leaves it out; test_attention_tiny times it at 1 x 2 heads.
TRITON_CPU_MAX_LEN = int(os.environ.get("BENCH_TRITON_CPU_MAX_LEN", "0"))

_SDPA_KERNELS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}

INTERPRETER_REASON = (
    "Triton has no CPU backend: on CPU our kernel runs through Triton's interpreter (TRITON_INTERPRET=1), "
    "which executes every program instance in NumPy, orders of magnitude slower than compiled code; "
    "timing it says nothing about the kernel"
)


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in BENCH_DTYPES")
    return dtype


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def environment() -> dict:
    """Device and software versions, recorded in every benchmark JSON and printed on every table."""
    env = {
        "device": DEVICE,
        "device_name": torch.cuda.get_device_name() if ON_CUDA else _cpu_name(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if ON_CUDA and torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if ON_CUDA:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
    return env


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Attention callables
# ---------------------------------------------------------------------------------------------


class BackendUnavailable(Exception):
    """This backend cannot run here; the message is the skip reason."""


def triton_skip_reason(seqlen: int | None = None) -> str | None:
    """Why the triton backend is not benchmarked here at this length, or None if it is."""
    reason = kernels.unavailable_reason("triton", DEVICE)
    if reason is not None:
        return reason
    if not ON_CUDA and seqlen is not None and seqlen > TRITON_CPU_MAX_LEN:
        return (
            f"{INTERPRETER_REASON}; on CPU it is timed only by test_attention_tiny "
            f"(or up to BENCH_TRITON_CPU_MAX_LEN={TRITON_CPU_MAX_LEN})"
        )
    return None


def skip_reason(backend: str, seqlen: int | None = None) -> str | None:
    if backend in CUDA_ONLY_BACKENDS and not ON_CUDA:
        return f"{backend} is a CUDA kernel; this run is on {DEVICE}"
    if backend == "triton":
        return triton_skip_reason(seqlen)
    return None


def attention_fn(backend: str, seqlen: int, device: str | torch.device = DEVICE):
    """A callable (q, k, v) -> causal attention output for `backend` at this sequence length.

    Anything built once per shape (FlexAttention's block mask and compiled function) is built
    here, outside the timed region.
    """
    if backend in kernels.BACKENDS:
        return lambda q, k, v: kernels.attention(q, k, v, causal=True, backend=backend)
    if backend in _SDPA_KERNELS:
        # Which kernel runs is chosen by backend_context(backend), entered around all the calls.
        return lambda q, k, v: kernels.attention(q, k, v, causal=True, backend="sdpa")
    if backend == "flex":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as err:
            raise BackendUnavailable(f"this torch ({torch.__version__}) has no FlexAttention: {err}") from None

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=seqlen, KV_LEN=seqlen, device=device)
        # A fresh compile per shape: dynamo's recompile limit would otherwise send later shapes
        # to the (slow, eager) fallback.
        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    raise ValueError(f"unknown benchmark backend {backend!r}")


def backend_context(backend: str):
    """The context to run `backend`'s calls in: for sdpa-*, torch.nn.attention.sdpa_kernel pinned
    to that one kernel (entered once around warm-up and timing, not per call, so that the timed
    calls pay no extra Python cost); otherwise nothing."""
    if backend not in _SDPA_KERNELS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = getattr(SDPBackend, _SDPA_KERNELS[backend], None)
    if member is None:
        raise BackendUnavailable(f"this torch ({torch.__version__}) has no SDPBackend.{_SDPA_KERNELS[backend]}")
    return sdpa_kernel(member)


def make_qkv(
    batch: int,
    heads: int,
    seqlen: int,
    head_dim: int,
    dtype: torch.dtype,
    requires_grad: bool,
    device=DEVICE,
    seed: int = 0,
):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (
        torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype, generator=g).requires_grad_(
            requires_grad
        )
        for _ in range(3)
    )
    return q, k, v


def pass_fn(attn, q, k, v, mode: str):
    """The timed work: forward only (no autograd graph) or forward + backward."""
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return attn(q, k, v)

        return run
    if mode == "fwd_bwd":
        g = torch.Generator(device=q.device).manual_seed(1)
        dout = torch.randn(q.shape, device=q.device, dtype=q.dtype, generator=g)

        def run():
            out = attn(q, k, v)
            # autograd.grad returns fresh gradients instead of accumulating into .grad
            return torch.autograd.grad(out, (q, k, v), dout)

        return run
    raise ValueError(f"mode must be fwd or fwd_bwd, got {mode!r}")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def synchronize(device=DEVICE) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def skip_message(err: RuntimeError, backend: str, where: str) -> str | None:
    """The skip reason for an expected failure (out of memory, an SDPA kernel that does not
    support the problem), or None for a real error."""
    if is_oom(err):
        return f"{backend} ran out of memory at {where}: {first_line(err)}"
    if backend.startswith("sdpa-") and any(s in str(err).lower() for s in ("no available kernel", "no viable backend")):
        return f"{backend} does not support {where} here: {first_line(err)}"
    return None


def run_unless_expected_failure(fn, backend: str, where: str):
    """(fn(), None); or (None, the reason to skip) when fn fails as expected: the backend is
    unavailable here, it ran out of memory, or an SDPA kernel does not support the problem.
    Any other error propagates."""
    try:
        return fn(), None
    except BackendUnavailable as err:
        reason = str(err)
    except RuntimeError as err:
        reason = skip_message(err, backend, where)
        if reason is None:
            raise
    # After the except block the traceback, and with it the failed call's tensors, is gone.
    release_memory()
    return None, reason


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_benchmark(
    benchmark,
    fn,
    device=DEVICE,
    budget_s: float | None = None,
    min_rounds: int | None = None,
    max_rounds: int | None = None,
) -> float | None:
    """Time fn with pytest-benchmark; returns the median seconds per call (None if disabled).

    The first call (compilation, Triton autotuning, cuDNN plan) and WARMUP_ROUNDS more are not
    timed. Every timed call ends with a device synchronize, and each round starts from an idle
    device (the setup synchronizes), so a round is exactly one call's wall time. The number of
    rounds fills about `budget_s` seconds, within [min_rounds, max_rounds].
    """
    budget_s = TIME_BUDGET_S if budget_s is None else budget_s
    min_rounds = MIN_ROUNDS if min_rounds is None else min_rounds
    max_rounds = MAX_ROUNDS if max_rounds is None else max_rounds

    def timed():
        fn()
        synchronize(device)

    timed()  # compile / autotune, never timed
    start = time.perf_counter()
    timed()
    one_call = max(time.perf_counter() - start, 1e-6)
    rounds = max(min_rounds, min(max_rounds, math.ceil(budget_s / one_call)))
    warmup = min(WARMUP_ROUNDS, max(0, rounds // 2))
    benchmark.pedantic(timed, setup=lambda: synchronize(device), rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None else None


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


def _cpu_peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()  # allocations positive, frees negative
        peak = max(peak, current)
    return peak


def peak_bytes(fn, device=DEVICE) -> int:
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
