"""The files in --out: one run at a time (the lock), writes that fail cleanly when the disk is
full, and metrics.jsonl read strictly. The concurrent runs are real processes; the full disk is
a real (small) tmpfs where the test may mount one, and a simulated one everywhere."""

import errno
import io
import os
import signal
import subprocess

import pytest
from helpers import error_line, metrics, run_module, start_module, tiny_args, wait_for

from gpt import runfiles, train
from gpt.checkpoint import load_checkpoint
from gpt.errors import RunError
from gpt.runfiles import MetricsLog, RunLock, atomic_write, read_metrics, temporary_path

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# One run per --out


def test_a_second_run_into_the_same_out_is_refused_and_a_killed_run_leaves_no_stale_lock(corpus, tmp_path):
    """The same command twice at once (it used to make both write one ckpt.pt.tmp, and one died
    in a traceback); then the first is killed with SIGKILL, which no cleanup code survives."""
    out = tmp_path / "out"
    args = tiny_args(corpus, out, "--steps", "100000", "--ckpt-interval", "1")
    first = start_module("gpt.train", args)
    try:
        wait_for(lambda: (out / "ckpt.pt").exists(), what="the first run's checkpoint")
        assert (out / "run.lock").read_text() == f"{first.pid}\n"
        second = run_module("gpt.train", args)
        assert second.returncode == 2, second.stderr
        error_line(second.stderr, f"{out} is in use by another run (pid {first.pid})", "choose another --out")
        assert first.poll() is None  # the first run goes on, its files its own
        step = load_checkpoint(out / "ckpt.pt")["step"]
        wait_for(lambda: load_checkpoint(out / "ckpt.pt")["step"] > step, what="the first run to go on saving")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
        first.communicate()
    # The kernel released the dead run's lock; whatever temporary file it left is cleared away.
    leftover = temporary_path(out / "ckpt.pt", first.pid)
    leftover.write_bytes(b"half a checkpoint")
    step = load_checkpoint(out / "ckpt.pt")["step"]
    assert train.main(["--resume", "--out", str(out), "--stop-at", str(step + 2)]) == 0
    assert load_checkpoint(out / "ckpt.pt")["step"] == step + 2
    assert not leftover.exists() and not (out / "run.lock").exists()
    steps = [r["step"] for r in metrics(out)]
    assert steps == sorted(set(steps)) and steps[-1] > step  # continued from the checkpoint, nothing twice


def test_the_lock_is_held_for_the_run_and_released_after_it(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            with RunLock(tmp_path):  # another open file description: flock refuses it like another process's
                pass
        assert (tmp_path / "run.lock").exists()
    assert not (tmp_path / "run.lock").exists()
    with RunLock(tmp_path):  # free again
        pass


def test_temporary_files_are_per_process_and_never_left_behind(tmp_path):
    path = tmp_path / "file.txt"
    assert temporary_path(path) == tmp_path / f"file.txt.{os.getpid()}.tmp"
    assert temporary_path(path, 12) != temporary_path(path, 13)
    atomic_write(path, lambda file: file.write(b"one"))

    def interrupted(file):
        file.write(b"two, half")
        raise KeyboardInterrupt  # a second Ctrl-C in the middle of a save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_bytes() == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


# ---------------------------------------------------------------------------------------------
# A full disk


class FullDisk(io.FileIO):
    """A file on a disk with no space left: every write fails as the kernel's would."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_save_on_a_full_disk_says_so_removes_its_temporary_file_and_keeps_the_checkpoint(
    stopped_run, monkeypatch, capsys
):
    """Simulated, so that it runs everywhere: the checkpoint's writes fail with ENOSPC, inside
    torch.save, which reports them as a RuntimeError about "unexpected pos"."""
    checkpoint = stopped_run / "ckpt.pt"
    before = checkpoint.read_bytes()

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if os.fspath(path).startswith(os.fspath(checkpoint)) and "w" in mode:
            return FullDisk(path, "w")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(runfiles, "open", open_on_a_full_disk, raising=False)
    assert train.main(["--resume", "--out", str(stopped_run)]) == 2
    error_line(
        capsys.readouterr().err, f"could not write {checkpoint}: the disk is full", "the previous ckpt.pt is intact"
    )
    assert checkpoint.read_bytes() == before
    assert not list(stopped_run.glob("*.tmp"))


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that fills up for real. Mounting one needs root (CAP_SYS_ADMIN)."""
    path = tmp_path / "disk"
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the simulated full disk above tests the same code")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the simulated full disk tests the code"
        )
    yield path
    subprocess.run(["umount", str(path)], check=True)


def fill(directory, leave: int = 0):
    """Write a file into `directory` until its disk has no more than `leave` bytes free."""
    filler = directory / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize > leave:
            free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
            os.write(descriptor, bytes(min(1 << 16, max(free - leave, 4096))))
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    return filler


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_training(corpus, small_disk, capsys):
    fill(small_disk, leave=1 << 20)
    out = small_disk / "out"
    assert train.main(tiny_args(corpus, out, "--steps", "4")) == 2
    error_line(capsys.readouterr().err, f"not enough disk space in {out}", "free some space")
    assert list(out.iterdir()) == []


def test_a_disk_that_fills_up_mid_run_stops_it_in_one_line_and_keeps_the_checkpoint(corpus, small_disk):
    out = small_disk / "out"
    args = tiny_args(corpus, out, "--steps", "100000", "--ckpt-interval", "2", "--eval-interval", "100000")
    process = start_module("gpt.train", args)
    try:
        wait_for(lambda: (out / "ckpt.pt").exists(), what="the first checkpoint")
        filler = fill(small_disk)  # the disk is full: the run's next write fails
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 2, stderr
    error_line(stderr, f"could not write {out}/", "the disk is full")
    step = load_checkpoint(out / "ckpt.pt")["step"]  # the last complete one, intact
    assert step >= 2 and not list(out.glob("*.tmp"))
    metrics(out)  # every line parses
    filler.unlink()
    assert train.main(["--resume", "--out", str(out), "--stop-at", str(step + 2)]) == 0


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def test_metrics_skip_a_line_cut_by_a_crash_and_refuse_any_other_stranger(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "val_loss": 4.0}\n{"step": 2, "val_loss": NaN}\n{"step": 4, "val_lo')
    assert read_metrics(path) == [{"step": 0, "val_loss": 4.0}, {"step": 2, "val_loss": None}]
    for stranger in ("not json", '{"no": "step"}', '{"step": "2"}', "[0]"):
        path.write_text(f'{{"step": 0}}\n{stranger}\n{{"step": 2}}\n')
        with pytest.raises(ValueError, match="line 2 is not a metrics record"):
            read_metrics(path)


def test_metrics_are_standard_json_or_nothing(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", None)
    log.append({"step": 1, "train_loss": 3.0})
    with pytest.raises(ValueError):  # a NaN reaching the log is a bug; it is never written as a non-JSON token
        log.append({"step": 2, "train_loss": float("nan")})
    log.close()
    assert metrics(tmp_path) == [{"step": 1, "train_loss": 3.0}]
