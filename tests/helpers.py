"""Helpers shared by the training, sampling and distributed tests: a synthetic corpus, the flags
of a tiny run, and running `python -m ...` in a subprocess."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt.data import DATA_ENV_VAR

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the king queen lord my good sir and of to love thou art thy heart death night day "
    "shall not be what is come go speak"
).split()


def write_corpus(path: Path, n_lines: int = 3000, seed: int = 0) -> Path:
    """A fake Project Gutenberg file: random sentences between the START and END marker lines."""
    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + rng.choice(".,!?")
        for _ in range(n_lines)
    ]
    path.write_text(
        "The Project Gutenberg eBook\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK THE COMPLETE WORKS OF WILLIAM SHAKESPEARE ***\n"
        + "\n".join(lines)
        + "\n*** END OF THE PROJECT GUTENBERG EBOOK ***\n",
        encoding="utf-8",
    )
    return path


def tiny_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    """Flags of a tiny run (~20k parameters, milliseconds per step) on the synthetic corpus."""
    return [
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--head",
        "full",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--d-model",
        "32",
        "--seq-len",
        "16",
        "--batch-size",
        "8",
        "--warmup",
        "2",
        "--log-interval",
        "2",
        "--eval-interval",
        "4",
        "--eval-windows",
        "16",
        "--ckpt-interval",
        "4",
        *extra,
    ]


def run_module(
    module: str, args: list[str], env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root, on one CPU thread (the machine may be shared)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def start_module(module: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def wait_for(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def metrics(out: Path) -> list[dict]:
    """Every line of out/metrics.jsonl, parsed as standard JSON; fails if any line does not parse,
    or holds NaN or Infinity (which Python's json accepts but JSON does not)."""

    def refuse(name: str):
        raise AssertionError(f"{name} in metrics.jsonl is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def error_line(stderr: str, *fragments: str) -> str:
    """The one line a failed program wrote to stderr, asserting that there is exactly one, that
    it starts with "error: " on a line of its own, that it holds every fragment, and that no
    traceback came with it. Only a progress bar may come before it (its lines show the rate,
    "step/s"; tqdm ends its line when it closes)."""
    lines = [line for line in stderr.split("\n") if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert all("step/s" in line for line in lines[:-1]), stderr  # progress bars only
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def assert_same_losses(a: list[dict], b: list[dict], rel: float = 1e-6) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            assert (ra[key] is None) == (rb[key] is None), (ra, rb)
            if ra[key] is not None:
                assert ra[key] == pytest.approx(rb[key], rel=rel, abs=1e-7), (key, ra, rb)


def shakespeare_path() -> Path:
    """The real Complete Works: $GPT_SHAKESPEARE, else ../shared/data/shakespeare.txt beside the
    repository. Without either the calling test fails (not skips): CI must run it."""
    for candidate in (os.environ.get(DATA_ENV_VAR), REPO.parent / "shared" / "data" / "shakespeare.txt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.fail(f"the Complete Works are needed: set {DATA_ENV_VAR}=/path/to/pg100.txt (Project Gutenberg eBook #100)")
