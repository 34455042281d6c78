"""The GPU benchmark plan in one command: the CUDA-only tests, then every measurement, most
valuable first, within a time budget.

    python -m bench.quick                  # on a GPU: bench/results/<gpu>/quick.json, quick.md
    python -m bench.quick --budget 600     # no cell starts after 600 s (default 420)
    python -m bench.quick --smoke          # tiny shapes through the same code, any machine (CI)

Run it from the repository root (`python -m` puts the root on the path; bench is not installed).
In order, so that a run that runs late loses the tail, never the head:

    tests         pytest -m cuda -x -q (on a GPU): its counts and first failure go into quick.json
    parity        our kernel (and each registered variant) against float64, next to sdpa: the long
                  model's training call (fwd + bwd, q, k, v views of a fused QKV) and a decode call
    kernel_table  our kernel and its variants, sdpa (default dispatch), cuDNN, FlashAttention-2:
                  fwd and fwd + bwd, bf16 causal, D 128 then 64, T 1k/4k/16k at 16k tokens per call
    host_time     host, device and wall time per call at the long model's training shape
    decode        q_len 1 against 64 to 8k cached keys, triton vs sdpa
    training      tokens/s of gpt.train's step (Muon + AdamW, bf16 autocast, random tokens) and
                  of model.generate, triton vs sdpa, on the default model and the long one
    first_call    the first call of each (backend, head dim, pass), compilation included

The plan is bench/plans.py, the timer and the results file bench/core.py (layout: bench/schema.py),
the verdicts bench/targets.py, the tables bench/report.py: the pytest suites share every one.
"""

import time

SCRIPT_START = time.monotonic()  # the budget counts from here, before the slow imports

import argparse
import sys
from pathlib import Path

import torch

from bench import backends, core, measure, plans
from bench.flops import PASSES, AttentionShape, constant_token_shape

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOKE_OUT = Path(__file__).resolve().parents[1] / "out" / "bench-quick-smoke"  # out/ is git-ignored
DEFAULT_BUDGET_S = 420.0
TESTS_TIMEOUT_S = 150.0
HARD_STOP_GRACE_S = 20.0  # a cell still running this long after the budget is interrupted


def plan_cells(run: core.Run, plan: plans.Plan):
    """(section, key, measure) for every cell of the plan, in the order they run."""
    dtype, train_call = plan.dtype, plans.attention_call(plan.runs[-1][1])
    for backend in backends.ours():
        key = {"case": "training fwd+bwd, fused-QKV views", "backend": backend, **train_call.as_dict(), "dtype": dtype}
        yield "parity", key, lambda: measure.parity(run, backend, train_call, dtype)
    B, H, Tk, D = plan.parity_decode
    decode_call = AttentionShape(B, H, Tk, D)
    key = {"case": "decode, q_len 1", "backend": "triton", **measure.decode_key(decode_call), "dtype": dtype}
    yield "parity", key, lambda: measure.decode_parity(run, "triton", decode_call, dtype)

    for head_dim in plan.table_head_dims:
        for seqlen in plan.table_seqlens:
            shape = constant_token_shape(seqlen, head_dim, plan.table_tokens, plan.table_model_dim)
            for table_dtype in plan.table_dtypes:
                for mode in PASSES:
                    for backend in plan.table_backends:
                        key = measure.attention_key(backend, mode, table_dtype, shape)
                        yield (
                            "kernel_table",
                            key,
                            lambda: measure.attention(run, backend, mode, table_dtype, shape, plan.timer),
                        )
            core.release_memory()

    for mode in PASSES:
        for backend in ("triton", "sdpa"):
            key = {**measure.attention_key(backend, mode, dtype, train_call), "qkv": "views of a fused projection"}
            yield (
                "host_time",
                key,
                lambda: measure.host_time(run, backend, mode, train_call, dtype, plan.host_calls, plan.host_repeats),
            )

    for head_dim in plan.decode_head_dims:
        for kv_len in plan.decode_kv_lens:
            cache = AttentionShape(plan.decode_batch, plan.decode_heads, kv_len, head_dim)
            for backend in ("triton", "sdpa"):
                key = {"backend": backend, **measure.decode_key(cache), "dtype": dtype}
                yield (
                    "decode",
                    key,
                    lambda: measure.decode(run, backend, cache, dtype, plan.timer, plan.host_calls, plan.host_repeats),
                )

    for name, cfg in plan.runs:
        for backend in ("triton", "sdpa"):
            key = {"backend": backend, **measure.run_key(name, cfg)}

            def train(cfg=cfg, backend=backend):
                batches = measure.random_batches(cfg, run.device)
                training = measure.TrainingRun(
                    cfg, backend, run.device, batches, cfg.model.vocab_size, total_steps=1000
                )
                return measure.train_throughput(training, plan.train_timer, run.device)

            yield "training", {**key, "what": "train", "dtype": cfg.dtype, "data": "random tokens"}, train
            yield (
                "training",
                {**key, "what": "sample", "dtype": "float32"},
                lambda: measure.sample(cfg, backend, run.device, plan.sample_tokens),
            )
            core.release_memory()


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.quick", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for quick.json, quick.md and the plots (default: bench/results/<gpu>/; "
        "with --smoke: out/bench-quick-smoke/)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"seconds after the start past which no cell starts (default {DEFAULT_BUDGET_S:.0f}); "
        f"a cell still running {HARD_STOP_GRACE_S:.0f} s later is interrupted",
    )
    parser.add_argument(
        "--tests-timeout",
        type=float,
        default=TESTS_TIMEOUT_S,
        help=f"seconds the CUDA-only tests may take, within the budget (default {TESTS_TIMEOUT_S:.0f}; 0: skip them)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few calls, on any machine (CI)")
    args = parser.parse_args(argv)
    for name in ("budget", "tests_timeout"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0 seconds, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = plans.SMOKE if args.smoke else plans.FULL
    out = args.out or (SMOKE_OUT if args.smoke else RESULTS_DIR / core.device_slug(core.environment(device)))
    command = " ".join(["python -m bench.quick", *argv])
    run = core.Run(out / "quick.json", device, command, args.budget, args.smoke, started=SCRIPT_START)
    core.log(f"bench.quick on {run.results['environment']['device_name']}: writing {run.path} and quick.md")
    run.stop_cells_after(HARD_STOP_GRACE_S)
    current = None
    try:
        left = max(0.0, run.deadline - time.monotonic())
        run.results["tests"] = core.run_cuda_tests(device, min(args.tests_timeout, left))
        core.log(f"[{run.elapsed():6.1f}s] tests: {run.results['tests']['status']}")
        run.section("first_call", "running")  # filled by the other sections, at each first call
        for section, key, measure_cell in plan_cells(run, plan):
            if section != current:
                if current is not None:
                    run.section(current, "done")
                run.section(current := section, "running")
            run.cell(section, key, measure_cell)
        run.section(current, "done")
    except core.HardDeadline:  # between cells (inside one, the cell records it): the rest is not run
        if current is not None:
            run.section(current, "stopped at the hard deadline")
    run.section("first_call", "done")
    print(run.finish(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
