"""bench.quick is the first thing every GPU session runs, with minutes of GPU time to spend: it must
not crash there. `--smoke` runs the same code on tiny shapes on the CPU (our kernel interpreted,
the CUDA-only sdpa kernels skipped with their reason), and these tests check what it writes."""

import json
import math

import pytest
import torch
from helpers import run_module
from tolerances import ABS_FLOOR, ERROR_RATIO

SECTIONS = ("parity", "kernel_table", "host_time", "decode", "training", "first_call")
# The fields each section's measured cells must carry, all positive numbers.
TIMINGS = {
    "kernel_table": ("ms", "tflops"),
    "host_time": ("host_us", "wall_us"),
    "decode": ("ms", "host_us", "wall_us"),
    "training": ("seconds", "tokens_per_s"),
    "first_call": ("seconds",),
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    proc = run_module("bench.quick", ["--smoke", "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "quick.json").read_text()), (out / "quick.md").read_text(), proc.stdout


def test_smoke_measures_every_cell(smoke):
    results, _, _ = smoke
    assert results["smoke"] and results["finished"]
    for key in ("device", "device_name", "torch", "triton", "cuda", "cudnn", "date"):
        assert key in results["environment"], key
    for section in SECTIONS:
        assert results["sections"][section]["status"] == "done", section
        cells = results["sections"][section]["cells"]
        assert cells, f"{section} recorded no cell"
        for cell in cells:
            if cell["status"] != "ok":
                # Without CUDA only the pinned sdpa kernels may be skipped; nothing may fail or run late.
                assert cell["status"].startswith(("skipped: sdpa-flash", "skipped: sdpa-cudnn")), (section, cell)
                continue
            for field in TIMINGS.get(section, ()):
                assert isinstance(cell[field], float) and cell[field] > 0, (section, field, cell)


def test_smoke_covers_both_backends_everywhere(smoke):
    results, _, _ = smoke
    ran = {
        (section, c.get("backend"))
        for section in SECTIONS
        for c in results["sections"][section]["cells"]
        if c["status"] == "ok"
    }
    for section in ("kernel_table", "host_time", "decode", "training"):
        assert {(section, "triton"), (section, "sdpa")} <= ran, section
    # The first call of our kernel is recorded for every head dim and kind of call the table checks.
    first = {(c["head_dim"], c["pass"]) for c in results["sections"]["first_call"]["cells"] if c["backend"] == "triton"}
    head_dims = {c["head_dim"] for c in results["sections"]["kernel_table"]["cells"]}
    assert {(d, kind) for d in head_dims for kind in ("fwd", "fwd_bwd", "decode")} <= first


def test_smoke_parity_is_within_the_project_tolerance(smoke):
    """tests/tolerances.py's rule, with sdpa at the same precision as the baseline."""
    results, _, _ = smoke
    cells = results["sections"]["parity"]["cells"]
    assert [c["status"] for c in cells] == ["ok", "ok"]
    for cell in cells:
        assert {r["tensor"] for r in cell["errors"]} == (
            {"out", "dq", "dk", "dv"} if "training" in cell["case"] else {"out"}
        )
        for row in cell["errors"]:
            err, base = row["triton_max_err"], row["sdpa_max_err"]
            assert math.isfinite(err) and math.isfinite(base) and base > 0, row
            assert err <= ERROR_RATIO * base + ABS_FLOOR[torch.bfloat16], (cell["case"], row)


def test_smoke_markdown(smoke):
    results, markdown, stdout = smoke
    assert markdown.startswith("# Quick GPU check (--smoke")
    assert "| D | T | triton fwd | sdpa fwd | sdpa-flash fwd | sdpa-cudnn fwd | x sdpa fwd |" in markdown
    assert "| issue | target | measured | verdict |" in markdown
    for target in results["targets"]:
        assert target["verdict"].startswith(("met", "not met", "n/a", "not measured")), target
    assert markdown in stdout  # printed last: the tail of the output is what a device call returns


def test_no_budget_skips_every_cell_and_still_writes(tmp_path):
    proc = run_module("bench.quick", ["--smoke", "--budget", "0", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "quick.json").read_text())
    cells = [c for s in SECTIONS for c in results["sections"][s]["cells"]]
    assert cells and all(c["status"] == "skipped: time budget" for c in cells)
    assert all(t["verdict"].startswith(("not measured", "n/a")) for t in results["targets"])
    assert "| D | T | triton fwd |" in (tmp_path / "quick.md").read_text()


def test_a_cell_records_its_failure_and_the_run_goes_on(tmp_path):
    from bench import quick

    run = quick.Run(quick.SMOKE, torch.device("cpu"), tmp_path, budget_s=1e6, smoke=True, argv=["--smoke"])

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    def interrupted():
        raise quick.HardDeadline()

    def unsupported():
        raise quick.Skipped("no kernel for this shape")

    assert (
        run.cell("decode", {"backend": "triton"}, broken)["status"]
        == "failed: RuntimeError: CUDA error: an illegal memory access was encountered"
    )
    assert run.cell("decode", {"backend": "sdpa"}, interrupted)["status"].startswith("stopped:")
    assert run.cell("decode", {"backend": "x"}, unsupported)["status"] == "skipped: no kernel for this shape"
    assert run.cell("decode", {"backend": "y"}, lambda: {"ms": 1.0})["status"] == "ok"
    written = json.loads((tmp_path / "quick.json").read_text())  # rewritten after every cell
    assert [c["status"].split(":")[0] for c in written["sections"]["decode"]["cells"]] == [
        "failed",
        "stopped",
        "skipped",
        "ok",
    ]
    assert "RuntimeError" in written["sections"]["decode"]["cells"][0]["traceback"]


def test_gpu_verdicts_and_tables_from_made_up_numbers(tmp_path):
    """CI never runs on a GPU, so the verdicts and tables of a full GPU run are checked here on
    invented numbers (they are test data, not measurements): triton 10% faster than sdpa in the
    kernel table, host time met forward and missed forward + backward, one decode cell missing."""
    from bench import quick

    plan = quick.FULL
    run = quick.Run(plan, torch.device("cpu"), tmp_path, budget_s=1e6, smoke=False, argv=[])
    run.results["environment"]["device"] = "cuda"
    sections = run.results["sections"]

    def add(section, **cell):
        sections[section]["cells"].append({"status": "ok", **cell})

    B, H, T, D = plan.parity_train
    add(
        "parity",
        case="training",
        shape=quick.shape_dict(B, H, T, T, D),
        errors=[{"tensor": "out", "triton_max_err": 3e-3, "sdpa_max_err": 2e-3, "ratio": 1.5}],
    )
    for d in plan.table_head_dims:
        for t in plan.table_seqlens:
            for mode in quick.PASSES:
                for backend, ms in (("triton", 0.9), ("sdpa", 1.0), ("sdpa-flash", 1.2)):
                    add("kernel_table", backend=backend, head_dim=d, seqlen=t, ms=ms, tflops=500 / ms, **{"pass": mode})
                sections["kernel_table"]["cells"].append(
                    {
                        "backend": "sdpa-cudnn",
                        "head_dim": d,
                        "seqlen": t,
                        "pass": mode,
                        "status": "failed: RuntimeError: x",
                    }
                )
    for mode, ours, theirs in (("fwd", 70.0, 50.0), ("fwd_bwd", 600.0, 500.0)):
        add("host_time", backend="triton", host_us=ours, device_us=10.0, wall_us=ours, **{"pass": mode})
        add("host_time", backend="sdpa", host_us=theirs, device_us=10.0, wall_us=theirs, **{"pass": mode})
    for d in plan.decode_head_dims:
        for n in plan.decode_kv_lens[1:]:  # the shortest cache is missing
            for backend in ("triton", "sdpa"):
                add("decode", backend=backend, head_dim=d, kv_len=n, ms=0.01, wall_us=20.0)
    for d in plan.table_head_dims:
        for kind, seconds in (("fwd", 3.0), ("fwd_bwd", 4.0), ("decode", 2.0 if d == 64 else 5.0)):
            add("first_call", backend="triton", head_dim=d, seconds=seconds, where="x", **{"pass": kind})
    for shape in plan.models:
        for what in ("train", "sample"):
            for backend, tokens_per_s in (("triton", 1000.0), ("sdpa", 900.0)):
                add("training", backend=backend, what=what, tokens_per_s=tokens_per_s, **quick.asdict(shape))

    markdown = run.write()
    verdicts = {t["target"]: t["verdict"] for t in run.results["targets"]}
    assert verdicts["parity: triton's max error <= 2x sdpa's at the same precision"] == "met"
    assert verdicts["fwd, bf16, causal: triton >= 1.0x sdpa's TFLOP/s at every T and D"] == "met"
    assert verdicts["fwd+bwd stretch: >= 1.1x sdpa at T >= 4k"] == "met"  # 1 / 0.9 = 1.11
    assert verdicts["fwd at D 128, T 16k: triton >= 600 TFLOP/s"] == "not met"  # 500 / 0.9 = 556
    assert verdicts["fwd+bwd at D 128, T 16k: triton >= 550 TFLOP/s"] == "met"
    assert verdicts["host time per fwd call <= 75 us and <= 1.5x sdpa's"] == "met"
    assert verdicts["host time per fwd+bwd call <= 550 us and <= 1.5x sdpa's"] == "not met"
    assert verdicts["first calls at head dim 64 (fwd, fwd+bwd, decode together) <= 10 s"] == "met"
    assert verdicts["first calls at head dim 128 (fwd, fwd+bwd, decode together) <= 10 s"] == "not met"
    assert (
        verdicts["decode wall time per call <= sdpa's at every kv_len and D"] == "not measured (8 of 10 cells measured)"
    )
    assert verdicts["training tokens/s, long model: triton >= 1.0x sdpa"] == "met"
    assert "| 128 | 16384 | 556 | 500 | 417 | failed | 1.11 |" in markdown
    assert "- failed: RuntimeError: x: kernel_table backend=sdpa-cudnn" in markdown
