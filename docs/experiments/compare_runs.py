"""Validation perplexity against seconds of training for several runs of gpt.train, with the
baselines as horizontal lines: the figure beside README's result table.

    python docs/experiments/compare_runs.py    # writes docs/results/train_default_v3/compare.png
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

RESULTS = Path(__file__).resolve().parent.parent / "results"
RUNS = {  # label: folder under docs/results holding the run's metrics.jsonl
    "default, 2 threads": "train_default_v3",
    "default, 2 threads, AVX2 only": "train_default_v3_avx2",
    "default, 1 thread, AVX2 only": "one_core_avx2/default",
    "previous code, 1 thread, AVX2 only": "one_core_avx2/previous",
    "before the CPU changes, 2 threads, faster day": "train_default_v2",
    "previous default (learned positions, AdamW, cosine, 64 tokens)": "train_default",
}
BASELINES = {"nanoGPT model.py, 15 min": 58.2, "Kneser-Ney trigram": 69.0}


def validation_curve(folder: str) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (RESULTS / folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["elapsed_s"], r["val_ppl"]) for r in records if r["val_ppl"] is not None]


def main() -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, folder in RUNS.items():
        axes.plot(*zip(*validation_curve(folder)), "o-", markersize=3, label=label)
    for label, perplexity in BASELINES.items():
        axes.axhline(perplexity, linestyle="--", linewidth=1, color="gray")
        axes.text(5, perplexity + 0.5, label, fontsize=8, color="gray")
    axes.axhline(40, linestyle=":", linewidth=1, color="black")
    axes.set_ylim(30, 100)
    axes.set_xlabel("seconds of training (evaluations included)")
    axes.set_ylabel("validation perplexity")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "train_default_v3" / "compare.png", dpi=120)


if __name__ == "__main__":
    main()
