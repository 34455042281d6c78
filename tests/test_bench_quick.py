"""The benchmark system on a CPU: `python -m bench.quick --smoke` and `pytest bench --benchmark-only`
run the same core (our kernel interpreted, the CUDA-only backends skipped with their reason) and
write results files of the same layout; the verdicts of a GPU run are checked on invented numbers."""

import json
from dataclasses import replace

import pytest
import tolerances
import torch
from helpers import REPO, run_module

from bench import backends, core, measure, plans, quick, schema, targets
from bench.flops import AttentionShape
from gpt.muon import orthogonalization_dtype
from kernels import triton_configs

# The fields each section's measured cells carry, all positive numbers.
TIMINGS = {
    "kernel_table": ("ms", "tflops"),
    "host_time": ("host_us", "wall_us"),
    "decode": ("ms", "host_us", "wall_us"),
    "training": ("tokens_per_s",),
    "first_call": ("seconds",),
    "memory": ("ms", "peak_bytes"),
}
CUDA_ONLY = tuple(f"skipped: {name} is a CUDA kernel" for name in backends.names(cuda_only=True))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    # --tests-timeout 0: on a GPU the CUDA-only tests are not run again from inside the tests
    proc = run_module("bench.quick", ["--smoke", "--tests-timeout", "0", "--out", str(out)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "quick.json").read_text()), out, proc.stdout


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    """The suites on the CPU, narrowed to one length and head dim, without the slow cells (our
    interpreted kernel and the time-to-loss runs): seconds to a minute."""
    out = tmp_path_factory.mktemp("suites")
    narrow = {"BENCH_SEQLENS": "128", "BENCH_HEAD_DIMS": "64", "BENCH_TIME": "0.02", "BENCH_CPU_THREADS": "1"}
    args = ["bench", "--benchmark-only", "-q", "-p", "no:cacheprovider", "--bench-out", str(out)]
    args += ["-k", "not tiny and not time_to_loss and not triton", f"--benchmark-json={out / 'pytest-benchmark.json'}"]
    proc = run_module("pytest", args, env={**narrow, "BENCH_DEVICE": "cpu"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return json.loads((out / "bench.json").read_text()), out


def ok_cells(results, section):
    return [c for c in schema.cells(results, section) if c["status"] == "ok"]


def test_smoke_measures_every_cell(smoke):
    results, _, _ = smoke
    assert results["schema"] == schema.SCHEMA and results["smoke"] and results["finished"]
    for key in ("device", "device_name", "driver", "torch", "triton", "cuda", "cudnn", "cpu", "cpu_flags", "date"):
        assert key in results["environment"], key
    expected = "not run: --tests-timeout 0" if torch.cuda.is_available() else "not run: this run is on cpu"
    assert results["tests"]["status"].startswith(expected)
    for section in ("parity", "kernel_table", "host_time", "decode", "training", "first_call"):
        assert results["sections"][section]["status"] == "done", section
        assert schema.cells(results, section), f"{section} recorded no cell"
        for cell in schema.cells(results, section):
            if cell["status"] != "ok":  # only the CUDA-only backends may be skipped; nothing fails or runs late
                assert cell["status"].startswith(CUDA_ONLY), (section, cell)
                continue
            for field in TIMINGS.get(section, ()):
                assert isinstance(cell["result"][field], float) and cell["result"][field] > 0, (section, field, cell)


def test_smoke_covers_our_kernel_and_sdpa_everywhere(smoke):
    results, _, _ = smoke
    for section in ("kernel_table", "host_time", "decode", "training"):
        assert {"triton", "sdpa"} <= {c["backend"] for c in ok_cells(results, section)}, section
    # The first call of our kernel is recorded for every head dim and kind of call the targets check.
    first = {(c["head_dim"], c["pass"]) for c in schema.cells(results, "first_call", backend="triton")}
    head_dims = {c["head_dim"] for c in schema.cells(results, "kernel_table")}
    assert {(d, kind) for d in head_dims for kind in ("fwd", "fwd_bwd", "decode")} <= first


def test_smoke_trains_with_the_default_runs_optimizer(smoke):
    results, _, _ = smoke
    precision = str(orthogonalization_dtype(torch.device(results["environment"]["device"])))
    trained = [c["result"] for c in ok_cells(results, "training") if c["what"] == "train"]
    assert trained and all(r["optimizer"] == "Muon + AdamW" for r in trained)
    assert all(r["orthogonalization"] == precision.removeprefix("torch.") for r in trained)


def test_bench_tolerance_is_the_projects():
    assert targets.ERROR_RATIO == tolerances.ERROR_RATIO
    assert targets.ABS_FLOOR == {str(d).removeprefix("torch."): f for d, f in tolerances.ABS_FLOOR.items()}


def test_smoke_parity_is_within_the_project_tolerance(smoke):
    results, _, _ = smoke
    cells = schema.cells(results, "parity")
    assert [c["status"] for c in cells] == ["ok"] * len(cells) and len(cells) == len(backends.ours()) + 1
    for cell in cells:
        expected = {"out", "dq", "dk", "dv"} if "training" in cell["case"] else {"out"}
        assert {r["tensor"] for r in cell["result"]["errors"]} == expected
        for row in cell["result"]["errors"]:
            bound = tolerances.ERROR_RATIO * row["sdpa_max_err"] + tolerances.ABS_FLOOR[torch.bfloat16]
            assert 0 < row["sdpa_max_err"] and row["max_err"] <= bound, (cell["case"], row)
    verdicts = {t["target"]: t["verdict"] for t in results["targets"]}
    assert verdicts[targets.TARGETS[0].text] == "met"


def test_smoke_markdown_and_plots(smoke):
    results, out, stdout = smoke
    markdown = (out / "quick.md").read_text()
    assert markdown.startswith("# Benchmark results: ") and "(--smoke" in markdown.splitlines()[0]
    assert "| target | measured | verdict |" in markdown and "## Kernel table" in markdown
    columns = " | ".join(f"{backend} TFLOP/s" for backend in (*backends.ours(), "sdpa"))  # our variants beside ours
    assert f"| head dim | seqlen | batch | heads | {columns} |" in markdown
    for target in results["targets"]:
        assert target["verdict"].startswith(("met", "not met", "n/a", "not measured")), target
    assert markdown in stdout  # printed at the end
    for png in ("quick-kernels-bfloat16.png", "quick-training.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in markdown


def test_suites_and_quick_write_the_same_layout(smoke, suites):
    quick_results, _, _ = smoke
    bench_results, out = suites
    assert bench_results.keys() == quick_results.keys() and bench_results["schema"] == schema.SCHEMA
    assert bench_results["sections"].keys() == quick_results["sections"].keys()
    assert bench_results["environment"].keys() <= quick_results["environment"].keys()  # a GPU adds its own
    for section in ("kernel_table", "training"):
        ours, theirs = ok_cells(bench_results, section), ok_cells(quick_results, section)
        assert ours and theirs, section
        assert set(ours[0]) == set(theirs[0]) and set(ours[0]["result"]) == set(theirs[0]["result"]), section
    assert {c["backend"] for c in ok_cells(bench_results, "kernel_table")} == {"reference", "sdpa"}
    assert ok_cells(bench_results, "memory") and (out / "bench.md").read_text().count("## ") >= 4
    # pytest-benchmark got the core timer's samples: its median is bench.json's.
    pytest_benchmark = json.loads((out / "pytest-benchmark.json").read_text())["benchmarks"]
    sdpa = next(b for b in pytest_benchmark if b["extra_info"]["backend"] == "sdpa" and "tflops" in b["extra_info"])
    assert sdpa["stats"]["median"] * 1e3 == pytest.approx(sdpa["extra_info"]["ms"])
    train = ok_cells(bench_results, "training")[0]["result"]
    assert train["optimizer"] == "Muon + AdamW" and train["tokens_per_s"] > 0


def test_no_budget_skips_every_cell_and_still_writes(tmp_path):
    proc = run_module("bench.quick", ["--smoke", "--budget", "0", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "quick.json").read_text())
    cells = [c for s in schema.SECTIONS if s != "first_call" for c in schema.cells(results, s)]
    assert cells and all(c["status"] == "skipped: time budget" for c in cells)
    assert all(t["verdict"].startswith(("not measured", "n/a")) for t in results["targets"])
    assert "| head dim | seqlen |" in (tmp_path / "quick.md").read_text()


def test_bad_budget_is_refused_in_one_line():
    proc = run_module("bench.quick", ["--smoke", "--budget", "-1"], timeout=120)
    assert proc.returncode == 2 and "--budget must be >= 0 seconds" in proc.stderr


def test_a_cell_records_its_outcome_and_the_run_goes_on(tmp_path):
    run = core.Run(tmp_path / "quick.json", "cpu", "test", budget_s=1e6)

    def fails(message):
        def measure():
            raise RuntimeError(message)

        return measure

    def interrupted():
        raise core.HardDeadline()

    def unsupported():
        raise core.Skipped("no kernel for this shape")

    outcomes = [
        run.cell("decode", {"backend": "triton"}, fails("CUDA error: an illegal memory access\nmore lines")),
        run.cell("decode", {"backend": "sdpa"}, interrupted),
        run.cell("decode", {"backend": "x"}, unsupported),
        run.cell("decode", {"backend": "sdpa-cudnn"}, fails("No available kernel. Aborting execution.")),
        run.cell("decode", {"backend": "sdpa"}, fails("CUDA out of memory. Tried to allocate 2.00 GiB")),
        run.cell("decode", {"backend": "y"}, lambda: {"ms": 1.0}),
    ]
    assert outcomes[0]["status"] == "failed: RuntimeError: CUDA error: an illegal memory access"
    assert "RuntimeError" in outcomes[0]["traceback"]
    assert outcomes[1]["status"].startswith("stopped:")
    assert outcomes[2]["status"] == "skipped: no kernel for this shape"
    assert outcomes[3]["status"].startswith("skipped: sdpa-cudnn does not support this problem here")
    assert outcomes[4]["status"].startswith("skipped: sdpa ran out of memory")
    assert outcomes[5]["status"] == "ok" and outcomes[5]["result"] == {"ms": 1.0}
    written = json.loads((tmp_path / "quick.json").read_text())  # rewritten after every cell
    assert [c["status"].split(":")[0] for c in written["sections"]["decode"]["cells"]] == [
        "failed",
        "stopped",
        "skipped",
        "skipped",
        "skipped",
        "ok",
    ]


def test_pytest_outcome_is_read_from_its_report(tmp_path):
    (tmp_path / "test_sample.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    assert 1 == 2\n")
    record = core.run_pytest(["-q", "test_sample.py"], time_limit=120, cwd=tmp_path)
    assert (record["status"], record["passed"], record["failed"]) == ("failed", 1, 1)
    assert record["first_failure"].startswith("test_sample::test_b: assert 1 == 2")
    nothing = core.run_pytest(["-q", "-k", "nothing"], time_limit=120, cwd=tmp_path)
    assert nothing["status"] == "failed: no test selected"
    assert core.run_cuda_tests("cpu", 60)["status"].startswith("not run: this run is on cpu")


@pytest.fixture
def variant():
    """A variant of our kernel registered as a later engineer would: 16 x 16 forward tiles."""
    calls = []

    def change(kernel, config):
        calls.append((kernel, config))
        return config._replace(block_m=16, block_n=16) if kernel == "fwd" else config

    backends.register(backends.triton_variant("triton-16x16", "16 x 16 forward tiles", change))
    yield calls
    del backends.BACKENDS["triton-16x16"]


@pytest.mark.usefixtures("one_thread")
def test_a_registered_variant_is_timed_and_checked_next_to_the_others(tmp_path, variant):
    plan = replace(
        plans.SMOKE, table_backends=(*backends.ours(), *backends.PEERS), table_seqlens=(33,), table_head_dims=(16,)
    )
    run = core.Run(tmp_path / "quick.json", "cpu", "test")
    for section, key, fn in quick.plan_cells(run, plan):
        if section in ("parity", "kernel_table") and key["backend"] in ("triton", "triton-16x16", "sdpa"):
            run.cell(section, key, fn)
        if section == "host_time":
            break
    variant_cells = schema.cells(run.results, "kernel_table", backend="triton-16x16")
    assert {c["pass"] for c in variant_cells} == {"fwd", "fwd_bwd"}
    assert all(c["status"] == "ok" and c["result"]["tflops"] > 0 for c in variant_cells)
    parity = schema.cells(run.results, "parity", backend="triton-16x16")
    assert parity and parity[0]["result"]["tolerance_used"] <= 1.0
    fwd = triton_configs.INTERPRETER_CONFIGS["fwd"]
    assert ("fwd", fwd) in variant and {k for k, _ in variant} == {"fwd", "dkdv", "dq"}
    assert "triton-16x16 TFLOP/s" in (tmp_path / "quick.md").read_text()


def test_a_variant_computes_the_same_attention(variant):
    shape = AttentionShape(1, 2, 40, 16)
    q, k, v = measure.qkv(shape, torch.float32, "cpu", requires_grad=False)
    forced = backends.BACKENDS["triton-16x16"].make(40, "cpu")(q, k, v)
    default = backends.BACKENDS["reference"].make(40, "cpu")(q, k, v)
    torch.testing.assert_close(forced, default, atol=1e-5, rtol=1e-5)


def test_gpu_verdicts_and_tables_from_made_up_numbers():
    """CI never runs on a GPU, so the verdicts and tables of a GPU run are checked on invented
    numbers (test data, not measurements): triton 10% faster than cuDNN in the kernel table, host
    time within bounds forward and missed forward + backward, one decode cell missing."""
    results = schema.new_results("test", {"device": "cuda", "device_name": "GPU", "date": "2026-01-01"})

    def add(section, result, **key):
        results["sections"][section]["cells"].append({**key, "status": "ok", "result": result})

    for d in (64, 128):
        for t in (1024, 4096, 16384):
            for mode in ("fwd", "fwd_bwd"):
                key = {"pass": mode, "dtype": "bfloat16", "head_dim": d, "seqlen": t, "batch": 16384 // t, "heads": 16}
                for backend, ms in (("triton", 0.9), ("sdpa", 1.0), ("sdpa-cudnn", 1.0), ("sdpa-flash", 1.2)):
                    add("kernel_table", {"ms": ms, "tflops": 500 / ms}, backend=backend, **key)
    for mode, ours, theirs in (("fwd", 70.0, 50.0), ("fwd_bwd", 800.0, 500.0)):
        for backend, host in (("triton", ours), ("sdpa", theirs)):
            add("host_time", {"host_us": host, "wall_us": host}, backend=backend, **{"pass": mode})
    for d in (64, 128):
        for n in (256, 1024, 4096, 8192):  # the 64-key cache is missing
            for backend in ("triton", "sdpa"):
                add("decode", {"ms": 0.01, "wall_us": 20.0}, backend=backend, head_dim=d, kv_len=n)
        missing = {"backend": "triton", "head_dim": d, "kv_len": 64, "status": "failed: x"}
        results["sections"]["decode"]["cells"].append(missing)
        for kind, seconds in (("fwd", 3.0), ("fwd_bwd", 4.0), ("decode", 2.0 if d == 64 else 5.0)):
            add("first_call", {"seconds": seconds, "made_in": "x"}, backend="triton", head_dim=d, **{"pass": kind})
    for what in ("train", "sample"):
        for backend, tokens_per_s in (("triton", 1000.0), ("sdpa", 900.0)):
            add("training", {"tokens_per_s": tokens_per_s}, backend=backend, what=what, model="default")

    verdicts = {t["target"]: t["verdict"] for t in targets.evaluate(results)}
    by_text = {t.text: t for t in targets.TARGETS}
    assert set(verdicts) == set(by_text)

    def verdict(*words):
        (match,) = [text for text in verdicts if all(w in text for w in words)]
        return verdicts[match]

    assert verdict("parity") == "not measured"
    assert verdict("fwd,", "1k-16k", "1.0x cuDNN") == "met"
    assert verdict("fwd+bwd", "4k-16k", "1.1x cuDNN") == "met"  # 1 / 0.9 = 1.11
    assert verdict("600 TFLOP/s") == "not met"  # 500 / 0.9 = 556
    assert verdict("host time per fwd call") == "met"  # 1.4x
    assert verdict("host time per fwd+bwd call") == "not met"  # 1.6x
    assert verdict("first call") == "not met"  # 3 + 4 + 5 s at head dim 128
    assert verdict("decode", "wall time") == "not measured (8 of 10 cells measured)"
    assert verdict("training tokens/s") == "met" and verdict("sampling tokens/s") == "met"  # 1.11x
    cpu = dict(results, environment={"device": "cpu"})
    assert all(t["verdict"].startswith(("n/a on cpu", "not measured")) for t in targets.evaluate(cpu))


def test_results_go_under_the_device_name():
    assert core.device_slug({"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
    assert core.device_slug({"device": "cpu", "device_name": "AMD EPYC"}) == "cpu"
    assert quick.RESULTS_DIR == REPO / "bench" / "results"
