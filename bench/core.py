"""The measurement core every benchmark runs on: one timer, one environment record, and the run
that records each measurement as a cell of one results file (bench/schema.py), within a budget.

    timer = Timer()
    timer(fn, device)          # {"ms": median, "ms_p20", "ms_p80", "calls"}: do_bench on CUDA,
                               # a median of perf_counter on a CPU
    run = Run(Path("out/quick.json"), device, "python -m bench.quick", budget_s=420)
    run.cell("kernel_table", {"backend": "triton", ...}, measure)   # measure() -> the cell's numbers

A cell that cannot run here (Skipped, a CUDA-only backend, out of memory, an sdpa kernel that
does not take the shape) is recorded with its reason, one that fails with its error, and the
run goes on. The results file and its markdown are rewritten after every cell, atomically, so a
run that is killed keeps what it measured.
"""

import contextlib
import datetime
import functools
import gc
import importlib.metadata
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import schema, targets
from bench.backends import BackendUnavailable
from gpt.errors import first_line
from gpt.runfiles import atomic_write

REPO = Path(__file__).resolve().parents[1]
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16")


class Skipped(Exception):
    """This cell cannot run here; the message says why."""


class HardDeadline(BaseException):
    """A cell ran far past the budget (Run.stop_cells_after). A BaseException, so that the
    `except Exception` recording a cell's error cannot mistake it for one."""


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpuinfo(field: str) -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return None


