"""User-facing errors.

Anything the user can fix (bad ratio, bad path, corrupt checkpoint, ...) raises
``RanklmError``; the CLI prints its message on one line and exits with code 2.
Everything else is a bug and keeps its traceback.
"""


class RanklmError(Exception):
    """A problem with the user's input, explained in one line."""
