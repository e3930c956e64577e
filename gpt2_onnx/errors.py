"""The one exception type for user mistakes: its message names the problem and the fix.

The CLI prints it on one line and exits non-zero; internal invariants stay asserts.
"""


class Gpt2OnnxError(Exception):
    """A problem the user can fix (bad argument, missing file, unsupported model)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-line error reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
