"""bench.flops, and bench.report and bench.targets on a small synthetic results file; and that a
plain pytest run skips the benchmark suites. No benchmark runs here."""

import json
import subprocess
import sys
import time

import pytest
from helpers import REPO

from bench import report, schema, targets
from bench.flops import attention_flops, constant_token_shape, tflops

CPU_ENV = {
    "device": "cpu",
    "device_name": "Test CPU 9000",
    "torch": "2.13.0+cpu",
    "triton": "3.9.0",
    "cuda": None,
    "cudnn": None,
    "date": "2026-01-02T03:04:05+00:00",
}


# ---------------------------------------------------------------------------------------------
# FLOP counts


def test_attention_flops_counts_two_matmuls_halved_when_causal():
    # q k^T and p v: 2 * (T x T x D) multiply-adds, 2 FLOPs each.
    assert attention_flops(1, 1, 2, 2, 1, causal=False) == 16
    assert attention_flops(1, 1, 2, 2, 1, causal=True) == 8
    assert attention_flops(2, 3, 4, 4, 5, causal=False) == 4 * 2 * 3 * 4 * 4 * 5


def test_backward_is_2_5x_and_fwd_bwd_3_5x_forward():
    fwd = attention_flops(4, 8, 256, 256, 64, mode="fwd")
    assert attention_flops(4, 8, 256, 256, 64, mode="bwd") == pytest.approx(2.5 * fwd)
    assert attention_flops(4, 8, 256, 256, 64, mode="fwd_bwd") == pytest.approx(3.5 * fwd)
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 1, 1, 1, mode="backward")


def test_flash_attention_convention_16k_tokens():
    for seqlen in (512, 1024, 2048, 4096, 8192, 16384):
        for head_dim in (64, 128):
            shape = constant_token_shape(seqlen, head_dim)
            assert shape.batch * seqlen == 16384
            assert shape.heads * head_dim == 2048
    shape = constant_token_shape(16384, 128)
    assert (shape.batch, shape.heads) == (1, 16)
    # causal forward at 16k, d128: 4 * 16 * 16384^2 * 128 / 2 = 1.0995e12 FLOP
    assert attention_flops(1, 16, 16384, 16384, 128) == pytest.approx(1.099511627776e12)
    assert constant_token_shape(32768, 64).batch == 1  # never zero


def test_tflops():
    assert tflops(2e12, 0.5) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        tflops(1.0, 0.0)


# ---------------------------------------------------------------------------------------------
# Report


def synthetic(device="cpu") -> dict:
    """A results file: sdpa 1 ms per attention call at every shape, reference 4x slower, triton
    2x faster (triton missing at T 256); memory; training throughput."""
    env = dict(CPU_ENV, device=device)
    results = schema.new_results("pytest bench --benchmark-only", env)
    speed = {"reference": 0.25, "sdpa": 1.0, "triton": 2.0}
    for mode in ("fwd", "fwd_bwd"):
        for head_dim in (64, 128):
            for seqlen in (128, 256):
                shape = constant_token_shape(seqlen, head_dim, tokens=2048, model_dim=256)
                flops = attention_flops(shape.batch, shape.heads, seqlen, seqlen, head_dim, mode=mode)
                for backend, s in speed.items():
                    key = {"backend": backend, "pass": mode, "dtype": "float32", **shape.as_dict()}
                    cell = {**key, "status": "ok", "result": {"ms": 1 / s, "tflops": tflops(flops, 1e-3 / s)}}
                    if backend == "triton" and seqlen == 256:
                        cell = {**key, "status": "skipped: not here"}
                    results["sections"]["kernel_table"]["cells"].append(cell)
    for seqlen in (128, 256):
        for backend, mib in (("reference", seqlen / 8), ("sdpa", 1.0), ("triton", 0.5)):
            key = {"backend": backend, "pass": "fwd_bwd", "dtype": "float32", "batch": 1, "heads": 4, "seqlen": seqlen}
            cell = {**key, "head_dim": 64, "status": "ok", "result": {"ms": 1.0, "peak_mib": mib}}
            results["sections"]["memory"]["cells"].append(cell)
    for backend, tokens_per_s in (("reference", 2560.0), ("sdpa", 5120.0), ("triton", 6400.0)):
        key = {"backend": backend, "model": "default", "shape": "4 layers", "batch_size": 16, "seq_len": 128}
        cell = {**key, "what": "train", "dtype": "float32", "status": "ok", "result": {"tokens_per_s": tokens_per_s}}
        results["sections"]["training"]["cells"].append(cell)
    results["targets"] = targets.evaluate(results)
    return results


