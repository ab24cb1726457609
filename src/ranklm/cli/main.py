"""The console entry point: user errors (ours and the parser's) become one ``error:`` line and exit code 2."""

from __future__ import annotations

import logging
import sys

from ..errors import RanklmError
from .app import app
from .common import echo_err, one_line, quiet_libraries


def _click_exception_classes(name: str) -> tuple[type, ...]:
    """``name`` from typer's vendored click (typer >= 0.24), typer itself and click, where each exists."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "typer.exceptions", "typer", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


def _exit_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's time limit) exits through Python, so ``finally`` blocks and exit handlers
    run: no half-written output, and the bounded mode's temporary folder of spilled factors is removed."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors (ours and the command line parser's) become one line and exit code 2."""
    exit_classes = _click_exception_classes("Exit")
    abort_classes = _click_exception_classes("Abort")
    help_classes = _click_exception_classes("NoArgsIsHelpError")  # bare `ranklm`: the help text, not an error
    click_classes = _click_exception_classes("ClickException")

    from ..provenance import set_command

    set_command([str(a) for a in (sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _exit_on_sigterm()
    quiet_libraries()
    try:
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except RanklmError as e:
        echo_err(f"error: {one_line(str(e))}")
        return 2
    except (KeyboardInterrupt, *abort_classes):
        echo_err("interrupted: no output was written under the final name")
        return 130
    except BaseException as e:
        if exit_classes and isinstance(e, exit_classes):
            return int(getattr(e, "exit_code", 0) or 0)
        if help_classes and isinstance(e, help_classes):
            e.show()  # type: ignore[attr-defined]
            return int(getattr(e, "exit_code", 2))
        is_usage = (click_classes and isinstance(e, click_classes)) or (
            hasattr(e, "show") and hasattr(e, "exit_code") and hasattr(e, "format_message")
        )
        if not is_usage:
            raise
        # typer/click usage errors (bad value, unknown flag, missing argument, ...): one line, exit 2.
        echo_err(f"error: {one_line(e.format_message())}")  # type: ignore[attr-defined]
        return 2


def entry() -> None:
    sys.exit(main())
