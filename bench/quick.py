"""One quick GPU check, sized for one device call of at most 4 minutes on a fresh machine.

    PYTHONPATH=. python -m bench.quick                # results in bench/results/<gpu-slug>/
    PYTHONPATH=. python -m bench.quick --out DIR      # anywhere else (on a lent machine: --out $OUT)
    PYTHONPATH=. python -m bench.quick --smoke        # tiny shapes, same code paths, any machine (CI)

Every GPU session runs this first and commits the two files it writes:

    quick.json  the environment (device, torch, triton, CUDA, cuDNN, date) and every measurement, raw
    quick.md    tables with ratios from this one run, and which targets of issues 10 and 11 are met

Sections, most valuable first (a run that runs late loses the tail, never the head):

    parity        triton and sdpa against float64 on the same bf16 inputs: the training shape,
                  forward + backward, q/k/v as views of a fused QKV projection; and a decode shape
    kernel_table  triton vs sdpa (default dispatch), sdpa-flash, sdpa-cudnn; fwd and fwd + bwd;
                  bf16, causal; head dim 128 then 64; T 1k, 4k, 16k at 16k tokens per call
    host_time     at the model's training shape: host time to issue a call, device (kernel) time,
                  wall time; triton and sdpa, fwd and fwd + bwd
    decode        q_len 1 against 64 to 8k cached keys, triton vs sdpa
    training      tokens/s of a plain training loop and of model.generate (KV cache), triton vs
                  sdpa, on the default model and the long (T 1024) one
    first_call    seconds taken by the first call of each (backend, head dim, pass), compilation
                  included, wherever the script first makes that call

Budget (--budget, seconds since the script started): no cell starts after it, and the cells left
are recorded as "skipped: time budget". A cell still running HARD_STOP_GRACE_S after the budget
is interrupted. Both files are rewritten (atomically) after every cell, so even a killed run
leaves them. A cell that fails (an SDPA kernel that does not support the shape, out of memory,
a kernel error) is recorded with its error; the script goes on.

Timing: TFLOP/s use bench.flops (forward 4*B*H*T*T*D, halved for causal; backward 2.5x forward).
Kernel and decode times are the median of triton.testing.do_bench (CUDA events, L2 cleared
before each call). Host time is how long the CPU takes to issue a call when it does not wait
for the device; device time is the kernels' own time from torch.profiler; wall time is the
time per call of a run of calls, from the first issue to the device finishing. On CPU (--smoke
on a machine without CUDA) the same code runs, timed with time.perf_counter, and our kernel runs
through Triton's interpreter: those numbers test the script, not any kernel.
"""

import time

SCRIPT_START = time.monotonic()  # the budget counts from here, before the slow imports

import argparse
import datetime
import gc
import itertools
import json
import math
import os
import re
import signal
import statistics
import sys
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import kernels
from bench.common import attention_fn, backend_context, environment, skip_reason
from bench.flops import attention_flops, tflops
from gpt.config import TrainConfig
from gpt.model import GPT, GPTConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOKE_OUT = Path(__file__).resolve().parents[1] / "out" / "bench-quick-smoke"  # out/ is git-ignored
DEFAULT_BUDGET_S = 210.0
HARD_STOP_GRACE_S = 20.0
SECTIONS = ("parity", "kernel_table", "host_time", "decode", "training", "first_call")
TABLE_BACKENDS = ("triton", "sdpa", "sdpa-flash", "sdpa-cudnn")  # "sdpa" is the baseline of every ratio
PASSES = ("fwd", "fwd_bwd")
PASS_LABEL = {"fwd": "fwd", "fwd_bwd": "fwd+bwd", "decode": "decode"}


# ---------------------------------------------------------------------------------------------
# What to measure: the full plan for a GPU, and a tiny one that runs the same code in seconds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A GPT to train and sample from (GPTConfig fields), with its batch."""

    model: str  # its name in the tables
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    batch_size: int
    vocab_size: int
    adaptive_cutoffs: tuple[int, ...]
    dropout: float


@dataclass(frozen=True)
class Plan:
    dtype: torch.dtype
    parity_train: tuple[int, int, int, int]  # (batch, heads, T, head dim), fwd + bwd through fused-QKV views
    parity_decode: tuple[int, int, int, int]  # (batch, heads, kv_len, head dim), q_len 1
    table_head_dims: tuple[int, ...]
    table_seqlens: tuple[int, ...]
    table_tokens: int  # batch = tokens // T
    table_model_dim: int  # heads = model_dim // head dim
    host_shape: tuple[int, int, int, int]  # (batch, heads, T, head dim)
    host_calls: int  # calls issued back to back per timed run
    host_repeats: int  # timed runs; the median is reported
    decode_head_dims: tuple[int, ...]
    decode_kv_lens: tuple[int, ...]
    decode_batch: int
    decode_heads: int
    models: tuple[ModelShape, ...]
    train_seconds: float  # timed training steps fill about this long (at least MIN_TRAIN_STEPS)
    sample_tokens: int
    bench_warmup_ms: int  # triton.testing.do_bench's warmup and rep, in milliseconds
    bench_rep_ms: int
    cpu_reps: int  # timed calls per measurement without CUDA


def default_run_shape(name: str, **changes) -> ModelShape:
    """gpt.train's default run (GPTConfig's and TrainConfig's defaults: the Shakespeare vocabulary,
    adaptive head, dropout), with `changes`."""
    model, train = GPTConfig(), TrainConfig()
    shape = ModelShape(
        name,
        n_layer=model.n_layer,
        n_head=model.n_head,
        d_model=model.d_model,
        seq_len=train.seq_len,
        batch_size=train.batch_size,
        vocab_size=model.vocab_size,
        adaptive_cutoffs=tuple(model.adaptive_cutoffs),
        dropout=model.dropout,
    )
    return replace(shape, **changes)


