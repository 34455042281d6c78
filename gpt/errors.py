"""How a problem reads when it is reported to a user: one line.

Here, below every other module of the package, so that the modules raising expected errors
(checkpoint, data, runfiles, train) and the one reporting them (cli) can all use it.
"""


class RunError(RuntimeError):
    """A run cannot go on, for a reason the user can fix: its --out is in use by another run, the
    disk is full, the training diverged. The message says what happened, what was kept, and what to do."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): libraries
    such as torch.load raise messages many lines long, and a user needs the first."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def format_bytes(n: int | float) -> str:
    """A size for a message: 1.5 GiB, 23.4 MiB, 512 B."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
