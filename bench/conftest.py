"""pytest wiring of the benchmark suites: thin adapters over the measurement core (bench/core.py).

* A plain `pytest` skips every test that uses the `benchmark` fixture (as if --benchmark-skip
  were given): the suites run with --benchmark-only (or --benchmark-enable).
* Each benchmark is one cell of one core.Run, measured by the core timer and recorded in
  --bench-out/bench.json (default bench/results/<device>/; the layout of bench/schema.py, the same
  as bench.quick's quick.json), with bench.md rewritten after every cell and the plots at the end.
* pytest-benchmark is handed the same timer's samples, so its terminal table, --benchmark-json
  and --benchmark-compare show the numbers bench.json has.
* A cell that cannot run here is skipped with its reason; one that fails, fails.
"""

from dataclasses import replace
from pathlib import Path

import pytest

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def pytest_addoption(parser):
    parser.addoption(
        "--bench-out",
        type=Path,
        default=None,
        help="folder for the benchmark suites' bench.json, bench.md and plots (default: bench/results/<device>/)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pytest-benchmark builds its session in a trylast pytest_configure, so this runs first.
    option = config.option
    if not hasattr(option, "benchmark_skip"):
        return  # pytest-benchmark is not installed or disabled with -p no:benchmark
    if not (getattr(option, "benchmark_only", False) or getattr(option, "benchmark_enable", False)):
        option.benchmark_skip = True


def pytest_report_header(config):
    if getattr(config.option, "benchmark_skip", False):
        return "benchmarks: skipped (run them with --benchmark-only)"
    from bench import core, plans

    env = core.environment(plans.suite().device)
    return f"benchmarks on {env['device']} ({env['device_name']}): torch {env['torch']}, triton {env['triton']}"


@pytest.fixture(scope="session")
def bench_run(request):
    from bench import core, plans

    device = plans.suite().device
    out = request.config.getoption("--bench-out") or RESULTS_DIR / core.device_slug(core.environment(device))
    run = core.Run(out / "bench.json", device, " ".join(["pytest", *request.config.invocation_params.args]))
    run.section("first_call", "running")
    yield run
    for entry in run.results["sections"].values():
        if entry["cells"] or entry["status"] == "running":
            entry["status"] = "done"
    run.finish()
    print(f"\nbenchmark results: {run.path} and {run.path.with_suffix('.md').name}")


class Recorder:
    """bench(section, key, measure): one cell of the session's run, reported to pytest and pytest-benchmark."""

    def __init__(self, run, benchmark):
        self.run, self.benchmark = run, benchmark

    def timer(self, timer):
        """`timer`, handing its samples to pytest-benchmark as this benchmark's statistics."""
        return replace(timer, on_samples=self.samples)

    def samples(self, seconds: list[float]) -> None:
        """Timings in seconds, as this benchmark's pytest-benchmark statistics (the first given)."""
        if self.benchmark.stats is None:  # pytest-benchmark has no public way in for timings made elsewhere
            stats = self.benchmark._make_stats(1)
            for s in seconds:
                stats.update(s)

    def __call__(self, section: str, key: dict, measure) -> dict:
        self.benchmark._mode = "bench.core.Timer"  # used, if only through its statistics
        self.benchmark.group = f"{section} " + " ".join(f"{k}={v}" for k, v in key.items() if k != "backend")
        self.benchmark.extra_info.update(key)
        cell = self.run.cell(section, key, measure)
        if cell["status"].startswith("skipped"):
            pytest.skip(cell["status"].removeprefix("skipped: "))
        if cell["status"] != "ok":
            pytest.fail(f"{cell['status']}\n{cell.get('traceback', '')}", pytrace=False)
        self.benchmark.extra_info.update(cell["result"])
        return cell["result"]


@pytest.fixture
def bench(bench_run, benchmark) -> Recorder:
    return Recorder(bench_run, benchmark)