# "long" is the issue's second shape: the default run with --seq-len 1024 --d-model 512 --n-head 8 --batch-size 16.
DEFAULT_MODEL = default_run_shape("default")
LONG_MODEL = default_run_shape("long", n_head=8, d_model=512, seq_len=1024, batch_size=16)

FULL = Plan(
    dtype=torch.bfloat16,
    parity_train=(16, 8, 1024, 64),  # the long model's attention call
    parity_decode=(2, 8, 3001, 128),
    table_head_dims=(128, 64),
    table_seqlens=(1024, 4096, 16384),
    table_tokens=16384,
    table_model_dim=2048,
    host_shape=(16, 8, 1024, 64),
    host_calls=30,
    host_repeats=5,
    decode_head_dims=(64, 128),
    decode_kv_lens=(64, 256, 1024, 4096, 8192),
    decode_batch=1,
    decode_heads=8,
    models=(DEFAULT_MODEL, LONG_MODEL),
    train_seconds=2.0,
    sample_tokens=200,
    bench_warmup_ms=25,
    bench_rep_ms=100,
    cpu_reps=5,
)

# Tiny shapes: our kernel runs interpreted without CUDA, about a second per call even here.
# Odd lengths exercise the masked edges; the model shapes keep the adaptive head.
SMOKE_MODEL = ModelShape(
    "default",
    n_layer=1,
    n_head=2,
    d_model=32,
    seq_len=16,
    batch_size=2,
    vocab_size=256,
    adaptive_cutoffs=(32, 128),
    dropout=0.1,
)
SMOKE = Plan(
    dtype=torch.bfloat16,
    parity_train=(1, 2, 32, 16),
    parity_decode=(1, 2, 37, 32),
    table_head_dims=(32, 16),
    table_seqlens=(32, 64),
    table_tokens=64,
    table_model_dim=64,
    host_shape=(1, 2, 32, 16),
    host_calls=2,
    host_repeats=2,
    decode_head_dims=(16, 32),
    decode_kv_lens=(17, 40),
    decode_batch=1,
    decode_heads=2,
    models=(SMOKE_MODEL, replace(SMOKE_MODEL, model="long", seq_len=32, batch_size=1)),
    train_seconds=0.0,
    sample_tokens=4,
    bench_warmup_ms=5,
    bench_rep_ms=20,
    cpu_reps=2,
)

WARMUP_TRAIN_STEPS = 2
MIN_TRAIN_STEPS, MAX_TRAIN_STEPS = 2, 200


# ---------------------------------------------------------------------------------------------
# The run: results so far, the deadline, first calls, and writing after every cell
# ---------------------------------------------------------------------------------------------


class Skipped(Exception):
    """This cell cannot run here; the message says why."""


class HardDeadline(BaseException):
    """Raised by SIGALRM when a cell runs far past the budget. A BaseException, so that the
    `except Exception` recording a cell's errors cannot mistake it for one of them."""


class Run:
    def __init__(self, plan: Plan, device: torch.device, out_dir: Path, budget_s: float, smoke: bool, argv: list):
        self.plan, self.device, self.out_dir = plan, device, out_dir
        self.deadline = SCRIPT_START + budget_s
        self.results = {
            "command": " ".join(["python -m bench.quick", *argv]),
            "smoke": smoke,
            "budget_s": budget_s,
            "environment": run_environment(device),
            "started": utc_now(),
            "finished": None,
            "elapsed_s": None,
            "sections": {name: {"status": "not started", "cells": []} for name in SECTIONS},
            "targets": [],
        }

    def elapsed(self) -> float:
        return time.monotonic() - SCRIPT_START

    def start_section(self, name: str) -> None:
        self.results["sections"][name]["status"] = "running"

    def end_section(self, name: str) -> None:
        self.results["sections"][name]["status"] = "done"
        self.write()

    def cell(self, section: str, key: dict, measure) -> dict:
        """Run measure() -> dict of numbers unless the budget is spent; record the outcome; write."""
        record = dict(key)
        self.results["sections"][section]["cells"].append(record)
        if time.monotonic() > self.deadline:
            record["status"] = "skipped: time budget"
        else:
            start = time.monotonic()
            try:
                record.update(measure())
                record["status"] = "ok"
            except HardDeadline:
                record["status"] = f"stopped: still running {HARD_STOP_GRACE_S:.0f} s after the time budget"
            except Skipped as why:
                record["status"] = f"skipped: {why}"
            except Exception as err:  # unsupported shape, out of memory, a kernel error: record it, go on
                record["status"] = f"failed: {one_line(err)}"
                record["traceback"] = traceback.format_exc(limit=-6)[-3000:]
                release_memory()
            record["cell_s"] = round(time.monotonic() - start, 3)
        log(f"[{self.elapsed():6.1f}s] {section} {label(record)}: {summary(record)}")
        self.write()
        return record

    def first_call(self, backend: str, head_dim: int, kind: str, where: str, fn):
        """fn(), timed to the device's end if this is the first (backend, head dim, kind) call of the run.

        That first call pays for compilation (and any tuning), so its time is the cost a user
        sees on first use. Later calls are just run.
        """
        cells = self.results["sections"]["first_call"]["cells"]
        if any(c["backend"] == backend and c["head_dim"] == head_dim and c["pass"] == kind for c in cells):
            return fn()
        synchronize(self.device)
        start = time.perf_counter()
        out = fn()
        synchronize(self.device)
        cells.append(
            {
                "backend": backend,
                "head_dim": head_dim,
                "pass": kind,
                "where": where,
                "seconds": time.perf_counter() - start,
                "status": "ok",
            }
        )
        return out

    def write(self) -> str:
        """Rewrite quick.json, then quick.md. A bug in the verdicts or tables must not cost the
        measurements of a scarce GPU run, so their errors are written down instead of raised."""
        self.results["elapsed_s"] = round(self.elapsed(), 2)
        try:
            self.results["targets"] = evaluate_targets(self.results, self.plan)
        except Exception:
            self.results["targets"] = [
                {
                    "issue": "-",
                    "target": "evaluating the targets failed",
                    "verdict": "-",
                    "measured": traceback.format_exc(limit=-3),
                }
            ]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out_dir / "quick.json", json.dumps(self.results, indent=1, default=str) + "\n")
        try:
            markdown = render_markdown(self.results)
        except Exception:
            markdown = (
                f"# Quick GPU check\n\nRendering the tables failed; quick.json has every number.\n\n"
                f"```\n{traceback.format_exc()}```\n"
            )
        atomic_write(self.out_dir / "quick.md", markdown)
        return markdown


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0][:300]
    kind = "out of memory" if is_oom(err) else type(err).__name__
    return f"{kind}: {text}" if text else kind


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_environment(device: torch.device) -> dict:
    """bench.common.environment(), plus what decides whether the first calls compile or tune."""
    env = dict(environment())
    cache_dir = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    env.update(
        date=utc_now(),
        run_device=str(device),
        slug=gpu_slug(device),
        gpt_kernels_autotune=os.environ.get("GPT_KERNELS_AUTOTUNE"),
        triton_cache_dir=str(cache_dir),
        # A warm cache makes first calls fast: the first-call figures mean "fresh machine" only if this is true.
        triton_cache_empty_at_start=not (cache_dir.is_dir() and any(cache_dir.iterdir())),
    )
    return env


