"""Turn a pytest-benchmark JSON into markdown tables and PNG plots.

    PYTHONPATH=. pytest bench --benchmark-only --benchmark-json=bench/results/h100/bench.json
    python -m bench.report bench/results/h100/bench.json --out bench/results/h100
    python -m bench.report attention.json memory.json training.json --out DIR   # one machine, several runs

Writes OUT/report.md and OUT/attention_<dtype>.png (TFLOP/s against sequence length, one panel
per pass and head dim), OUT/memory.png and OUT/training.png when those suites ran.

Numbers come from the benchmarks' own statistics (--stat, median by default): TFLOP/s =
extra_info["flops"] / time, and "x sdpa" is sdpa's time over the backend's time for the same
problem (same benchmark group) in the same run, i.e. > 1 means faster than sdpa.
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from bench.backends import ATTENTION_BACKENDS, BASELINE
from bench.flops import tflops

MODE_NAMES = {"fwd": "forward", "fwd_bwd": "forward + backward"}
RATIO_KINDS = ("attention", "training")
COLORS = {
    "reference": "tab:gray",
    "sdpa": "tab:blue",
    "sdpa-flash": "tab:orange",
    "sdpa-efficient": "tab:green",
    "sdpa-cudnn": "tab:purple",
    "flex": "tab:red",
    "triton": "black",
}


def line_style(backend: str) -> dict:
    style = {"color": COLORS.get(backend), "linewidth": 1.5}
    if backend == "triton":
        style["linewidth"] = 2.6
    elif backend == BASELINE:
        style.update(linewidth=2.2, linestyle="--")
    elif backend == "reference":
        style["linestyle"] = ":"
    return style


# The GPU goals of the project (H100), checked when a CUDA run has the data.
TARGET_FWD_TFLOPS = 450.0


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def load(path) -> dict:
    with open(path) as f:
        data = json.load(f)
    if "benchmarks" not in data:
        raise ValueError(
            f"{path} is not a pytest-benchmark JSON (no 'benchmarks' key); "
            "make one with pytest --benchmark-only --benchmark-json=PATH"
        )
    return data


SAME_ENV_KEYS = ("device", "device_name", "torch", "triton", "cuda")


def load_many(paths) -> dict:
    """Several JSONs of one machine (e.g. the suites run as separate commands) as one; each
    benchmark remembers its file in b["run"], so ratios to sdpa stay within one run."""
    runs = [load(p) for p in paths]
    envs = [environment_of(d) for d in runs]
    for path, env in zip(paths[1:], envs[1:]):
        differ = [k for k in SAME_ENV_KEYS if env.get(k) != envs[0].get(k)]
        if differ:
            raise ValueError(
                f"{path} differs from {paths[0]} in {', '.join(differ)}: "
                "report runs of different devices or versions separately"
            )
    merged = dict(runs[0], benchmarks=[])
    for i, data in enumerate(runs):
        for b in data["benchmarks"]:
            merged["benchmarks"].append(dict(b, run=i))
    dates = sorted(str(env.get("date", "?"))[:10] for env in envs)
    merged["bench_env"] = dict(envs[0], date=dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}")
    return merged


def environment_of(data: dict) -> dict:
    """Device and versions: bench/conftest.py writes them; older or foreign JSONs get a fallback."""
    env = dict(data.get("machine_info", {}).get("bench_env", {}))
    env.update(data.get("bench_env", {}))
    if "device_name" not in env:
        cpu = data.get("machine_info", {}).get("cpu", {})
        env.setdefault("device", "unknown")
        env["device_name"] = cpu.get("brand_raw") or data.get("machine_info", {}).get("processor") or "unknown"
    env.setdefault("date", data.get("datetime", "unknown date"))
    return env


def env_caption(env: dict) -> str:
    device = str(env.get("device", "?")).upper()
    date = str(env.get("date", "?"))[:10]
    return (
        f"{device} · {env.get('device_name', '?')} · torch {env.get('torch', '?')} · "
        f"triton {env.get('triton') or 'none'} · CUDA {env.get('cuda') or 'none'} · {date}"
    )


def seconds(bench: dict, stat: str = "median") -> float:
    return float(bench["stats"][stat])


def info(bench: dict) -> dict:
    return bench.get("extra_info") or {}


def of_kind(benchmarks, kind: str) -> list:
    return [b for b in benchmarks if info(b).get("kind") == kind]


def backend_sort_key(name: str):
    order = ATTENTION_BACKENDS
    return (order.index(name) if name in order else len(order), name)


def ratio_key(bench: dict) -> tuple:
    """Which benchmark this is within a (merged) JSON: b["run"] says which file it came from."""
    return bench.get("run"), bench.get("group"), info(bench).get("backend")


def speedups(benchmarks, stat: str = "median") -> dict:
    """{ratio_key: sdpa's time / this benchmark's time}, within each benchmark group of one run,
    for the kinds that have a ratio. Reads the benchmarks, never changes them."""
    with_ratio = [b for b in benchmarks if info(b).get("kind") in RATIO_KINDS and b.get("stats")]
    baseline = {
        (b.get("run"), b.get("group")): seconds(b, stat) for b in with_ratio if info(b).get("backend") == BASELINE
    }
    return {
        ratio_key(b): baseline[(b.get("run"), b.get("group"))] / seconds(b, stat)
        for b in with_ratio
        if (b.get("run"), b.get("group")) in baseline
    }


def annotate_ratios(benchmarks, stat: str = "median") -> None:
    """Write each ratio into the benchmark JSON itself: extra_info["speedup_vs_sdpa"] (bench/conftest.py)."""
    ratios = speedups(benchmarks, stat)
    for b in benchmarks:
        if ratio_key(b) in ratios:
            b["extra_info"]["speedup_vs_sdpa"] = ratios[ratio_key(b)]


def fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "—"
    return f"{r:.2f}×" if r >= 0.01 else f"{r:.2g}×"


def _markdown(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def attention_index(benchmarks, stat: str = "median", suite: str = "main") -> dict:
    """{(dtype, mode): {(head_dim, seqlen): {backend: (tflops, ratio, bench)}}} for one suite."""
    ratios = speedups(benchmarks, stat)
    index = defaultdict(lambda: defaultdict(dict))
    for b in of_kind(benchmarks, "attention"):
        i = info(b)
        if i.get("suite", "main") != suite:
            continue
        ratio = ratios.get(ratio_key(b))
        index[(i["dtype"], i["mode"])][(i["head_dim"], i["seqlen"])][i["backend"]] = (
            tflops(i["flops"], seconds(b, stat)),
            ratio,
            b,
        )
    return index


def attention_suites(benchmarks) -> list:
    suites = {info(b).get("suite", "main") for b in of_kind(benchmarks, "attention")}
    return sorted(suites, key=lambda s: (s != "main", s))


SUITE_TITLES = {"main": "", "tiny": " — tiny problem for Triton's CPU interpreter"}


def attention_tables(benchmarks, stat: str = "median", caption: str | None = None) -> str:
    """One markdown table per (suite, dtype, pass): rows seqlen x head dim, a TFLOP/s (x sdpa) cell per backend."""
    out = []
    for suite in attention_suites(benchmarks):
        out += _attention_tables(benchmarks, stat, caption, suite)
    return "\n".join(out)


def _attention_tables(benchmarks, stat, caption, suite) -> list:
    out = []
    index = attention_index(benchmarks, stat, suite)
    for (dtype, mode), rows in sorted(index.items(), key=lambda kv: (kv[0][0], kv[0][1] != "fwd")):
        backends = sorted({name for cells in rows.values() for name in cells}, key=backend_sort_key)
        header = ["seqlen", "head dim", "batch × heads"] + [
            f"{name} TFLOP/s" + ("" if name == BASELINE else " (× sdpa)") for name in backends
        ]
        body = []
        for (head_dim, seqlen), cells in sorted(rows.items()):
            any_bench = next(iter(cells.values()))[2]
            row = [seqlen, head_dim, f"{info(any_bench)['batch']} × {info(any_bench)['heads']}"]
            for name in backends:
                if name not in cells:
                    row.append("—")
                    continue
                tf, ratio, _ = cells[name]
                row.append(fmt(tf) if name == BASELINE or ratio is None else f"{fmt(tf)} ({fmt_ratio(ratio)})")
            body.append(row)
        title = SUITE_TITLES.get(suite, f" — {suite}")
        out.append(f"#### Causal attention, {MODE_NAMES.get(mode, mode)}, {dtype}{title}\n")
        out.append(_markdown(header, body))
        if caption:
            out.append(f"\n_{caption}_")
        out.append("")
    return out


def memory_table(benchmarks, caption: str | None = None) -> str:
    results = [b for b in of_kind(benchmarks, "memory") if "peak_bytes" in info(b)]
    if not results:
        return ""
    backends = sorted({info(b)["backend"] for b in results}, key=backend_sort_key)
    cells = {(info(b)["seqlen"], info(b)["backend"]): info(b)["peak_bytes"] / 2**20 for b in results}
    first = info(results[0])
    body = []
    for seqlen in sorted({info(b)["seqlen"] for b in results}):
        body.append([seqlen] + [fmt(cells.get((seqlen, name))) for name in backends])
    text = [
        f"#### Peak memory of forward + backward (MiB beyond the inputs), batch {first['batch']}, "
        f"{first['heads']} heads, head dim {first['head_dim']}, {first['dtype']}\n",
        _markdown(["seqlen"] + backends, body),
    ]
    if caption:
        text.append(f"\n_{caption}_")
    return "\n".join(text) + "\n"


def training_configs(benchmarks) -> dict:
    """{config name: [training benchmarks]}, in first-seen order."""
    configs = {}
    for b in of_kind(benchmarks, "training"):
        configs.setdefault(info(b).get("config", "default"), []).append(b)
    return configs


def training_table(benchmarks, stat: str = "median", caption: str | None = None) -> str:
    """One table per training config: backend rows; tokens/s and time to the target loss, each x sdpa."""
    ratios = speedups(benchmarks, stat)
    return "\n".join(
        _training_table(results, ratios, stat, caption) for results in training_configs(benchmarks).values()
    )


def _training_table(results, ratios: dict, stat, caption) -> str:
    by_backend = defaultdict(dict)
    for b in results:
        by_backend[info(b)["backend"]][info(b).get("metric")] = b
    through = next((b for b in results if info(b).get("metric") == "throughput"), None)
    to_loss = next((b for b in results if info(b).get("metric") == "time_to_loss"), None)
    header = ["backend"]
    if through:
        header += ["tokens/s", "× sdpa"]
    if to_loss:
        header += [f"time to val loss ≤ {info(to_loss)['target_loss']} (s)", "steps", "× sdpa"]
    body = []
    for name in sorted(by_backend, key=backend_sort_key):
        row = [name]
        if through:
            b = by_backend[name].get("throughput")
            row += (
                ["—", "—"]
                if b is None
                else [f"{info(b)['tokens_per_step'] / seconds(b, stat):,.0f}", fmt_ratio(ratios.get(ratio_key(b)))]
            )
        if to_loss:
            b = by_backend[name].get("time_to_loss")
            if b is None:
                row += ["—", "—", "—"]
            else:
                reached = info(b).get("reached", True)
                row += [
                    fmt(seconds(b, stat)) + ("" if reached else " (not reached)"),
                    info(b).get("steps", "—"),
                    fmt_ratio(ratios.get(ratio_key(b))),
                ]
        body.append(row)
    cfg = info(through or to_loss)
    optimizer = cfg.get("optimizer", "")
    if cfg.get("orthogonalization"):
        optimizer += f" (Muon orthogonalizes in {cfg['orthogonalization']})"
    text = [
        f"#### Training on Shakespeare, config {cfg.get('config', 'default')!r}: {cfg.get('model', '')}, "
        f"batch {cfg.get('batch_size')} × {cfg.get('seq_len')} tokens, {cfg.get('dtype', '')}"
        f"{', ' + optimizer if optimizer else ''}\n",
        _markdown(header, body),
    ]
    if caption:
        text.append(f"\n_{caption}_")
    return "\n".join(text) + "\n"


def targets_section(benchmarks, env: dict, stat: str = "median") -> str:
    """Check the project's GPU goals against this run's numbers (CUDA runs only)."""
    if env.get("device") != "cuda":
        return (
            "The GPU targets (H100: forward+backward causal bf16 triton ≥ 1.0× sdpa at seqlen ≥ 1k; forward causal "
            f"bf16 head dim 128 at 16k ≥ {TARGET_FWD_TFLOPS:.0f} TFLOP/s; training tokens/s triton ≥ sdpa) are "
            "GPU goals and cannot be judged from this run: see bench/results/NOTES.md.\n"
        )
    index = attention_index(benchmarks, stat)
    lines = [
        f"Goals set for an H100; this run's device: {env.get('device_name')}.\n",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    fb = index.get(("bfloat16", "fwd_bwd"), {})
    ratios = [
        (t, d, cells["triton"][1])
        for (d, t), cells in fb.items()
        if t >= 1024 and "triton" in cells and cells["triton"][1] is not None
    ]
    if ratios:
        worst = min(ratios, key=lambda x: x[2])
        lines.append(
            f"| fwd+bwd causal bf16, triton ≥ 1.0× sdpa at every seqlen ≥ 1k | worst {worst[2]:.2f}× "
            f"(T={worst[0]}, d={worst[1]}) | {'yes' if worst[2] >= 1.0 else 'no'} |"
        )
    else:
        lines.append("| fwd+bwd causal bf16, triton ≥ 1.0× sdpa at every seqlen ≥ 1k | not measured | — |")
    cell = index.get(("bfloat16", "fwd"), {}).get((128, 16384), {}).get("triton")
    if cell:
        lines.append(
            f"| fwd causal bf16 d128 T=16k, triton ≥ {TARGET_FWD_TFLOPS:.0f} TFLOP/s | {cell[0]:.0f} TFLOP/s | "
            f"{'yes' if cell[0] >= TARGET_FWD_TFLOPS else 'no'} |"
        )
    else:
        lines.append(f"| fwd causal bf16 d128 T=16k, triton ≥ {TARGET_FWD_TFLOPS:.0f} TFLOP/s | not measured | — |")
    speedup = speedups(benchmarks, stat)
    tr = [
        b
        for b in of_kind(benchmarks, "training")
        if info(b).get("metric") == "throughput" and info(b)["backend"] == "triton"
    ]
    r = speedup.get(ratio_key(tr[0])) if tr else None
    if r is not None:
        lines.append(f"| training tokens/s, triton ≥ sdpa | {r:.2f}× | {'yes' if r >= 1.0 else 'no'} |")
    else:
        lines.append("| training tokens/s, triton ≥ sdpa | not measured | — |")
    return "\n".join(lines) + "\n"


def summary_text(benchmarks, stat: str = "median") -> str:
    """The tables without captions, for the terminal at the end of a benchmark run."""
    parts = [attention_tables(benchmarks, stat), memory_table(benchmarks), training_table(benchmarks, stat)]
    return "\n".join(p for p in parts if p).strip()


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seqlen_label(t: int) -> str:
    return f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t)


def _suptitle(fig, title: str, env: dict) -> None:
    lines = [title, env_caption(env)]
    if env.get("device") == "cpu":
        lines.append("measured on CPU: says nothing about GPU performance")
    fig.suptitle("\n".join(lines), fontsize=9.5)


def plot_attention(benchmarks, out_dir: Path, env: dict, stat: str = "median") -> list:
    plt = _pyplot()
    paths = []
    index = attention_index(benchmarks, stat)
    for dtype in sorted({dtype for dtype, _ in index}):
        modes = [m for m in ("fwd", "fwd_bwd") if (dtype, m) in index] + sorted(
            m for d, m in index if d == dtype and m not in ("fwd", "fwd_bwd")
        )
        head_dims = sorted({d for m in modes for (d, _) in index[(dtype, m)]})
        fig, axes = plt.subplots(
            len(modes),
            len(head_dims),
            figsize=(5.2 * len(head_dims), 3.9 * len(modes) + 0.9),
            squeeze=False,
            sharex=True,
        )
        for r, mode in enumerate(modes):
            for c, head_dim in enumerate(head_dims):
                ax = axes[r][c]
                series = defaultdict(list)
                for (d, seqlen), cells in index[(dtype, mode)].items():
                    if d == head_dim:
                        for name, (tf, _, _) in cells.items():
                            series[name].append((seqlen, tf))
                for name in sorted(series, key=backend_sort_key):
                    pts = sorted(series[name])
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        marker="o",
                        markersize=4,
                        label=name,
                        **line_style(name),
                    )
                ax.set_xscale("log", base=2)
                ax.set_title(f"{MODE_NAMES.get(mode, mode)}, head dim {head_dim}", fontsize=10)
                ax.set_ylabel("TFLOP/s")
                ax.set_ylim(bottom=0)
                ax.grid(True, which="both", alpha=0.3)
                if r == len(modes) - 1:
                    ax.set_xlabel("sequence length")
                ax.legend(fontsize=8)
        seqlens = sorted({t for m in modes for (_, t) in index[(dtype, m)]})
        for ax in axes[-1]:
            ax.set_xticks(seqlens)
            ax.set_xticklabels([_seqlen_label(t) for t in seqlens])
        _suptitle(fig, f"Causal attention throughput, {dtype} ({stat} time)", env)
        fig.tight_layout()
        path = out_dir / f"attention_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_memory(benchmarks, out_dir: Path, env: dict) -> list:
    results = [b for b in of_kind(benchmarks, "memory") if "peak_bytes" in info(b)]
    if not results:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    series = defaultdict(list)
    for b in results:
        series[info(b)["backend"]].append((info(b)["seqlen"], info(b)["peak_bytes"] / 2**20))
    for name in sorted(series, key=backend_sort_key):
        pts = sorted(series[name])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, **line_style(name))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    seqlens = sorted({info(b)["seqlen"] for b in results})
    ax.set_xticks(seqlens)
    ax.set_xticklabels([_seqlen_label(t) for t in seqlens])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("peak MiB beyond inputs (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    first = info(results[0])
    _suptitle(
        fig,
        f"Peak memory, causal fwd+bwd, batch {first['batch']}, {first['heads']} heads, "
        f"d{first['head_dim']}, {first['dtype']}",
        env,
    )
    fig.tight_layout()
    path = out_dir / "memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_training(benchmarks, out_dir: Path, env: dict, stat: str = "median") -> list:
    configs = {
        name: [b for b in results if info(b).get("metric") == "throughput"]
        for name, results in training_configs(benchmarks).items()
    }
    configs = {name: results for name, results in configs.items() if results}
    if not configs:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 4.4), squeeze=False)
    for ax, (config, results) in zip(axes[0], configs.items()):
        results.sort(key=lambda b: backend_sort_key(info(b)["backend"]))
        names = [info(b)["backend"] for b in results]
        values = [info(b)["tokens_per_step"] / seconds(b, stat) for b in results]
        bars = ax.bar(names, values, color=[COLORS.get(n, "tab:cyan") for n in names])
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
        first = info(results[0])
        ax.set_title(
            f"{config}: batch {first.get('batch_size')} × {first.get('seq_len')}, {first.get('dtype')}", fontsize=10
        )
        ax.set_ylabel("training tokens/s")
        ax.grid(True, axis="y", alpha=0.3)
    _suptitle(fig, f"GPT training step throughput on Shakespeare ({stat} step time)", env)
    fig.tight_layout()
    path = out_dir / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _host_line(env: dict) -> str:
    parts = []
    if env.get("device") == "cpu" and env.get("cpu_threads"):
        parts.append(f"**torch threads** {env['cpu_threads']}")
    if env.get("load_average"):
        parts.append("**load average** (1/5/15 min, end of run) " + " / ".join(f"{x:g}" for x in env["load_average"]))
    return ("  \n" + " · ".join(parts)) if parts else ""


def render_markdown(data: dict, stat: str = "median", images: list | None = None) -> str:
    benchmarks = data["benchmarks"]
    env = environment_of(data)
    caption = env_caption(env)
    on_cpu = env.get("device") == "cpu"
    title = "Benchmark results" + (" — CPU" if on_cpu else f" — {env.get('device_name')}")
    out = [
        f"# {title}\n",
        f"**Device:** {env.get('device_name')} ({str(env.get('device')).upper()})  ",
        f"**torch** {env.get('torch')} · **triton** {env.get('triton') or 'none'}"
        f" · **CUDA** {env.get('cuda') or 'none'} · **cuDNN** {env.get('cudnn') or 'none'} · **date** {env.get('date')}"
        + _host_line(env)
        + "\n",
    ]
    if on_cpu:
        out.append(
            "> **Measured on CPU.** These numbers compare PyTorch's CPU attention paths on this machine and say "
            "nothing about GPU performance. Triton has no CPU backend: where our kernel appears, it ran through "
            "Triton's interpreter (NumPy), which is why it is orders of magnitude slower here and timed only at "
            "the smallest size. GPU results: see bench/results/NOTES.md.\n"
        )
    out.append(
        f"Times are the {stat} over the timed rounds; warm-up, compilation and autotuning are excluded. "
        "TFLOP/s use the FlashAttention count (forward 4·B·H·T²·D, halved for causal; forward + backward "
        "3.5× forward) for every backend, so the reference, which computes the masked half anyway, is "
        "credited with useful work only. `(x×)` is the speed relative to `sdpa` "
        "(`F.scaled_dot_product_attention`, default dispatch) on the same problem in the same run: "
        "> 1 is faster. `—`: not run (skipped: CUDA-only backend, interpreter, out of memory, or filtered).\n"
    )
    out.append("## Targets\n")
    out.append(targets_section(benchmarks, env, stat))
    attention = attention_tables(benchmarks, stat, caption)
    if attention:
        out += ["## Attention\n", attention]
    memory = memory_table(benchmarks, caption)
    if memory:
        out += ["## Memory\n", memory]
    training = training_table(benchmarks, stat, caption)
    if training:
        out += ["## Training\n", training]
    if images:
        out.append("## Plots\n")
        out += [f"![{p.stem}]({p.name})\n" for p in images]
    return "\n".join(out).rstrip() + "\n"


def write_report(json_paths, out_dir, stat: str = "median") -> list:
    """Write report.md and the PNGs of one JSON (or several, merged) into out_dir; return the paths written."""
    if isinstance(json_paths, (str, Path)):
        json_paths = [json_paths]
    data = load_many([Path(p) for p in json_paths])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment_of(data)
    benchmarks = data["benchmarks"]
    images = (
        plot_attention(benchmarks, out_dir, env, stat)
        + plot_memory(benchmarks, out_dir, env)
        + plot_training(benchmarks, out_dir, env, stat)
    )
    md = out_dir / "report.md"
    md.write_text(render_markdown(data, stat, images))
    return [md] + images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "json",
        nargs="+",
        help="pytest-benchmark JSON (pytest --benchmark-only --benchmark-json=PATH); "
        "several JSONs of one machine are merged into one report",
    )
    parser.add_argument("--out", help="output folder (default: the first JSON's folder)")
    parser.add_argument("--stat", default="median", choices=("median", "min", "mean"), help="time statistic (median)")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.json, args.out or Path(args.json[0]).parent, args.stat)
    except (OSError, ValueError, KeyError) as err:
        print(f"bench.report: {err}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
