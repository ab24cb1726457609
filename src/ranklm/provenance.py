"""The command line this process was started with, for the records it writes (ranklm.json, the model card).

Set once by the console entry point (``ranklm.cli.main``); empty in library use, where no command
produced the result. Kept in core so the checkpoint writer can read it without importing the CLI.
"""

from __future__ import annotations

import shlex

_COMMAND: str | None = None


def set_command(argv: list[str]) -> None:
    """Remember ``ranklm ARGS...`` (quoted as a shell would need it) for this process."""
    global _COMMAND
    _COMMAND = shlex.join(["ranklm", *argv])


def command() -> str | None:
    """The ``ranklm ...`` command of this process, or None when ranklm runs as a library."""
    return _COMMAND


__all__ = ["command", "set_command"]