def gpu_slug(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'cpu' without CUDA."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, plan: Plan, device: torch.device) -> dict:
    """Median milliseconds per call, with the 20th and 80th percentiles.

    CUDA: triton.testing.do_bench (CUDA events around each call, L2 flushed before it; keyword
    arguments that triton 3.6 through 3.9 share). CPU: a plain perf_counter loop.
    """
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(
            fn, warmup=plan.bench_warmup_ms, rep=plan.bench_rep_ms, quantiles=[0.5, 0.2, 0.8]
        )
        return {"ms": p50, "ms_p20": p20, "ms_p80": p80}
    times = []
    for _ in range(plan.cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    quintiles = statistics.quantiles(times, n=5)  # the 20th, 40th, 60th and 80th percentiles
    return {"ms": statistics.median(times), "ms_p20": quintiles[0], "ms_p80": quintiles[3]}


def host_and_wall_us(fn, plan: Plan, device: torch.device) -> dict:
    """Per call, median over host_repeats runs of host_calls calls issued back to back:

    host_us  CPU time to issue one call without waiting for the device (no synchronize inside)
    wall_us  from the first issue to the device finishing the last call, per call
    """
    hosts, walls = [], []
    for _ in range(plan.host_repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(plan.host_calls):
            fn()
        issued = time.perf_counter()
        synchronize(device)
        done = time.perf_counter()
        hosts.append((issued - start) / plan.host_calls * 1e6)
        walls.append((done - start) / plan.host_calls * 1e6)
    return {"host_us": statistics.median(hosts), "wall_us": statistics.median(walls)}


def device_us(fn, plan: Plan, device: torch.device) -> dict:
    """Kernel time per call on the device: torch.profiler's device events over host_calls calls.

    This counts only the time the GPU spends in kernels (and copies), not the gaps where it
    waits for the host. None without CUDA, where there is no device to time.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    try:
        with profile(activities=activities) as prof:
            for _ in range(plan.host_calls):
                fn()
            synchronize(device)
        total_us = sum(
            e.self_device_time_total
            for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        )
    except Exception as err:  # a profiler that cannot start must not cost the host and wall times
        return {"device_us": None, "device_us_error": one_line(err)}
    return {"device_us": total_us / plan.host_calls if on_cuda else None}


# ---------------------------------------------------------------------------------------------
# Inputs and passes
# ---------------------------------------------------------------------------------------------


def fused_qkv_views(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, 3*H*D) -> three (B, H, T, D) strided views, exactly as CausalSelfAttention makes them."""
    B, T, three_c = qkv.shape
    q, k, v = qkv.view(B, T, 3, heads, three_c // (3 * heads)).unbind(dim=2)
    return tuple(t.transpose(1, 2) for t in (q, k, v))


def randn(*shape, dtype, device, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, device=device, generator=generator)


def forward_fn(attn, q, k, v):
    def run():
        with torch.no_grad():
            return attn(q, k, v)

    return run


def forward_backward_fn(attn, q, k, v):
    """One forward and backward; autograd.grad returns fresh gradients (nothing accumulates)."""
    dout = randn(*q.shape, dtype=q.dtype, device=q.device, seed=1)

    def run():
        return torch.autograd.grad(attn(q, k, v), (q, k, v), dout)

    return run


def attention_backend_fn(backend: str):
    return lambda q, k, v: kernels.attention(q, k, v, causal=True, backend=backend)


def runnable(backend: str, seqlen: int, device: torch.device) -> None:
    """Raise Skipped if `backend` cannot run here. Our kernel runs even without CUDA (through
    Triton's interpreter, on the tiny shapes of --smoke), so it only asks kernels itself."""
    reason = (
        kernels.unavailable_reason(backend, device) if backend in kernels.BACKENDS else skip_reason(backend, seqlen)
    )
    if reason:
        raise Skipped(reason)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def max_abs_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """max |actual - exact| in float64; inf where actual is NaN or Inf."""
    diff = (actual.detach().double() - exact.detach()).abs()
    return float(torch.nan_to_num(diff, nan=math.inf).max())


def parity(run: Run) -> None:
    """Our kernel's worst error against float64, next to sdpa's on the same bf16 inputs."""
    plan, device = run.plan, run.device
    run.start_section("parity")

    def training_case():
        B, H, T, D = plan.parity_train
        runnable("triton", T, device)
        qkv64 = randn(B, T, 3 * H * D, dtype=torch.float64, device=device, seed=0)
        dout64 = randn(B, H, T, D, dtype=torch.float64, device=device, seed=1)

        def outputs(backend, dtype):
            qkv = qkv64.to(dtype, copy=True).requires_grad_()  # a fresh leaf per backend
            q, k, v = fused_qkv_views(qkv, H)
            out = kernels.attention(q, k, v, causal=True, backend=backend)
            out.backward(dout64.to(dtype))
            dq, dk, dv = qkv.grad.view(B, T, 3, H, D).unbind(dim=2)  # (B, T, H, D) each
            return {"out": out, "dq": dq, "dk": dk, "dv": dv}

        exact = outputs("reference", torch.float64)
        ours = run.first_call("triton", D, "fwd_bwd", "parity", lambda: outputs("triton", plan.dtype))
        sdpa = outputs("sdpa", plan.dtype)
        return {"errors": error_rows(ours, sdpa, exact)}

    def decode_case():
        B, H, Tk, D = plan.parity_decode
        runnable("triton", Tk, device)
        q64 = randn(B, H, 1, D, dtype=torch.float64, device=device, seed=2)
        k64, v64 = (randn(B, H, Tk, D, dtype=torch.float64, device=device, seed=s) for s in (3, 4))

        def outputs(backend, dtype):
            return {"out": kernels.attention(q64.to(dtype), k64.to(dtype), v64.to(dtype), causal=True, backend=backend)}

        exact = outputs("reference", torch.float64)
        ours = run.first_call("triton", D, "decode", "parity", lambda: outputs("triton", plan.dtype))
        return {"errors": error_rows(ours, outputs("sdpa", plan.dtype), exact)}

    dtype = dtype_name(plan.dtype)
    B, H, T, D = plan.parity_train
    run.cell(
        "parity",
        {"case": "training fwd+bwd, fused-QKV views", "shape": shape_dict(B, H, T, T, D), "dtype": dtype},
        training_case,
    )
    B, H, Tk, D = plan.parity_decode
    run.cell("parity", {"case": "decode, q_len 1", "shape": shape_dict(B, H, 1, Tk, D), "dtype": dtype}, decode_case)
    run.end_section("parity")


def error_rows(ours: dict, sdpa: dict, exact: dict) -> list:
    rows = []
    for name, exact_value in exact.items():
        err, base = max_abs_error(ours[name], exact_value), max_abs_error(sdpa[name], exact_value)
        rows.append(
            {
                "tensor": name,
                "triton_max_err": err,
                "sdpa_max_err": base,
                "ratio": err / base if base > 0 else (0.0 if err == 0 else math.inf),
            }
        )
    return rows


def kernel_table(run: Run) -> None:
    """Issue 11's table: every backend on the same inputs, each ratio from this one run."""
    plan, device = run.plan, run.device
    run.start_section("kernel_table")
    for head_dim in plan.table_head_dims:
        for seqlen in plan.table_seqlens:
            batch, heads = max(1, plan.table_tokens // seqlen), max(1, plan.table_model_dim // head_dim)
            for mode in PASSES:
                for backend in TABLE_BACKENDS:
                    key = {
                        "backend": backend,
                        "pass": mode,
                        "head_dim": head_dim,
                        "seqlen": seqlen,
                        "batch": batch,
                        "heads": heads,
                        "dtype": dtype_name(plan.dtype),
                    }

                    def measure(backend=backend, mode=mode, batch=batch, heads=heads, seqlen=seqlen, head_dim=head_dim):
                        runnable(backend, seqlen, device)
                        attn = attention_fn(backend, seqlen, device)
                        q, k, v = (
                            randn(
                                batch, heads, seqlen, head_dim, dtype=plan.dtype, device=device, seed=s
                            ).requires_grad_(mode == "fwd_bwd")
                            for s in range(3)
                        )
                        fn = (forward_fn if mode == "fwd" else forward_backward_fn)(attn, q, k, v)
                        with backend_context(backend):
                            run.first_call(backend, head_dim, mode, "kernel_table", fn)
                            timing = median_ms(fn, plan, device)
                        flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal=True, mode=mode)
                        return {**timing, "tflops": tflops(flops, timing["ms"] * 1e-3)}

                    run.cell("kernel_table", key, measure)
            release_memory()
    run.end_section("kernel_table")


def host_time(run: Run) -> None:
    """Host, device and wall time per call at the model's training shape (fused-QKV views)."""
    plan, device = run.plan, run.device
    run.start_section("host_time")
    B, H, T, D = plan.host_shape
    for mode in PASSES:
        for backend in ("triton", "sdpa"):

            def measure(backend=backend, mode=mode):
                runnable(backend, T, device)
                qkv = randn(B, T, 3 * H * D, dtype=plan.dtype, device=device, seed=0).requires_grad_(mode == "fwd_bwd")
                q, k, v = fused_qkv_views(qkv, H)
                fn = (forward_fn if mode == "fwd" else forward_backward_fn)(attention_backend_fn(backend), q, k, v)
                run.first_call(backend, D, mode, "host_time", fn)
                fn()  # one more warm-up call: allocator and caches settle
                return {**host_and_wall_us(fn, plan, device), **device_us(fn, plan, device)}

            run.cell(
                "host_time",
                {
                    "backend": backend,
                    "pass": mode,
                    **shape_dict(B, H, T, T, D),
                    "qkv": "views of a fused (B, T, 3*H*D) projection",
                    "dtype": dtype_name(plan.dtype),
                },
                measure,
            )
    run.end_section("host_time")


def decode(run: Run) -> None:
    """q_len 1 against a KV cache, as model.generate calls attention for each new token."""
    plan, device = run.plan, run.device
    run.start_section("decode")
    B, H = plan.decode_batch, plan.decode_heads
    for head_dim in plan.decode_head_dims:
        for kv_len in plan.decode_kv_lens:
            for backend in ("triton", "sdpa"):

                def measure(backend=backend, head_dim=head_dim, kv_len=kv_len):
                    runnable(backend, kv_len, device)
                    # q is a view of this step's fused projection; k, v are the cache (torch.cat: contiguous).
                    q, _, _ = fused_qkv_views(randn(B, 1, 3 * H * head_dim, dtype=plan.dtype, device=device, seed=0), H)
                    k, v = (randn(B, H, kv_len, head_dim, dtype=plan.dtype, device=device, seed=s) for s in (1, 2))
                    fn = forward_fn(attention_backend_fn(backend), q, k, v)
                    run.first_call(backend, head_dim, "decode", "decode", fn)
                    return {**median_ms(fn, plan, device), **host_and_wall_us(fn, plan, device)}

                run.cell(
                    "decode",
                    {"backend": backend, **shape_dict(B, H, 1, kv_len, head_dim), "dtype": dtype_name(plan.dtype)},
                    measure,
                )
    run.end_section("decode")


def build_model(shape: ModelShape, backend: str, device: torch.device) -> GPT:
    torch.manual_seed(0)  # the same weights for every backend
    config = GPTConfig(
        vocab_size=shape.vocab_size,
        block_size=shape.seq_len,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        d_model=shape.d_model,
        dropout=shape.dropout,
        attn=backend,
        adaptive_cutoffs=list(shape.adaptive_cutoffs),
    )
    return GPT(config).to(device)


def training(run: Run) -> None:
    """Tokens/s of a plain training loop (bf16 autocast, AdamW, random tokens) and of generate()."""
    plan, device = run.plan, run.device
    run.start_section("training")
    for shape in plan.models:
        for backend in ("triton", "sdpa"):

            def train(shape=shape, backend=backend):
                runnable(backend, shape.seq_len, device)
                model = build_model(shape, backend, device)
                optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
                # A few random batches, made on the device up front: no data loading in the loop.
                tokens = torch.randint(
                    shape.vocab_size,
                    (4, shape.batch_size, shape.seq_len + 1),
                    device=device,
                    generator=torch.Generator(device=device).manual_seed(0),
                )
                batches = itertools.cycle(tokens)  # (batch_size, seq_len + 1) each

                def step():
                    batch = next(batches)
                    with torch.autocast(device.type, dtype=plan.dtype):
                        _, loss = model(batch[:, :-1], batch[:, 1:])
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                first_step_s = timed(step, device)  # pays for compiling every kernel the step uses
                for _ in range(WARMUP_TRAIN_STEPS):
                    step()
                one_step = timed(step, device)  # sizes the timed run
                steps = max(MIN_TRAIN_STEPS, min(MAX_TRAIN_STEPS, math.ceil(plan.train_seconds / one_step)))
                seconds = timed(lambda: [step() for _ in range(steps)], device)
                return {
                    "first_step_s": first_step_s,
                    "steps": steps,
                    "seconds": seconds,
                    "tokens_per_s": steps * shape.batch_size * shape.seq_len / seconds,
                }

            def sample(shape=shape, backend=backend):
                runnable(backend, shape.seq_len, device)
                model = build_model(shape, backend, device).eval()
                prompt = torch.zeros(1, 1, dtype=torch.long, device=device)

                def generate(n):
                    return model.generate(prompt, n, generator=torch.Generator(device=device).manual_seed(0))

                first_s = timed(lambda: generate(min(16, plan.sample_tokens)), device)  # decode lengths compile here
                seconds = timed(lambda: generate(plan.sample_tokens), device)
                return {
                    "first_generate_s": first_s,
                    "tokens": plan.sample_tokens,
                    "seconds": seconds,
                    "tokens_per_s": plan.sample_tokens / seconds,
                }

            key = {"backend": backend, **asdict(shape)}
            run.cell("training", {**key, "what": "train", "dtype": f"{dtype_name(plan.dtype)} autocast"}, train)
            run.cell("training", {**key, "what": "sample", "dtype": "float32"}, sample)
            release_memory()
    run.end_section("training")


def timed(fn, device: torch.device) -> float:
    """Seconds from an idle device to the device finishing fn()."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Targets (issues 10 and 11): "met" / "not met" from this run's numbers, or why there is no verdict
# ---------------------------------------------------------------------------------------------


def find(results: dict, section: str, **key):
    """The first cell of `section` whose fields match key, or None."""
    for cell in results["sections"][section]["cells"]:
        if all(cell.get(k) == v for k, v in key.items()):
            return cell
    return None


def value(results: dict, section: str, field: str, **key):
    """A measured number, or None when the cell is missing or did not run."""
    cell = find(results, section, **key)
    return cell.get(field) if cell is not None and cell["status"] == "ok" else None


def verdict(checks: list) -> str:
    """checks: one boolean per cell the target covers, None for a cell that was not measured.
    One measured miss is enough for "not met"; "met" needs every cell."""
    measured = sum(c is not None for c in checks)
    partly = f" ({measured} of {len(checks)} cells measured)" if measured < len(checks) else ""
    if False in checks:
        return "not met" + partly
    return "met" if checks and not partly else "not measured" + partly


def ratio(a, b):
    return a / b if a is not None and b else None


def at_most(x, bound):
    return None if x is None else x <= bound


def at_least(x, bound):
    return None if x is None else x >= bound


def evaluate_targets(results: dict, plan: Plan) -> list:
    rows = []

    def target(issue, text, checks, measured, gpu_only=True):
        result = verdict(checks)
        if gpu_only and results["environment"].get("device") != "cuda":
            result = f"n/a: a GPU target, and this run is on {results['environment'].get('device')}"
        rows.append({"issue": issue, "target": text, "measured": measured, "verdict": result})

    # Parity: within 2x of sdpa's own bf16 error (issue 10: the correctness to keep).
    checks, errors = [], []
    for cell in results["sections"]["parity"]["cells"]:
        measured = cell.get("errors", []) if cell["status"] == "ok" else [None]
        checks += [None if r is None else r["ratio"] <= 2.0 for r in measured]
        errors += [r for r in measured if r is not None]
    target(
        10,
        "parity: triton's max error <= 2x sdpa's at the same precision",
        checks,
        f"worst ratio {fmt(max(r['ratio'] for r in errors))}" if errors else "-",
        gpu_only=False,
    )

    # Kernel table (issue 11).
    cells = [(d, t) for d in plan.table_head_dims for t in plan.table_seqlens]
    for mode in PASSES:
        speedups = [
            ratio(
                value(results, "kernel_table", "ms", backend="sdpa", **table_key(mode, d, t)),
                value(results, "kernel_table", "ms", backend="triton", **table_key(mode, d, t)),
            )
            for d, t in cells
        ]
        target(
            11,
            f"{PASS_LABEL[mode]}, bf16, causal: triton >= 1.0x sdpa's TFLOP/s at every T and D",
            [at_least(s, 1.0) for s in speedups],
            ratio_range(speedups),
        )
        long = [s for (d, t), s in zip(cells, speedups) if t >= 4096]
        target(
            11,
            f"{PASS_LABEL[mode]} stretch: >= 1.1x sdpa at T >= 4k",
            [at_least(s, 1.1) for s in long],
            ratio_range(long),
        )
    for mode, bound in (("fwd", 600.0), ("fwd_bwd", 550.0)):
        achieved = value(results, "kernel_table", "tflops", backend="triton", **table_key(mode, 128, 16384))
        target(
            11,
            f"{PASS_LABEL[mode]} at D 128, T 16k: triton >= {bound:.0f} TFLOP/s",
            [at_least(achieved, bound)],
            f"{fmt(achieved)} TFLOP/s" if achieved is not None else "-",
        )

    # Host time per call at the training shape (issue 10, item 2).
    for mode, bound in (("fwd", 75.0), ("fwd_bwd", 550.0)):
        ours = value(results, "host_time", "host_us", backend="triton", **{"pass": mode})
        theirs = value(results, "host_time", "host_us", backend="sdpa", **{"pass": mode})
        host_ratio = ratio(ours, theirs)
        target(
            10,
            f"host time per {PASS_LABEL[mode]} call <= {bound:.0f} us and <= 1.5x sdpa's",
            [at_most(ours, bound), at_most(host_ratio, 1.5)],
            f"{fmt(ours)} us, {fmt(host_ratio)}x sdpa" if ours is not None else "-",
        )

    # First call per head dim, compilation included (issue 10, item 1).
    for head_dim in sorted(set(plan.table_head_dims)):
        seconds = [first_call_seconds(results, "triton", head_dim, kind) for kind in ("fwd", "fwd_bwd", "decode")]
        total = sum(seconds) if None not in seconds else None
        target(
            10,
            f"first calls at head dim {head_dim} (fwd, fwd+bwd, decode together) <= 10 s",
            [at_most(total, 10.0)] if total is not None else [None],
            "-" if seconds == [None] * 3 else " + ".join(fmt(s) for s in seconds) + f" = {fmt(total)} s",
        )

    # Decode per call (issue 10, item 3).
    for field, what in (("ms", "device time (do_bench)"), ("wall_us", "wall time")):
        ratios = [
            ratio(
                value(results, "decode", field, backend="triton", head_dim=d, kv_len=n),
                value(results, "decode", field, backend="sdpa", head_dim=d, kv_len=n),
            )
            for d in plan.decode_head_dims
            for n in plan.decode_kv_lens
        ]
        target(
            10,
            f"decode {what} per call <= sdpa's at every kv_len and D",
            [at_most(r, 1.0) for r in ratios],
            "triton/sdpa " + ratio_range(ratios),
        )

    # Training and sampling tokens/s (issue 10, items 3 and 5).
    for what in ("train", "sample"):
        for shape in plan.models:
            r = ratio(
                value(results, "training", "tokens_per_s", backend="triton", model=shape.model, what=what),
                value(results, "training", "tokens_per_s", backend="sdpa", model=shape.model, what=what),
            )
            target(
                10,
                f"{'training' if what == 'train' else 'sampling'} tokens/s, {shape.model} model: triton >= 1.0x sdpa",
                [at_least(r, 1.0)],
                f"{fmt(r)}x" if r is not None else "-",
            )
    return rows


def table_key(mode: str, head_dim: int, seqlen: int) -> dict:
    return {"pass": mode, "head_dim": head_dim, "seqlen": seqlen}


def first_call_seconds(results: dict, backend: str, head_dim: int, kind: str):
    return value(results, "first_call", "seconds", backend=backend, head_dim=head_dim, **{"pass": kind})


def ratio_range(ratios: list) -> str:
    measured = [r for r in ratios if r is not None]
    if not measured:
        return "-"
    low, high = fmt(min(measured)), fmt(max(measured))
    return f"{low}x" if low == high else f"{low}x to {high}x"


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if not math.isfinite(x):
        return str(x)
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_dict(batch, heads, q_len, kv_len, head_dim) -> dict:
    return {"batch": batch, "heads": heads, "q_len": q_len, "kv_len": kv_len, "head_dim": head_dim}


def label(cell: dict) -> str:
    keys = ("case", "model", "what", "backend", "pass", "head_dim", "seqlen", "kv_len")
    return " ".join(f"{k}={cell[k]}" for k in keys if k in cell)


def summary(cell: dict) -> str:
    if cell["status"] != "ok":
        return cell["status"]
    shown = ("ms", "tflops", "host_us", "device_us", "wall_us", "tokens_per_s")
    parts = [f"{k} {fmt(cell[k])}" for k in shown if k in cell]
    if "errors" in cell:
        parts = [f"{r['tensor']} err {r['triton_max_err']:.2e} vs sdpa {r['sdpa_max_err']:.2e}" for r in cell["errors"]]
    return ", ".join(parts)


def markdown_table(header: list, rows: list) -> list:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def shown(results: dict, section: str, field: str, **key) -> str:
    """A cell's number, or a short word saying why there is none (details under "Not measured")."""
    cell = find(results, section, **key)
    if cell is None:
        return "-"
    if cell["status"] == "ok":
        return fmt(cell.get(field))
    return cell["status"].split(":")[0]


def heading(title: str, *notes: str) -> list:
    return ["", f"## {title}", "", *(line for note in notes for line in (note, ""))]


def render_markdown(results: dict) -> str:
    env = results["environment"]
    title = "Quick GPU check" + (" (--smoke: tiny shapes, numbers test the script only)" if results["smoke"] else "")
    lines = [
        f"# {title}",
        "",
        f"{env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, triton {env.get('triton')}, "
        f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, {env.get('date')}; `{results['command']}`; "
        f"{results['elapsed_s']} s of a {results['budget_s']:.0f} s budget"
        + ("" if results["finished"] else " (run not finished)")
        + ".",
    ]

    lines += heading("Targets (issues 10 and 11)")
    lines += markdown_table(
        ["issue", "target", "measured", "verdict"],
        [[t["issue"], t["target"], t["measured"], t["verdict"]] for t in results["targets"]],
    )

    lines += heading("Parity against float64")
    rows = []
    for cell in results["sections"]["parity"]["cells"]:
        shape = cell["shape"]
        name = (
            f"{cell['case']}, B {shape['batch']} H {shape['heads']} q {shape['q_len']} kv {shape['kv_len']} "
            f"D {shape['head_dim']}"
        )
        if cell["status"] != "ok":
            rows.append([name, "-", "-", "-", cell["status"].split(":")[0]])
        for r in cell.get("errors", []):
            rows.append([name, r["tensor"], f"{r['triton_max_err']:.3e}", f"{r['sdpa_max_err']:.3e}", fmt(r["ratio"])])
    lines += markdown_table(["case (bf16)", "tensor", "triton max err", "sdpa max err", "triton / sdpa"], rows)

    lines += heading(
        "Kernel table: TFLOP/s, bf16, causal (fwd 4*B*H*T*T*D/2, fwd+bwd 3.5x that)",
        "batch = tokens / T, heads = model dim / D; median of triton.testing.do_bench; "
        "x sdpa = triton's TFLOP/s over sdpa's (default dispatch), same run.",
    )
    header = ["D", "T"]
    for mode in PASSES:
        header += [f"{b} {PASS_LABEL[mode]}" for b in TABLE_BACKENDS] + [f"x sdpa {PASS_LABEL[mode]}"]
    rows = []
    for d, t in sorted(
        {(c["head_dim"], c["seqlen"]) for c in results["sections"]["kernel_table"]["cells"]},
        key=lambda dt: (-dt[0], -dt[1]),
    ):
        row = [d, t]
        for mode in PASSES:
            key = table_key(mode, d, t)
            row += [shown(results, "kernel_table", "tflops", backend=b, **key) for b in TABLE_BACKENDS]
            row.append(
                fmt(
                    ratio(
                        value(results, "kernel_table", "ms", backend="sdpa", **key),
                        value(results, "kernel_table", "ms", backend="triton", **key),
                    )
                )
            )
        rows.append(row)
    lines += markdown_table(header, rows)

    lines += heading(
        "Host and device time per call at the training shape (fused-QKV views)",
        "host: CPU time to issue a call without waiting; device: kernel time (torch.profiler); "
        "wall: per call over a run of calls.",
    )
    rows = []
    for mode in PASSES:
        for backend in ("triton", "sdpa"):
            key = {"backend": backend, "pass": mode}
            rows.append(
                [backend, PASS_LABEL[mode]]
                + [shown(results, "host_time", f, **key) for f in ("host_us", "device_us", "wall_us")]
            )
        rows.append(
            ["triton / sdpa", PASS_LABEL[mode]]
            + [
                fmt(
                    ratio(
                        value(results, "host_time", f, backend="triton", **{"pass": mode}),
                        value(results, "host_time", f, backend="sdpa", **{"pass": mode}),
                    )
                )
                for f in ("host_us", "device_us", "wall_us")
            ]
        )
    lines += markdown_table(["backend", "pass", "host us", "device us", "wall us"], rows)

    lines += heading(
        "Decode: q_len 1 against a KV cache",
        "device: median do_bench time per call; wall: per call over a run of calls (what generate pays).",
    )
    rows = []
    for d, n in sorted({(c["head_dim"], c["kv_len"]) for c in results["sections"]["decode"]["cells"]}):
        row = [d, n]
        for field, scale in (("ms", 1e3), ("wall_us", 1.0)):
            ours = value(results, "decode", field, backend="triton", head_dim=d, kv_len=n)
            theirs = value(results, "decode", field, backend="sdpa", head_dim=d, kv_len=n)
            row += [
                shown(results, "decode", field, backend="triton", head_dim=d, kv_len=n)
                if ours is None
                else fmt(ours * scale),
                shown(results, "decode", field, backend="sdpa", head_dim=d, kv_len=n)
                if theirs is None
                else fmt(theirs * scale),
                fmt(ratio(ours, theirs)),
            ]
        rows.append(row)
    lines += markdown_table(
        [
            "D",
            "kv_len",
            "triton device us",
            "sdpa device us",
            "triton / sdpa",
            "triton wall us",
            "sdpa wall us",
            "triton / sdpa",
        ],
        rows,
    )

    lines += heading("First call (compilation included), in the order the script made them")
    lines += markdown_table(
        ["backend", "D", "pass", "seconds", "first made in"],
        [
            [c["backend"], c["head_dim"], PASS_LABEL[c["pass"]], fmt(c["seconds"]), c["where"]]
            for c in results["sections"]["first_call"]["cells"]
        ],
    )

    lines += heading(
        "Training and sampling tokens/s",
        "train: plain loop, bf16 autocast, AdamW, random tokens; sample: model.generate with the "
        "KV cache, batch 1, float32 (as gpt.sample runs it).",
    )
    rows = []
    for name in dict.fromkeys(c["model"] for c in results["sections"]["training"]["cells"]):
        cell = find(results, "training", model=name)
        shape = (
            f"{cell['n_layer']} layers, d {cell['d_model']}, {cell['n_head']} heads, "
            f"T {cell['seq_len']}, B {cell['batch_size']}"
        )
        for what in ("train", "sample"):
            key = {"model": name, "what": what}
            ours = value(results, "training", "tokens_per_s", backend="triton", **key)
            theirs = value(results, "training", "tokens_per_s", backend="sdpa", **key)
            rows.append(
                [
                    name,
                    shape,
                    what,
                    shown(results, "training", "tokens_per_s", backend="triton", **key),
                    shown(results, "training", "tokens_per_s", backend="sdpa", **key),
                    fmt(ratio(ours, theirs)),
                ]
            )
    lines += markdown_table(["model", "shape", "what", "triton tok/s", "sdpa tok/s", "triton / sdpa"], rows)

    not_run = {}
    for section in SECTIONS:
        for cell in results["sections"][section]["cells"]:
            if cell["status"] != "ok":
                not_run.setdefault(cell["status"], []).append(f"{section} {label(cell)}")
    if not_run:  # kept short: the printed tail of a device call is 12,000 characters; quick.json has it all
        lines += heading("Not measured")
        for status, where in list(not_run.items())[:10]:
            lines.append(
                f"- {status}: " + "; ".join(where[:6]) + (f"; and {len(where) - 6} more" if len(where) > 6 else "")
            )
        if len(not_run) > 10:
            lines.append(f"- and {len(not_run) - 10} other reasons: see quick.json")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.quick", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for quick.json and quick.md (default: bench/results/<gpu-slug>/; "
        "with --smoke out/bench-quick-smoke/)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"seconds after which no new cell starts (default: {DEFAULT_BUDGET_S:.0f}); "
        f"a cell still running {HARD_STOP_GRACE_S:.0f} s later is interrupted",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few iterations, on any device (CI)")
    args = parser.parse_args(argv)
    if args.budget < 0:
        parser.error(f"--budget must be >= 0 seconds, got {args.budget}")
    return args


def stop_at_hard_deadline(signum, frame):
    raise HardDeadline()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(environment()["device"])
    plan = SMOKE if args.smoke else FULL
    out_dir = args.out or (SMOKE_OUT if args.smoke else RESULTS_DIR / gpu_slug(device))
    run = Run(plan, device, out_dir, args.budget, args.smoke, argv)
    log(f"bench.quick on {run.results['environment']['device_name']}: writing {out_dir}/quick.json and quick.md")

    hard_stop_in = max(0.0, run.deadline + HARD_STOP_GRACE_S - time.monotonic())
    signal.signal(signal.SIGALRM, stop_at_hard_deadline)
    signal.setitimer(signal.ITIMER_REAL, hard_stop_in + 1e-3)
    run.start_section("first_call")  # filled by the other sections, at each first call
    try:
        for section in (parity, kernel_table, host_time, decode, training):
            try:
                section(run)
            except HardDeadline:  # between cells (inside one, the cell records it): later cells are skipped
                run.results["sections"][section.__name__]["status"] = "stopped at the hard deadline"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    run.results["sections"]["first_call"]["status"] = "done"
    run.results["finished"] = utc_now()
    print(run.write(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
