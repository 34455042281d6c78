"""The files a run writes into --out, the lock that gives --out to one run at a time, and the stop
request that ends a run cleanly.

    run.lock       held while a run lasts (RunLock): a second run into the same --out is refused
    ckpt.pt        the checkpoint (gpt/checkpoint.py), replaced atomically at every save
    metrics.jsonl  one JSON object per log step (MetricsLog), each line written and fsynced whole
    loss.png       the loss curves (gpt/plot.py), replaced atomically

Every file is written so that a crash at any moment leaves a readable one, and a write that fails
(a full disk) leaves the previous file as it was and says so in one line. StopRequest turns SIGINT
(Ctrl-C) and SIGTERM into "save a checkpoint after this step and exit".

    prepare_out(out)                      # a writable directory, or a one-line error, before anything is loaded
    with RunLock(out): ...                # RunError if another run holds it
    check_room(out, checkpoint_bytes)     # room for the atomic saves of this model's checkpoints
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import time
from pathlib import Path

from .errors import RunError, format_bytes

CKPT_NAME, METRICS_NAME, PLOT_NAME, LOCK_NAME = "ckpt.pt", "metrics.jsonl", "loss.png", "run.lock"
RUN_FILES = (CKPT_NAME, METRICS_NAME, PLOT_NAME)
SMALL_FILES_BYTES = 1 << 20  # room kept beside the checkpoints for metrics.jsonl, loss.png, a result file
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def temporary_path(path: Path, pid: int | None = None) -> Path:
    """Where process `pid` (default: this one) writes `path` before renaming it into place: one
    name per process, so that two writers can never write into the same temporary file."""
    return path.with_name(f"{path.name}.{os.getpid() if pid is None else pid}.tmp")


def atomic_write(path: str | os.PathLike, write, delay_s: float = 0.0) -> None:
    """Call write(file) on a temporary file next to `path`, then rename it over `path`.

    os.replace is atomic within a directory, so a reader (or a process killed mid-save) sees
    either the old complete file or the new complete one, never half of either. The fsyncs make
    the new contents and the rename survive a power cut too. If the write fails, the temporary
    file is removed (a full disk gets its space back) and `path` is untouched: an OSError (disk
    full, read-only, ...) becomes a one-line RunError that says so. delay_s: a pause before the
    rename, for fault-injection tests.
    """
    path = Path(path)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if delay_s:
            time.sleep(delay_s)
        os.replace(temporary, path)
    except BaseException as err:  # also a second Ctrl-C: never leave a partial temporary file behind
        temporary.unlink(missing_ok=True)
        cause = os_error(err)
        if cause is None:
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        raise write_error(path, cause, kept) from None
    sync_directory(path.parent)


def os_error(err: BaseException) -> OSError | None:
    """The OSError behind `err`, if any: torch.save reports a failed write as a RuntimeError
    ("unexpected pos ...") raised while handling the OSError that says why."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def write_error(path: Path, err: OSError, kept: str = "") -> RunError:
    """The one line for a failed write: which file, why, what was kept, what to do."""
    if err.errno in DISK_FULL:
        why, fix = f"the disk is full ({err.strerror})", "free some space and run again"
    else:
        why, fix = err.strerror or str(err), f"check that {path.parent} is writable and run again"
    return RunError(f"could not write {path}: {why}; {kept + '; ' if kept else ''}{fix}")


