"""bench.flops and bench.report on a small synthetic pytest-benchmark JSON; and that a plain
pytest run skips the benchmark suites. No benchmark runs here."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import report
from bench.flops import attention_flops, constant_token_shape, tflops

REPO = Path(__file__).resolve().parents[1]
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


def _bench(group, median, **extra):
    return {
        "group": group,
        "name": f"test[{group}-{extra.get('backend')}]",
        "fullname": "x",
        "params": {},
        "param": None,
        "extra_info": extra,
        "options": {},
        "stats": {
            "min": median * 0.9,
            "max": median * 1.2,
            "mean": median,
            "median": median,
            "stddev": 0.0,
            "rounds": 5,
            "iterations": 1,
        },
    }


def synthetic(device_env=CPU_ENV, dtype="float32", seqlens=(128, 256), backends=("reference", "sdpa", "triton")):
    """Attention (sdpa 1 ms per call at every shape, reference 4x slower, triton 2x faster),
    memory and training entries."""
    speed = {"reference": 0.25, "sdpa": 1.0, "triton": 2.0}
    benchmarks = []
    for mode in ("fwd", "fwd_bwd"):
        for head_dim in (64, 128):
            for seqlen in seqlens:
                shape = constant_token_shape(seqlen, head_dim, tokens=2048, model_dim=256)
                flops = attention_flops(shape.batch, shape.heads, seqlen, seqlen, head_dim, mode=mode)
                group = f"attention {mode} {dtype} d{head_dim} T{seqlen}"
                for backend in backends:
                    benchmarks.append(
                        _bench(
                            group,
                            1e-3 / speed[backend],
                            kind="attention",
                            suite="main",
                            backend=backend,
                            mode=mode,
                            causal=True,
                            dtype=dtype,
                            flops=flops,
                            **shape.as_dict(),
                        )
                    )
    for seqlen in seqlens:
        for backend, per_t in (("reference", 4e-5), ("sdpa", 1e-3), ("triton", 5e-4)):
            peak = int(per_t * seqlen * (seqlen if backend == "reference" else 1) * 2**20 / 128)
            benchmarks.append(
                _bench(
                    f"memory T{seqlen}",
                    1e-3,
                    kind="memory",
                    backend=backend,
                    mode="fwd_bwd",
                    dtype=dtype,
                    seqlen=seqlen,
                    batch=1,
                    heads=4,
                    head_dim=64,
                    peak_bytes=peak,
                )
            )
    for backend, step_s in (("reference", 0.2), ("sdpa", 0.1), ("triton", 0.08)):
        common = dict(
            kind="training",
            backend=backend,
            config="default",
            model="4 layers",
            batch_size=8,
            seq_len=64,
            tokens_per_step=512,
            dtype=dtype,
        )
        benchmarks.append(_bench("training throughput default", step_s, metric="throughput", **common))
        benchmarks.append(
            _bench(
                "training time-to-loss default",
                step_s * 10,
                metric="time_to_loss",
                target_loss=7.5,
                steps=10,
                reached=True,
                **common,
            )
        )
    return {
        "machine_info": {"bench_env": {k: v for k, v in device_env.items() if k != "date"}},
        "bench_env": device_env,
        "benchmarks": benchmarks,
        "datetime": device_env["date"],
        "version": "5.3.1",
    }


def test_annotate_ratios_uses_sdpa_of_the_same_group():
    data = synthetic()
    report.annotate_ratios(data["benchmarks"])
    for b in data["benchmarks"]:
        i = b["extra_info"]
        if i["kind"] == "memory":
            assert "speedup_vs_sdpa" not in i
        elif i["kind"] == "attention":
            assert i["speedup_vs_sdpa"] == pytest.approx({"reference": 0.25, "sdpa": 1.0, "triton": 2.0}[i["backend"]])
    triton_training = [
        b
        for b in data["benchmarks"]
        if b["extra_info"]["kind"] == "training" and b["extra_info"]["backend"] == "triton"
    ]
    assert all(b["extra_info"]["speedup_vs_sdpa"] == pytest.approx(1.25) for b in triton_training)


def test_attention_table_rows_columns_and_ratios():
    data = synthetic()
    text = report.attention_tables(data["benchmarks"], caption="CAPTION")
    assert "#### Causal attention, forward, float32" in text
    assert "#### Causal attention, forward + backward, float32" in text
    assert (
        "| seqlen | head dim | batch × heads | reference TFLOP/s (× sdpa) | sdpa TFLOP/s | triton TFLOP/s (× sdpa) |"
        in text
    )
    # fwd, T=128, d=64: batch 16, heads 4; 4*16*4*128*128*64/2 FLOP in 1 ms (sdpa), 0.5 ms (triton)
    flops = 4 * 16 * 4 * 128 * 128 * 64 / 2
    row = next(line for line in text.splitlines() if line.startswith("| 128 | 64 | 16 × 4 |"))
    assert report.fmt(flops / 1e-3 / 1e12) in row
    assert f"{report.fmt(flops / 5e-4 / 1e12)} (2.00×)" in row
    assert "(0.25×)" in row
    assert text.count("_CAPTION_") == 2


def test_missing_backend_shows_a_dash():
    data = synthetic()
    data["benchmarks"] = [
        b
        for b in data["benchmarks"]
        if not (b["extra_info"].get("backend") == "triton" and b["extra_info"].get("seqlen") == 256)
    ]
    text = report.attention_tables(data["benchmarks"])
    row = next(line for line in text.splitlines() if line.startswith("| 256 | 64 |"))
    assert row.rstrip().endswith("| — |")


def test_write_report_makes_markdown_and_pngs(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(synthetic()))
    written = report.write_report(path, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == ["attention_float32.png", "memory.png", "report.md", "training.png"]
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# Benchmark results — CPU")
    assert "Measured on CPU" in md
    for needle in ("Test CPU 9000", "torch 2.13.0+cpu", "triton 3.9.0", "CUDA none", "2026-01-02"):
        assert needle in md
    # every table carries the device and versions
    tables = md.count("| seqlen |") + md.count("| backend |")
    assert tables == 4  # attention forward, attention forward + backward, memory, training
    assert md.count("_CPU · Test CPU 9000 · torch 2.13.0+cpu · triton 3.9.0 · CUDA none · 2026-01-02_") == tables
    assert "![attention_float32](attention_float32.png)" in md
    assert "cannot be judged from this run" in md  # no GPU target verdict from CPU numbers
    # training: 512 tokens per 0.1 s step for sdpa, triton 1.25x
    assert "5,120" in md and "1.25×" in md


def test_cli(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(synthetic()))
    assert report.main([str(path), "--out", str(tmp_path / "o"), "--stat", "min"]) == 0
    assert "report.md" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": 1}))
    assert report.main([str(bad)]) == 1
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err


def test_targets_on_cuda_are_checked_against_the_run():
    env = dict(CPU_ENV, device="cuda", device_name="NVIDIA H100 80GB HBM3", cuda="12.8")
    data = synthetic(env, dtype="bfloat16", seqlens=(1024, 16384))
    text = report.targets_section(data["benchmarks"], env)
    assert "worst 2.00× (T=1024, d=64) | yes |" in text
    # synthetic shapes have 2048 tokens and model dim 256: fwd d128 16k is batch 1 x 2 heads,
    # 4 * 2 * 16384^2 * 128 / 2 = 1.374e11 FLOP in 0.5 ms = 275 TFLOP/s, short of 450
    assert "| 275 TFLOP/s | no |" in text
    assert "training tokens/s, triton ≥ sdpa | 1.25× | yes" in text
    slow = synthetic(env, dtype="bfloat16", seqlens=(1024,), backends=("sdpa", "reference"))
    assert "not measured" in report.targets_section(slow["benchmarks"], env)


def test_plain_pytest_run_skips_every_benchmark():
    """bench/conftest.py turns --benchmark-skip on unless --benchmark-only/--benchmark-enable is given."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-q", "-rs", "-p", "no:cacheprovider", "-k", "not memory_is_linear"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "failed" not in summary, summary
    assert "--benchmark-skip active" in result.stdout
    assert time.perf_counter() - started < 120


