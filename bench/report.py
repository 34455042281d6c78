"""The one renderer: markdown tables and PNG plots from a results file (bench/schema.py).

    python -m bench.report bench/results/cpu/bench.json              # rewrites bench.md and the plots beside it
    python -m bench.report out/quick.json --out DIR

bench.quick and the pytest suites call it after every cell (markdown) and at the end (plots).
In every table a cell reads "number (x×)": x is the speed relative to sdpa (its default dispatch)
on the same problem in the same run, > 1 is faster: sdpa's time over the backend's, or the
backend's throughput over sdpa's. A cell that did not run shows the first word of its status;
"Not measured" at the end lists why.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from bench import schema
from bench.backends import BACKENDS, BASELINE

PASS_NAMES = {"fwd": "forward", "fwd_bwd": "forward + backward", "decode": "decode"}
LARGER_IS_FASTER = ("tflops", "tokens_per_s")
NO_SPEED = ("peak_mib",)  # not a time: no speed relative to sdpa
NOT_RUN_SHOWN, PLACES_SHOWN = 10, 6  # the JSON has every cell


def fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def backend_order(name: str):
    """Our kernel and its variants first, then the others in registration order."""
    order = list(BACKENDS)
    return (not (name in BACKENDS and BACKENDS[name].ours), order.index(name) if name in order else len(order), name)


def markdown_table(header: list, rows: list) -> list:
    return [
        "| " + " | ".join(map(str, header)) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(map(str, row)) + " |" for row in rows),
    ]


def speed_vs_sdpa(results: dict, section: str, cell: dict, field: str):
    if cell.get("backend") == BASELINE or field in NO_SPEED:
        return None
    ours, theirs = schema.number(cell, field), schema.number(schema.peer(results, section, cell, BASELINE), field)
    if ours is None or not theirs or not ours:
        return None
    return ours / theirs if field in LARGER_IS_FASTER else theirs / ours


def shown(results: dict, section: str, cell: dict | None, field: str, scale: float = 1.0) -> str:
    """A table cell: the number and its speed relative to sdpa, or why there is none."""
    if cell is None:
        return "—"
    if cell["status"] != "ok":
        return cell["status"].split(":")[0]
    value = schema.number(cell, field)
    text = fmt(None if value is None else value * scale)
    speed = speed_vs_sdpa(results, section, cell, field)
    return text if speed is None else f"{text} ({speed:.2f}×)"


def grid(results: dict, table: "Table", fields: list) -> list:
    found = schema.cells(results, table.section)
    lines = []
    for part in dict.fromkeys(tuple(c.get(k) for k in table.split) for c in found):
        cells = [c for c in found if tuple(c.get(k) for k in table.split) == part]
        names = sorted({c["backend"] for c in cells}, key=backend_order)
        by_row = defaultdict(dict)
        for c in cells:
            by_row[tuple(c.get(k) for k in table.rows)][c["backend"]] = c
        header = [k.replace("_", " ") for k in table.rows] + [f"{n} {unit}" for _, unit, _ in fields for n in names]
        body = []
        for row, by in by_row.items():
            values = [shown(results, table.section, by.get(n), f, scale) for f, _, scale in fields for n in names]
            body.append([*map(fmt, row), *values])
        named = [f"{k.replace('_', ' ')} {PASS_NAMES.get(v, v)}" for k, v in zip(table.split, part) if v is not None]
        title = table.title.split(":")[0].split(" (")[0]
        lines += ["", f"#### {title}{': ' + ', '.join(named) if named else ''}", "", *markdown_table(header, body)]
    return lines


class Table(NamedTuple):
    """How one section becomes tables: one per value of `split`, a row per value of `rows`, a
    column per (field, backend); fields are (result field, column unit, scale)."""

    section: str
    title: str
    note: str
    split: tuple
    rows: tuple
    fields: tuple


TABLES = (
    Table(
        "kernel_table",
        "Kernel table: TFLOP/s, causal",
        "FLOPs: fwd 4·B·H·T²·D halved for causal, fwd + bwd 3.5× that (bench/flops.py).",
        ("dtype", "pass", "grid"),
        ("head_dim", "seqlen", "batch", "heads"),
        (("tflops", "TFLOP/s", 1),),
    ),
    Table(
        "host_time",
        "Host and device time per call (µs)",
        "host: CPU time to issue a call; device: kernel time (torch.profiler); wall: per call over a run of calls.",
        ("pass",),
        ("batch", "heads", "seqlen", "head_dim"),
        (("host_us", "host", 1), ("device_us", "device", 1), ("wall_us", "wall", 1)),
    ),
    Table(
        "decode",
        "Decode: q_len 1 against a KV cache (µs per call)",
        "device: the core timer's median; wall: per call over a run of calls (what generate pays).",
        ("dtype",),
        ("head_dim", "kv_len"),
        (("ms", "device", 1e3), ("wall_us", "wall", 1)),
    ),
    Table(
        "memory",
        "Peak memory of fwd + bwd (MiB beyond the inputs)",
        "",
        ("dtype", "batch", "heads", "head_dim"),
        ("seqlen",),
        (("peak_mib", "MiB", 1),),
    ),
    Table(
        "training",
        "Training and sampling",
        "train: gpt.train's step (gpt.step.train_step with its optimizer); sample: model.generate with the "
        "KV cache, batch 1; time_to_loss: wall seconds from a fresh model to the validation loss.",
        ("what",),
        ("model", "shape", "batch_size", "seq_len", "dtype"),
        (("tokens_per_s", "tok/s", 1), ("seconds", "s", 1)),
    ),
)


def heading(title: str, *notes: str) -> list:
    return ["", f"## {title}", *(line for note in notes for line in ("", note))]


def environment_line(results: dict) -> str:
    env = results["environment"]
    parts = [
        f"{env.get('device_name')} ({env.get('device')})",
        f"driver {env.get('driver')}" if env.get("driver") else None,
        f"torch {env.get('torch')}",
        f"triton {env.get('triton')}",
        f"CUDA {env.get('cuda')}",
        f"cuDNN {env.get('cudnn')}",
        f"CPU {env.get('cpu')} ({env.get('cpu_capability')}, {env.get('cpu_threads')} threads)",
        f"load average {' / '.join(map(str, env['load_average']))}" if env.get("load_average") else None,
        str(env.get("date")),
    ]
    return " · ".join(p for p in parts if p)


def tests_lines(tests: dict | None) -> list:
    if not tests:
        return []
    lines = heading("CUDA-only tests", f"`{tests['command']}`: **{tests['status']}**")
    if "passed" in tests:
        counts = ", ".join(f"{tests[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
        lines[-1] += f" ({counts}, {tests['seconds']} s)"
    if tests.get("first_failure"):
        lines += ["", f"First failure: `{tests['first_failure']}`"]
    return lines


def render_markdown(results: dict, images=()) -> str:
    env = results["environment"]
    smoke = " (--smoke: tiny shapes, the numbers test the code only)" if results.get("smoke") else ""
    budget = f" of a {results['budget_s']:.0f} s budget" if results.get("budget_s") is not None else ""
    lines = [
        f"# Benchmark results: {env.get('device_name')}{smoke}",
        "",
        environment_line(results),
        "",
        f"`{results['command']}`: {results['elapsed_s']} s{budget}"
        + ("" if results["finished"] else " (not finished)"),
    ]
    if env.get("device") != "cuda":
        lines += [
            "",
            "> Measured on a CPU: these numbers compare PyTorch's CPU paths and say nothing about GPU "
            "speed. Our kernel runs through Triton's interpreter here (NumPy, orders of magnitude slower).",
        ]
    lines += tests_lines(results.get("tests"))
    lines += heading("Targets", "Verdicts from this run's numbers only (bench/targets.py).")
    lines += ["", *markdown_table(["target", "measured", "verdict"], [list(t.values()) for t in results["targets"]])]

    parity = schema.cells(results, "parity")
    if parity:
        note = "Max abs error, sdpa's on the same inputs and precision; used: of the tolerance, at most 1 passes."
        lines += heading("Parity against float64", note)
        rows = []
        for c in parity:
            name = f"{c['case']}, {c['backend']}, B {c['batch']} H {c['heads']} D {c['head_dim']} {c['dtype']}"
            if c["status"] != "ok":
                rows.append([name, "—", "—", "—", c["status"].split(":")[0]])
            for r in c.get("result", {}).get("errors", []):
                rows.append(
                    [name, r["tensor"], f"{r['max_err']:.3e}", f"{r['sdpa_max_err']:.3e}", fmt(r["tolerance_used"])]
                )
        lines += ["", *markdown_table(["case", "tensor", "max err", "sdpa max err", "used"], rows)]

    for table in TABLES:
        cells = schema.cells(results, table.section)
        if cells:
            present = [f for f in table.fields if any(f[0] in c.get("result", {}) for c in cells)]
            lines += heading(table.title, table.note) if table.note else heading(table.title)
            lines += grid(results, table, present or table.fields[:1])

    first = schema.cells(results, "first_call")
    if first:
        lines += heading("First calls (compilation included), in the order they were made")
        rows = [
            [c["backend"], c["head_dim"], PASS_NAMES[c["pass"]], fmt(c["result"]["seconds"]), c["result"]["made_in"]]
            for c in first
        ]
        lines += ["", *markdown_table(["backend", "head dim", "pass", "seconds", "made in"], rows)]

    not_run = defaultdict(list)
    for section in schema.SECTIONS:
        for c in schema.cells(results, section):
            if c["status"] != "ok":
                not_run[c["status"]].append(f"{section} " + " ".join(f"{k}={v}" for k, v in schema.key_of(c).items()))
    if not_run:
        lines += heading("Not measured", f"Up to {NOT_RUN_SHOWN} reasons, {PLACES_SHOWN} cells each; the JSON has all.")
        lines.append("")
        for status, places in list(not_run.items())[:NOT_RUN_SHOWN]:
            more = f"; and {len(places) - PLACES_SHOWN} more" if len(places) > PLACES_SHOWN else ""
            lines.append(f"- {status}: " + "; ".join(places[:PLACES_SHOWN]) + more)
    if images:
        lines += heading("Plots") + [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in images]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(name: str) -> dict:
    style = {"color": BACKENDS[name].color if name in BACKENDS else None, "linewidth": 1.5, "marker": "o"}
    if BACKENDS.get(name) and BACKENDS[name].ours:
        style["linewidth"] = 2.6
    elif name == BASELINE:
        style.update(linewidth=2.2, linestyle="--")
    return style


def _save(fig, plt, results: dict, title: str, path: Path) -> Path:
    lines = [title, environment_line(results)]
    if results["environment"].get("device") != "cuda":
        lines.append("measured on a CPU: says nothing about GPU speed")
    fig.suptitle("\n".join(lines), fontsize=8.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _lines(ax, cells: list, x: str, y: str) -> None:
    if not cells:
        return
    for name in sorted({c["backend"] for c in cells}, key=backend_order):
        points = sorted((c[x], c["result"][y]) for c in cells if c["backend"] == name)
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, **_style(name))
    ax.set_xscale("log", base=2)
    xs = sorted({c[x] for c in cells})
    ax.set_xticks(xs, [f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t) for t in xs])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot(results: dict, out_dir: Path, stem: str) -> list[Path]:
    """PNGs of the kernel table (TFLOP/s against T, a panel per pass and head dim, a figure per
    dtype), of peak memory against T and of training tokens/s; returns the paths written."""
    ok = {
        s: [c for c in schema.cells(results, s) if c["status"] == "ok"] for s in ("kernel_table", "memory", "training")
    }
    if not any(ok.values()):
        return []
    plt, paths = _pyplot(), []
    main_grid = [c for c in ok["kernel_table"] if "grid" not in c]
    for dtype in dict.fromkeys(c["dtype"] for c in main_grid):
        cells = [c for c in main_grid if c["dtype"] == dtype]
        modes = [m for m in PASS_NAMES if any(c["pass"] == m for c in cells)]
        dims = sorted({c["head_dim"] for c in cells})
        size = (5.2 * len(dims), 3.9 * len(modes) + 0.9)
        fig, axes = plt.subplots(len(modes), len(dims), figsize=size, squeeze=False)
        for (r, mode), (col, dim) in ((rm, cd) for rm in enumerate(modes) for cd in enumerate(dims)):
            ax = axes[r][col]
            _lines(ax, [c for c in cells if c["pass"] == mode and c["head_dim"] == dim], "seqlen", "tflops")
            ax.set(title=f"{PASS_NAMES[mode]}, head dim {dim}", xlabel="sequence length", ylabel="TFLOP/s")
            ax.set_ylim(bottom=0)
        paths.append(_save(fig, plt, results, f"Causal attention, {dtype}", out_dir / f"{stem}-kernels-{dtype}.png"))
    if ok["memory"]:
        fig, ax = plt.subplots(figsize=(6.5, 4.6))
        _lines(ax, ok["memory"], "seqlen", "peak_mib")
        ax.set(yscale="log", xlabel="sequence length", ylabel="peak MiB beyond the inputs (log)")
        paths.append(_save(fig, plt, results, "Peak memory, causal fwd + bwd", out_dir / f"{stem}-memory.png"))
    train = [c for c in ok["training"] if c["what"] == "train"]
    if train:
        models = list(dict.fromkeys(c["model"] for c in train))
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.4), squeeze=False)
        for ax, model in zip(axes[0], models):
            cells = sorted((c for c in train if c["model"] == model), key=lambda c: backend_order(c["backend"]))
            values = [c["result"]["tokens_per_s"] for c in cells]
            bars = ax.bar([c["backend"] for c in cells], values, color=[_style(c["backend"])["color"] for c in cells])
            ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=8)
            ax.set(title=f"{model}: batch {cells[0]['batch_size']} × {cells[0]['seq_len']}", ylabel="training tokens/s")
        title = "Training step throughput (gpt.train's step)"
        paths.append(_save(fig, plt, results, title, out_dir / f"{stem}-training.png"))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results file (quick.json, bench.json)")
    parser.add_argument("--out", type=Path, help="folder for the markdown and the plots (default: the file's own)")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
        if results.get("schema") != schema.SCHEMA:
            raise ValueError(f"{args.results} is not a results file of schema {schema.SCHEMA} (bench/schema.py)")
        out = args.out or args.results.parent
        out.mkdir(parents=True, exist_ok=True)
        markdown = out / args.results.with_suffix(".md").name
        markdown.write_text(render_markdown(results, plot(results, out, args.results.stem)))
    except (OSError, ValueError, KeyError) as err:
        print(f"bench.report: {err}", file=sys.stderr)
        return 1
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
