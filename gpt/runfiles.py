"""The files a training run writes into --out, and the stop request that ends it cleanly.

    ckpt.pt        the checkpoint (gpt/checkpoint.py), replaced atomically at every save
    metrics.jsonl  one JSON object per log step (MetricsLog), each line written and fsynced whole
    loss.png       the loss curves (gpt/plot.py), replaced atomically

Every file is written so that a crash at any moment leaves a readable one. StopRequest turns
SIGINT (Ctrl-C) and SIGTERM into "save a checkpoint after this step and exit".
"""

import json
import os
import signal
import time
from pathlib import Path

CKPT_NAME, METRICS_NAME, PLOT_NAME = "ckpt.pt", "metrics.jsonl", "loss.png"


def atomic_write(path: str | os.PathLike, write, delay_s: float = 0.0) -> None:
    """Call write(file) on a temporary file next to `path`, then rename it over `path`.

    os.replace is atomic within a directory, so a reader (or a process killed mid-save) sees
    either the old complete file or the new complete one, never half of either. The fsyncs make
    the new contents and the rename survive a power cut too. delay_s: a pause before the rename,
    for fault-injection tests.
    """
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    if delay_s:
        time.sleep(delay_s)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, each written in one write() and fsynced, so a
    crash can at worst cut the last line, and readers skip a cut line."""

    def __init__(self, path: Path, keep_until_step: int | None):
        """Start the file afresh, or (when resuming) keep the lines up to the checkpoint's step, so
        that it ends up as if the run had never stopped."""
        kept = [] if keep_until_step is None else [r for r in read_metrics(path) if r["step"] <= keep_until_step]
        self.records = kept
        atomic_write(path, lambda file: file.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        self.file = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path) -> list[dict]:
    """Every complete record in a metrics.jsonl (none if the file does not exist)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return records


class StopRequest:
    """SIGINT/SIGTERM ask the training loop to save a checkpoint and stop after the current
    step, instead of killing it mid-update; a second signal exits at once (the last checkpoint
    on disk is always complete)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 0 if self.signum is None else 128 + self.signum  # the shell's convention for "killed by"
