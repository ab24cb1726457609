"""``ranklm`` command line (typer): one module per command, options shared through ``cli.options``.

Every user mistake surfaces as ``error: <one line>`` on stderr with exit code 2 and nothing
written; progress bars go to stderr, ``--json`` output to stdout. Printing ``--help`` or
``--version`` imports neither torch nor transformers: every command imports what it needs
inside its body.
"""

from __future__ import annotations

# Importing a command module registers its command on ``app``; the order is the order of ``ranklm --help``.
from . import compress, evaluate, info, tools  # noqa: F401  (compress, evaluate, info, plot, export, ...)
from . import finetune, bench  # noqa: F401,I001
from .app import app
from .common import parse_options
from .main import entry, main

__all__ = ["app", "entry", "main", "parse_options"]
