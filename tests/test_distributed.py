"""Beyond one device: DDP on CPU (gloo), gradient accumulation, crash safety, torch.compile.

The multi-process run uses torch's own launcher (`python -m torch.distributed.run`, i.e.
torchrun) with two CPU processes; float32 and no dropout, so that the only differences between
the ways of computing one global batch are floating-point rounding.
"""

import random
import signal
import time

import pytest
from helpers import assert_same_losses, metrics, run_module, start_module, tiny_args, wait_for

from gpt import train
from gpt.checkpoint import SAVE_DELAY_ENV_VAR, load_checkpoint
from gpt.runfiles import temporary_path

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_processes_equal_one_with_double_batch_and_one_with_accumulation(corpus, tmp_path):
    """2 processes x batch 4 == 1 x batch 8 == 1 x batch 4 x grad-accum 2: the same global batch of
    windows each step, so the same losses; and the 2-process checkpoint resumes in 1 process."""
    flags = ["--steps", "8", "--dropout", "0", "--dtype", "float32"]
    two = tmp_path / "two"
    result = run_module(
        "torch.distributed.run",
        [
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "gpt.train",
            *tiny_args(corpus, two, *flags, "--batch-size", "4", "--stop-at", "4"),
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(two / "ckpt.pt")
    assert state["step"] == 4 and state["train_config"]["batch_size"] == 4
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in state["model"])  # unwrapped

    big_batch, accumulated = tmp_path / "big_batch", tmp_path / "accumulated"
    assert train.main(tiny_args(corpus, big_batch, *flags, "--batch-size", "8")) == 0
    assert train.main(tiny_args(corpus, accumulated, *flags, "--batch-size", "4", "--grad-accum", "2")) == 0
    assert_same_losses(metrics(big_batch), metrics(accumulated), rel=1e-4)

    # Resume the 2-process run in one process: twice the batch keeps the global batch the same.
    assert train.main(["--resume", "--out", str(two), "--batch-size", "8"]) == 0
    assert_same_losses(metrics(big_batch), metrics(two), rel=1e-4)
    assert [r["tokens"] for r in metrics(two)] == [r["tokens"] for r in metrics(big_batch)]


def test_sigkill_during_a_checkpoint_save_keeps_the_previous_checkpoint(corpus, tmp_path):
    out = tmp_path / "out"
    # The fault-injection hook holds each save between "temporary file written" and "renamed".
    process = start_module(
        "gpt.train",
        tiny_args(corpus, out, "--steps", "100000", "--ckpt-interval", "2"),
        env={SAVE_DELAY_ENV_VAR: "0.5"},
    )
    try:
        wait_for(lambda: (out / "ckpt.pt").exists(), what="the first checkpoint")
        temporary = temporary_path(out / "ckpt.pt", process.pid)
        wait_for(temporary.exists, what="the second checkpoint save")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2
    records = metrics(out)  # every line parses
    assert records[-1]["step"] >= 2

    assert train.main(["--resume", "--out", str(out), "--stop-at", "6"]) == 0
    assert not temporary.exists()  # the killed run's partial file is cleared away, its space freed
    assert load_checkpoint(out / "ckpt.pt")["step"] == 6
    assert [r["step"] for r in metrics(out)] == [0, 2, 4, 6]  # continued from step 2, nothing twice


def test_sigkill_at_random_moments_never_leaves_unreadable_files(corpus, tmp_path):
    """Checkpoint and log every step, so that the kills often land inside a write."""
    out = tmp_path / "out"
    rng = random.Random(0)
    args = tiny_args(
        corpus, out, "--steps", "100000", "--ckpt-interval", "1", "--log-interval", "1", "--eval-interval", "100000"
    )
    last_step = 0
    for attempt in range(2):
        process = start_module("gpt.train", args + (["--resume"] if attempt else []))
        try:
            wait_for(
                lambda: (out / "ckpt.pt").exists() and load_checkpoint(out / "ckpt.pt")["step"] > last_step,
                what="a new checkpoint",
            )
            time.sleep(rng.uniform(0, 0.5))
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            process.kill()
        step = load_checkpoint(out / "ckpt.pt")["step"]
        assert step > last_step
        metrics(out)  # every line parses
        last_step = step
    assert train.main(["--resume", "--out", str(out), "--stop-at", str(last_step + 3)]) == 0
    assert [r["step"] for r in metrics(out)] == list(range(last_step + 4))  # each step logged once


def test_compile_on_cpu_matches_eager(corpus, tmp_path):
    flags = ["--steps", "4", "--attn", "sdpa", "--dropout", "0"]  # compiled dropout draws other random numbers
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train.main(tiny_args(corpus, eager, *flags)) == 0
    result = run_module("gpt.train", tiny_args(corpus, compiled, *flags, "--compile"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(metrics(eager), metrics(compiled), rel=1e-4)
    state = load_checkpoint(compiled / "ckpt.pt")
    assert not any(key.startswith("_orig_mod.") for key in state["model"])  # the unwrapped model's weights
    assert state["train_config"]["compile"] is True
