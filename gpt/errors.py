"""How an exception reads when it is reported to a user: one line.

Here, below every other module of the package, so that the modules raising expected errors
(checkpoint, data) and the one reporting them (cli) can all use it.
"""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): libraries
    such as torch.load raise messages many lines long, and a user needs the first."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
