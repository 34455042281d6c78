"""pytest wiring of the benchmark suites.

* A plain `pytest` run skips every test that uses the `benchmark` fixture (as if
  --benchmark-skip were given): benchmarks run only with --benchmark-only or --benchmark-enable
  (or once each, untimed, with --benchmark-disable: a smoke test of the benchmark code).
* The device, its name and the torch / Triton / CUDA versions go into the benchmark JSON
  (machine_info["bench_env"] and, with the date, a top-level "bench_env"); each attention and
  training benchmark gets its ratio to sdpa from the same run (extra_info["speedup_vs_sdpa"]).
* After a benchmark run, the terminal summary prints the TFLOP/s tables of bench.report.
"""

import os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pytest-benchmark builds its session in a trylast pytest_configure, so this runs first.
    option = config.option
    if not hasattr(option, "benchmark_skip"):
        return  # pytest-benchmark is not installed or disabled with -p no:benchmark
    # --benchmark-disable asks to run each benchmark body once, untimed (a smoke test): allowed too.
    wants_benchmarks = any(
        getattr(option, name, False) for name in ("benchmark_only", "benchmark_enable", "benchmark_disable")
    )
    if not wants_benchmarks:
        option.benchmark_skip = True


def pytest_report_header(config):
    if getattr(config.option, "benchmark_skip", False):
        return "benchmarks: skipped (run them with --benchmark-only)"
    from bench.common import environment

    env = environment()
    return (
        f"benchmarks on {env['device']} ({env['device_name']}): torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env['cuda']}"
    )


def pytest_benchmark_update_machine_info(config, machine_info):
    from bench.common import environment

    machine_info["bench_env"] = dict(environment())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from bench.common import environment, now_utc
    from bench.report import annotate_ratios

    env = dict(environment(), date=now_utc())
    if hasattr(os, "getloadavg"):
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]  # 1/5/15 min, at the end of the run
    output_json["bench_env"] = env
    annotate_ratios(output_json["benchmarks"])


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or getattr(config.option, "benchmark_skip", False):
        return
    results = [b.as_dict(include_data=False) for b in session.benchmarks if b and not b.has_error]
    if not results:
        return
    from bench.report import summary_text

    text = summary_text(results)
    if text:
        terminalreporter.write_sep("=", "attention / training summary (median times)")
        terminalreporter.write_line(text)