def test_tables_show_each_number_with_its_speed_relative_to_sdpa():
    markdown = report.render_markdown(synthetic())
    assert "#### Kernel table: dtype float32, pass forward" in markdown
    assert "#### Kernel table: dtype float32, pass forward + backward" in markdown
    header = "| head dim | seqlen | batch | heads | triton TFLOP/s | reference TFLOP/s | sdpa TFLOP/s |"
    assert header in markdown
    # fwd, T 128, d 64: batch 16, heads 4; 4*16*4*128*128*64/2 FLOP in 1 ms (sdpa), 0.5 ms (triton)
    flops = 4 * 16 * 4 * 128 * 128 * 64 / 2
    row = next(line for line in markdown.splitlines() if line.startswith("| 64 | 128 | 16 | 4 |"))
    assert f"| {report.fmt(flops / 5e-4 / 1e12)} (2.00×) | {report.fmt(flops / 4e-3 / 1e12)} (0.25×) |" in row
    assert row.endswith(f"| {report.fmt(flops / 1e-3 / 1e12)} |")  # sdpa: the baseline, no ratio
    assert next(line for line in markdown.splitlines() if line.startswith("| 64 | 256 |")).count("| skipped |") == 1
    assert "| default | 4 layers | 16 | 128 | float32 | 6,400 (1.25×) | 2,560 (0.50×) | 5,120 |" in markdown
    assert "- skipped: not here: kernel_table backend=triton pass=fwd" in markdown
    for needle in ("Test CPU 9000", "torch 2.13.0+cpu", "triton 3.9.0", "2026-01-02", "Measured on a CPU"):
        assert needle in markdown


def test_report_cli_writes_markdown_and_pngs(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(synthetic()))
    assert report.main([str(path), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip().endswith("bench.md")
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["bench-kernels-float32.png", "bench-memory.png", "bench-training.png"]
    for name in pngs:
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    markdown = (tmp_path / "out" / "bench.md").read_text()
    assert markdown.startswith("# Benchmark results: Test CPU 9000") and "![bench-memory](bench-memory.png)" in markdown
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmarks": []}))
    assert report.main([str(bad)]) == 1
    assert "not a results file" in capsys.readouterr().err


def test_targets_on_cuda_are_judged_and_on_a_cpu_not():
    cpu = {t["target"]: t["verdict"] for t in synthetic()["targets"]}
    assert all(v.startswith(("n/a on cpu", "not measured")) for v in cpu.values())
    gpu = {t["target"]: t for t in targets.evaluate(synthetic("cuda"))}
    training = gpu["training tokens/s (gpt.train's step): triton >= 1.05x sdpa"]
    assert (training["measured"], training["verdict"]) == ("1.25x sdpa", "met")
    assert gpu["fwd, bf16 causal, D 128, T 16k: triton >= 600 TFLOP/s"]["verdict"] == "not measured"  # float32 only


def test_plain_pytest_run_skips_every_benchmark():
    """bench/conftest.py turns --benchmark-skip on unless --benchmark-only/--benchmark-enable is given."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "failed" not in summary, summary
    assert "--benchmark-skip active" in result.stdout
    assert time.perf_counter() - started < 120


def test_rendering_leaves_the_results_unchanged():
    results = synthetic()
    before = json.dumps(results, sort_keys=True)
    report.render_markdown(results)
    targets.evaluate(results)
    assert json.dumps(results, sort_keys=True) == before
