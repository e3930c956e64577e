"""The one exception type for user mistakes: its message names the problem and the fix.

The CLI prints it on one line and exits non-zero; internal invariants stay asserts.
"""


class Gpt2OnnxError(Exception):
    """A problem the user can fix (bad argument, missing file, unsupported model)."""
