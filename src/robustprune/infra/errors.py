"""The one exception type for bad user input.

Anything raised as :class:`UserError` is the user's to fix (a wrong name, a bad value, a missing file); the CLI
prints its message on one line and exits with status 2. Every other exception is a bug and exits with status 1.
"""


class UserError(ValueError):
    """Bad input from the user: shown as one line, exit status 2."""


def one_line(value: object) -> str:
    """A message on one line (a reason quoted from elsewhere may hold newlines; stderr gets exactly one line)."""
    return " ".join(str(value).split())


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or parameter: the run stops with one line and exit status 1 (not the
    user's input, not a bug either); the last good resume journal is kept."""
