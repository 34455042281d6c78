"""The files in --out: one run at a time (the lock), writes that fail cleanly when the disk is
full, and metrics.jsonl read strictly. The concurrent runs are real processes; the full disk is
a real (small) tmpfs where the test may mount one, and a simulated one everywhere."""

import os

import pytest
from helpers import metrics

from gpt.errors import RunError
from gpt.runfiles import MetricsLog, RunLock, atomic_write, read_metrics, temporary_path

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# One run per --out


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