def _driver() -> str | None:
    """The NVIDIA driver's version: nvidia-smi, else the kernel module's version file."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    with contextlib.suppress(OSError), open("/proc/driver/nvidia/version") as f:
        return f.readline().strip()
    return None


@functools.cache
def _static_environment(device: str) -> dict:
    on_cuda = torch.device(device).type == "cuda"
    flags = set((_cpuinfo("flags") or "").split())
    cache_dir = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    env = {
        "device": torch.device(device).type,
        "device_name": torch.cuda.get_device_name(device) if on_cuda else _cpuinfo("model name") or platform.machine(),
        "driver": _driver() if on_cuda else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if on_cuda and torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cpu_threads": torch.get_num_threads(),
        "gpt_kernels_autotune": os.environ.get("GPT_KERNELS_AUTOTUNE"),
        # First calls compile; they mean "a fresh machine" only if Triton's cache started empty.
        "triton_cache_empty_at_start": not (cache_dir.is_dir() and any(cache_dir.iterdir())),
    }
    if on_cuda:
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu_memory_gib=round(props.total_memory / 2**30, 1), compute_capability=f"{props.major}.{props.minor}"
        )
    return env


def environment(device) -> dict:
    """The device, driver and software a measurement ran on, and the date: in every results file."""
    env = dict(_static_environment(str(device)), date=utc_now())
    if hasattr(os, "getloadavg"):
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]  # 1/5/15 min: how busy the machine was
    return env


def device_slug(env: dict) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'cpu' on a CPU: the folder under bench/results/."""
    if env["device"] != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timer:
    """Median milliseconds per call of fn, with the 20th and 80th percentiles.

    CUDA: triton.testing.do_bench (CUDA events around each call, L2 flushed before it), warmup_ms
    and rep_ms of calls. CPU: time.perf_counter around each call, after `warmup` untimed calls,
    as many calls as fill about cpu_seconds within [min_calls, max_calls].
    on_samples, if given, receives every timed call's seconds (the pytest suites hand them to
    pytest-benchmark, so its statistics are this timer's).
    """

    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_seconds: float = 0.5
    min_calls: int = 5
    max_calls: int = 50
    warmup: int = 1
    on_samples: Callable[[list[float]], None] | None = None

    def samples_ms(self, fn, device) -> list[float]:
        if torch.device(device).type == "cuda":
            import triton.testing

            return list(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="all"))
        for _ in range(self.warmup):
            fn()
        times = []
        while len(times) < self.min_calls or (len(times) < self.max_calls and sum(times) < self.cpu_seconds * 1e3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def __call__(self, fn, device) -> dict:
        times = self.samples_ms(fn, device)
        if self.on_samples is not None:
            self.on_samples([t / 1e3 for t in times])
        low, high = statistics.quantiles(times, n=5)[0::3] if len(times) > 1 else (times[0], times[0])
        return {"ms": statistics.median(times), "ms_p20": low, "ms_p80": high, "calls": len(times)}


def wall_seconds(fn, device) -> float:
    """Seconds from an idle device to the device finishing fn()."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def host_and_wall_us(fn, device, calls: int, repeats: int) -> dict:
    """Per call, the median over `repeats` runs of `calls` calls issued back to back:

    host_us  CPU time to issue one call without waiting for the device
    wall_us  from the first issue to the device finishing the last call, per call
    """
    hosts, walls = [], []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        issued = time.perf_counter()
        synchronize(device)
        done = time.perf_counter()
        hosts.append((issued - start) / calls * 1e6)
        walls.append((done - start) / calls * 1e6)
    return {"host_us": statistics.median(hosts), "wall_us": statistics.median(walls)}


def device_us(fn, device, calls: int) -> dict:
    """Kernel time per call on the GPU (torch.profiler's device events over `calls` calls): the
    time the GPU spends in kernels, not the gaps where it waits for the host. None on a CPU."""
    if torch.device(device).type != "cuda":
        return {"device_us": None}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            synchronize(device)
        total = sum(
            e.self_device_time_total
            for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        )
    except Exception as err:  # a profiler that cannot start must not cost the host and wall times
        return {"device_us": None, "device_us_error": one_line(err)}
    return {"device_us": total / calls}


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
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()  # allocations positive, frees negative
        peak = max(peak, current)
    return peak


def peak_bytes(fn, device) -> int:
    """Peak memory allocated while fn() runs (its result freed at the end), beyond what was held
    before: torch.cuda's allocator statistics, or torch.profiler's allocation events on a CPU."""
    if torch.device(device).type != "cuda":
        return _cpu_peak_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - base


# ---------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def one_line(err: BaseException) -> str:
    kind = "out of memory" if is_oom(err) else type(err).__name__
    return f"{kind}: {first_line(err)[:300]}"


def expected_failure(err: Exception, backend: str | None) -> str | None:
    """The reason to skip for a failure that says the backend cannot run this here (out of
    memory, an sdpa kernel that does not support the problem); None for a real error."""
    if is_oom(err):
        return f"{backend} ran out of memory: {first_line(err)[:200]}"
    unsupported = any(s in str(err).lower() for s in ("no available kernel", "no viable backend"))
    if (backend or "").startswith("sdpa-") and unsupported:
        return f"{backend} does not support this problem here: {first_line(err)[:200]}"
    return None


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class Run:
    """The cells of one benchmark run, written to `path` (and its markdown beside it) after each.

    budget_s: seconds from `started` (time.monotonic()) after which no cell starts; the cells
    left are recorded as "skipped: time budget". None: no budget.
    """

    def __init__(self, path: Path, device, command: str, budget_s=None, smoke=False, started=None):
        self.path, self.device = Path(path), torch.device(device)
        self.started = time.monotonic() if started is None else started
        self.deadline = None if budget_s is None else self.started + budget_s
        self.results = schema.new_results(command, environment(self.device), smoke, budget_s)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def section(self, name: str, status: str) -> None:
        self.results["sections"][name]["status"] = status

    def cell(self, section: str, key: dict, measure) -> dict:
        """Run measure() -> dict of numbers unless the budget is spent; record the outcome; write."""
        record = dict(key)
        self.results["sections"][section]["cells"].append(record)
        if self.deadline is not None and time.monotonic() > self.deadline:
            record["status"] = "skipped: time budget"
        else:
            start = time.monotonic()
            try:
                record["result"] = measure()
                record["status"] = "ok"
            except HardDeadline:
                record["status"] = "stopped: still running well after the time budget"
            except (Skipped, BackendUnavailable) as why:
                record["status"] = f"skipped: {why}"
            except Exception as err:  # a kernel error, an unsupported shape: record it, go on
                reason = expected_failure(err, key.get("backend"))
                record["status"] = f"skipped: {reason}" if reason else f"failed: {one_line(err)}"
                if reason is None:
                    record["traceback"] = traceback.format_exc(limit=-6)[-3000:]
            if record["status"] != "ok":
                release_memory()
            record["cell_s"] = round(time.monotonic() - start, 3)
        log(f"[{self.elapsed():6.1f}s] {section} {label(record)}: {record['status']}")
        self.write()
        return record

    def first_call(self, backend: str, head_dim: int, kind: str, made_in: str, fn):
        """fn(), timed to the device's end if it is the run's first (backend, head dim, kind) call:
        that call pays for compilation (and any tuning), the cost a user sees on first use."""
        if schema.cells(self.results, "first_call", backend=backend, head_dim=head_dim, **{"pass": kind}):
            return fn()
        out = []
        result = {"seconds": wall_seconds(lambda: out.append(fn()), self.device), "made_in": made_in}
        key = {"backend": backend, "head_dim": head_dim, "pass": kind}
        self.results["sections"]["first_call"]["cells"].append({**key, "status": "ok", "result": result})
        return out[0]

    def stop_cells_after(self, grace_s: float) -> None:
        """Interrupt (SIGALRM) a cell still running grace_s after the budget: it becomes "stopped"."""

        def stop(signum, frame):
            raise HardDeadline()

        signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, max(1e-3, self.deadline + grace_s - time.monotonic()))

    def finish(self, plots: bool = True) -> str:
        if self.deadline is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        self.results["finished"] = utc_now()
        return self.write(plots=plots)

    def write(self, plots: bool = False) -> str:
        """Rewrite the results file, then its markdown (and with plots, the PNGs). A bug in the
        verdicts or the tables must not cost the measurements, so it is written down, not raised."""
        from bench import report

        self.results["elapsed_s"] = round(self.elapsed(), 2)
        try:
            self.results["targets"] = targets.evaluate(self.results)
        except Exception:
            self.results["targets"] = [{"target": "evaluating the targets failed", "measured": "-", "verdict": "-"}]
            log(traceback.format_exc())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.results, indent=1, default=str) + "\n"
        atomic_write(self.path, lambda f: f.write(text.encode()))
        try:
            images = report.plot(self.results, self.path.parent, self.path.stem) if plots else []
            markdown = report.render_markdown(self.results, images)
        except Exception:
            markdown = f"# Benchmark results\n\nRendering failed; {self.path.name} has every number.\n\n"
            markdown += f"```\n{traceback.format_exc()}```\n"
        atomic_write(self.path.with_suffix(".md"), lambda f: f.write(markdown.encode()))
        return markdown


def label(cell: dict) -> str:
    names = ("case", "model", "what", "backend", "pass", "dtype", "head_dim", "seqlen", "kv_len")
    return " ".join(f"{k}={cell[k]}" for k in names if k in cell)


# ---------------------------------------------------------------------------------------------
# The CUDA-only tests
# ---------------------------------------------------------------------------------------------


def run_cuda_tests(device, time_limit: float) -> dict:
    """`pytest -m cuda -x -q` from the repository root, or why it did not run."""
    command = "pytest -m cuda -x -q"
    if torch.device(device).type != "cuda":
        where = torch.device(device).type
        return {"command": command, "status": f"not run: this run is on {where}; the CUDA-only tests need a GPU"}
    if time_limit <= 0:
        return {"command": command, "status": "not run: --tests-timeout 0"}
    return {"command": command, **run_pytest(["-m", "cuda", "-x", "-q"], time_limit, REPO)}


def run_pytest(args: list[str], time_limit: float, cwd: Path) -> dict:
    """pytest `args` in a subprocess: its status ("passed", "failed", "stopped: ..."), the pass /
    fail counts and the first failure's one-line reason, read from pytest's JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "report.xml"
        argv = [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", f"--junitxml={xml}"]
        start = time.monotonic()
        try:
            done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=time_limit)
        except subprocess.TimeoutExpired:
            return {"status": f"stopped: still running after {time_limit:.0f} s"}
        record = {"exit_code": done.returncode, "seconds": round(time.monotonic() - start, 1)}
        if not xml.exists():
            last = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
            return {**record, "status": f"failed: pytest wrote no report ({last[0][:300]})"}
        root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    record.update(passed=passed, failed=counts["failures"], errors=counts["errors"], skipped=counts["skipped"])
    for case in suite.iter("testcase"):
        problem = next((p for p in (case.find("failure"), case.find("error")) if p is not None), None)
        if problem is not None:
            message = (problem.get("message") or problem.text or "").strip().splitlines() or ["(no message)"]
            record["first_failure"] = f"{case.get('classname')}::{case.get('name')}: {message[0][:300]}"
            break
    if counts["tests"] == 0:
        record["status"] = "failed: no test selected"
    else:
        record["status"] = "passed" if done.returncode == 0 else "failed"
    return record
