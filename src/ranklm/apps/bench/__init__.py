"""``ranklm bench``: every method side by side in one process (docs/design.md §7).

A grid of methods (recipes, or ``base+allocator`` pairs) x keep ratios runs on
the *same* calibration windows and the *same* evaluation windows. Each cell is one
run of the pipeline (``pipeline.run``) on a deep copy of the dense model, with the
same statistics mode ``compress`` uses (block by block with compressed propagation
for activation bases unless ``--whole-model``), so a cell's rank map and perplexity
are exactly what its ``ranklm compress`` command gives. What can be shared is shared
through a ``pipeline.FactorCache``: pass-1 statistics and factorizations once per base
and statistics mode; the refit pass, allocation, training and installation are per cell.

Each cell is evaluated: perplexity on every evaluation text, generation quality of
greedy continuations (distinct-2, repeated-4-gram rate), optionally the held-out
calibration perplexity (``--auto``) and the forward speed-up. Learning allocators
also report the keep their masks reached before the exact fit (``keep_learned``)
and the share of top-k prefix masks.

Reported per cell: ``compress_s`` = what a standalone ``ranklm compress`` pays
(the shared pass 1 of its base + the cell's own part), ``cell_s`` = the cell's own
part; ``rss_shared_mib`` = resident-memory growth during its base's pass 1 (once,
shared), ``rss_cell_mib`` = growth during the cell's own part (the model copy
included). Memory is polled from ``/proc/self/statm`` every 20 ms.

A cell that raises is recorded (``status=error`` and the message) and the grid
goes on. Every row carries the ``ranklm compress`` command that reproduces it.

One module per job: grid (what runs), windows, runner (the cells through the pipeline), commands
(reproducing command lines), tables (outputs), memory (RSS polling).
"""

from __future__ import annotations

from .memory import PeakRSS, rss_bytes
from .grid import BenchOptions, BenchResult, Method, parse_byte_budgets, parse_keeps, parse_method, parse_methods, parse_scoped_options
from .windows import calibration_split, eval_windows_of
from .commands import GRADIENT_STATISTICS, command_line, reproduce_command
from .runner import run_bench
from .tables import CSV_COLUMNS, results_csv, results_markdown, write_outputs

__all__ = [
    "BenchOptions",
    "BenchResult",
    "CSV_COLUMNS",
    "GRADIENT_STATISTICS",
    "Method",
    "PeakRSS",
    "calibration_split",
    "command_line",
    "eval_windows_of",
    "parse_byte_budgets",
    "parse_keeps",
    "parse_method",
    "parse_methods",
    "parse_scoped_options",
    "reproduce_command",
    "results_csv",
    "results_markdown",
    "rss_bytes",
    "run_bench",
    "write_outputs",
]