def sync_directory(directory: Path) -> None:
    """fsync a directory, so that a rename inside it survives a power cut."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def prepare_out(out: Path) -> None:
    """--out as a directory whose run files are files: created if missing, else a one-line
    ValueError before anything is loaded or trained. (Whether it is writable shows when RunLock
    creates its lock file there.)"""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"--out {out} exists and is not a directory; choose another --out") from None
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create the directory ({err.strerror}); choose another --out") from None
    for name in RUN_FILES:
        if (out / name).exists() and not (out / name).is_file():
            raise ValueError(
                f"{out / name} is not a file, so the run cannot write it; move it away or choose another --out"
            )


def check_room(out: Path, checkpoint_bytes: int = 0) -> None:
    """Refuse (RunError) unless --out has room for the run's small files and, if it saves any, for
    checkpoints of `checkpoint_bytes`. A save writes the new checkpoint beside the old one before
    the rename, so a run needs room for two of them (one more when --out already holds one)."""
    if checkpoint_bytes:
        needed = checkpoint_bytes * (1 if (out / CKPT_NAME).exists() else 2) + SMALL_FILES_BYTES
        why = " (a checkpoint is written beside the previous one, then renamed over it)"
    else:
        needed, why = SMALL_FILES_BYTES, ""
    on_disk = next(path for path in (out, *out.absolute().parents) if path.exists())  # out may be made later
    free = shutil.disk_usage(on_disk).free
    if free < needed:
        raise RunError(
            f"not enough disk space in {out}: the run needs about {format_bytes(needed)}{why}, "
            f"{format_bytes(free)} is free; free some space or choose another --out"
        )


def remove_temporaries(out: Path) -> None:
    """Delete the temporary files that killed runs left in --out (their space would stay used).
    Call it holding the RunLock: then no other run is writing there."""
    for name in RUN_FILES:
        for leftover in out.glob(f"{name}.*tmp"):  # ckpt.pt.<pid>.tmp, and ckpt.pt.tmp of older versions
            leftover.unlink(missing_ok=True)


class RunLock:
    """One run per --out: an exclusive flock on out/run.lock, held while the run lasts.

    The kernel releases an flock when the process holding it ends, however it ends (SIGKILL
    included), so a crashed run never leaves a stale lock behind. The file holds the holder's
    pid, for the message a second run gets; it is removed when the run ends.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.descriptor: int | None = None

    def __enter__(self) -> "RunLock":
        while True:
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise ValueError(
                    f"--out {self.path.parent} is not writable ({err.strerror}); choose another --out"
                ) from None
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 64).decode(errors="replace").strip() or "unknown"
                os.close(descriptor)
                raise RunError(
                    f"{self.path.parent} is in use by another run (pid {holder}); wait for it to end, "
                    "or choose another --out"
                ) from None
            # The previous holder removes the file as it ends: if it did so between our open and our
            # flock, we hold a lock on a file nobody else sees. Then lock the new one instead.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(descriptor).st_ino:
                    break
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self.descriptor = descriptor
        return self

    def __exit__(self, *exc_info) -> None:
        self.path.unlink(missing_ok=True)  # while still holding it: the next run creates a fresh file
        os.close(self.descriptor)  # releases the flock
        self.descriptor = None


class MetricsLog:
    """metrics.jsonl: one JSON object per line, each written in one write() and fsynced, so a
    crash can at worst cut the last line, and readers skip a cut line. Only standard JSON: a
    non-finite number (NaN, inf) is refused, never written."""

    def __init__(self, path: Path, keep_until_step: int | None):
        """Start the file afresh, or (when resuming) keep the lines up to the checkpoint's step, so
        that it ends up as if the run had never stopped."""
        kept = [] if keep_until_step is None else [r for r in read_metrics(path) if r["step"] <= keep_until_step]
        self.path, self.records = path, kept
        atomic_write(path, lambda file: file.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        self.file = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        try:
            self.file.write(line)
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as err:
            raise write_error(self.path, err) from None
        self.records.append(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a full disk already reported by append
            self.file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict]:
    """Every record in a metrics.jsonl (none if the file does not exist). A last line cut short
    by a crash is skipped; any other line that is not a record of ours is a one-line ValueError,
    and the file is left as it is. NaN and Infinity, which are not JSON, are read as null."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise ValueError(f"cannot read {path} ({err.strerror}); move it away to start its log afresh") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line, parse_constant=lambda name: None)  # NaN, Infinity: older versions wrote them
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # the line a crash cut short
            record = None
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise ValueError(
                f"{path} line {number} is not a metrics record of this project ({line[:60]!r}); "
                "remove that line, or move the file away, and run again"
            )
        records.append(record)
    return records


class Interrupted(BaseException):
    """A signal ended work that changes nothing (an evaluation) at once: see StopRequest.interruptible.
    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way (Triton's
    interpreter has one) turns it into another error."""


class StopRequest:
    """SIGINT/SIGTERM ask the training loop to save a checkpoint and stop after the current
    step, instead of killing it mid-update; a second signal exits at once (the last checkpoint
    on disk is always complete). Inside interruptible() a signal stops the work at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}
        self._interruptible = False

    def __enter__(self) -> "StopRequest":
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @contextlib.contextmanager
    def interruptible(self):
        """Work inside may be abandoned: a signal (or one that came already) raises Interrupted
        at once instead of waiting for the work to end. Only for work that changes no state, such
        as an evaluation, which through Triton's CPU interpreter can take many minutes."""
        if self.signum is not None:
            raise Interrupted
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum
        if self._interruptible:
            raise Interrupted

    @property
    def exit_code(self) -> int:
        return 0 if self.signum is None else 128 + self.signum  # the shell's convention for "killed by"