def test_several_jsons_merge_and_keep_ratios_within_each_run(tmp_path):
    first, second = synthetic(), synthetic()
    for b in second["benchmarks"]:  # a second run where sdpa was twice as slow
        if b["extra_info"].get("backend") == "sdpa":
            b["stats"] = {k: (v * 2 if isinstance(v, float) else v) for k, v in b["stats"].items()}
    second["bench_env"] = dict(CPU_ENV, date="2026-01-05T00:00:00+00:00")
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for p, d in zip(paths, (first, second)):
        p.write_text(json.dumps(d))
    merged = report.load_many(paths)
    report.annotate_ratios(merged["benchmarks"])
    triton = [
        b["extra_info"]["speedup_vs_sdpa"]
        for b in merged["benchmarks"]
        if b["extra_info"]["kind"] == "attention" and b["extra_info"]["backend"] == "triton"
    ]
    assert sorted(set(round(r, 6) for r in triton)) == [2.0, 4.0]
    assert merged["bench_env"]["date"] == "2026-01-02 to 2026-01-05"
    other = synthetic(dict(CPU_ENV, device_name="Another CPU"))
    (tmp_path / "c.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="device_name"):
        report.load_many([paths[0], tmp_path / "c.json"])


def test_tables_leave_their_input_unchanged():
    data = synthetic()
    before = json.dumps(data, sort_keys=True)
    report.summary_text(data["benchmarks"])
    report.targets_section(data["benchmarks"], CPU_ENV)
    assert json.dumps(data, sort_keys=True) == before
