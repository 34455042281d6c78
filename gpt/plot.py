"""loss.png: training and validation loss against training tokens, from metrics.jsonl records."""

import os

from .runfiles import atomic_write


def plot_losses(records: list[dict], path: str | os.PathLike) -> None:
    """Write the loss curves to `path` (PNG), atomically so a viewer never sees half an image."""
    # Imported here, not at the top: matplotlib takes about a second to import, which every
    # `python -m gpt.train` would pay even when it stops at a bad flag.
    import matplotlib

    matplotlib.use("Agg")  # render to files only: works without a display, e.g. on a cluster node
    import matplotlib.pyplot as plt

    train = [(r["tokens"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            axes.plot(*zip(*points), style, label=label, markersize=3)
    axes.set_xlabel("training tokens")
    axes.set_ylabel("cross-entropy loss (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=120))
    plt.close(figure)
