"""The command lines that reproduce a bench and each of its cells."""

from __future__ import annotations

import json
import shlex
from typing import Any

from ...calibration import GRADIENT, StatisticNames
from ...config import run_args
from ...decompose import get_base
from .grid import BenchOptions, Method, _scoped

# Statistics computed from gradients on --fisher-windows windows (fwsvd/tfwsvd's Fisher, kfac's output-gradient Gram):
# a base reading either needs --fisher-windows in its reproducing command.
GRADIENT_STATISTICS = StatisticNames(GRADIENT)  # a live view of the registry's gradient statistics


def reproduce_command(method: Method, keep: float, opts: BenchOptions, args: dict[str, Any], out_dir: str) -> str:
    """The ``ranklm compress`` command that gives this cell's model and perplexity."""
    parts = ["ranklm", "compress"]
    if args.get("model") not in (None, "default"):
        parts += ["--model", str(args["model"])]
    if args.get("data") not in (None, "default"):
        parts += ["--data", str(args["data"])]
    evals = [str(e) for e in (args.get("eval_data") or [])]  # every --eval-data, the first the main one
    if evals:
        parts += ["--eval-data", evals[0]]
    if args.get("dtype"):
        parts += ["--dtype", str(args["dtype"])]
    if method.recipe:
        parts += ["--recipe", method.recipe]
    else:
        parts += ["--base", method.base, "--allocator", method.allocator]
    parts += ([] if opts.in_bytes else ["--keep", f"{keep:g}"]) + ["--eval-seq-len", str(opts.eval_seq_len)]
    if opts.eval_windows is not None:
        parts += ["--eval-windows", str(opts.eval_windows)]
    needs = get_base(method.base).needs
    skip = tuple(name for name, applies in (("fisher_windows", bool(needs & GRADIENT_STATISTICS)),
                                             ("sequential", bool(needs))) if not applies)
    # every run field the bench set (the same CompressConfig fields compress takes), windows and seed always
    parts += run_args(opts.cell_run(method, keep), always=("calib_windows", "seq_len", "batch_size", "seed", "fisher_windows"), skip=skip)
    scoped = [("--base-opt", opts.base_options, method.base, "base"),
              ("--alloc-opt", opts.allocator_options, method.allocator, "allocator")]
    if opts.run.get("trainer", "none") != "none":
        scoped.append(("--train-opt", opts.trainer_options, opts.run["trainer"], "trainer"))
    for flag, options, name, kind in scoped:
        for k, v in _scoped(options, name, kind).items():
            parts += [flag, f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    if args.get("threads") is not None:
        parts += ["--threads", str(args["threads"])]
    out = f"{out_dir}/{method.name.replace('+', '_').replace('/', '_').replace(':', '-')}-keep{keep:g}"
    parts += ["--output", out]
    # The second and later evaluation texts: the same windows through `ranklm evaluate` on the saved cell.
    extra = [["ranklm", "evaluate", out, "--data", e, "--seq-len", str(opts.eval_seq_len), "--batch-size", str(opts.run["batch_size"])]
             + (["--windows", str(opts.eval_windows)] if opts.eval_windows is not None else [])
             + (["--threads", str(args["threads"])] if args.get("threads") is not None else [])
             for e in evals[1:]]
    return " && ".join(shlex.join(c) for c in [parts, *extra])


def command_line(ctx, always: tuple[str, ...] = ("recipes", "keep")) -> str:
    """The ``ranklm <command> ...`` line of a click/typer context: arguments, every non-default option and ``always``."""
    parts = ["ranklm", ctx.info_name or "bench"]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        if value == p.default and p.name not in always:
            continue
        if getattr(p, "param_type_name", "") == "argument":
            parts.append(str(value))
            continue
        flag = max(p.opts, key=len)
        if getattr(p, "is_flag", False):
            if value is True:
                parts.append(flag)
            elif p.secondary_opts:
                parts.append(p.secondary_opts[0])
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            parts += [flag, str(v)]
    return shlex.join(parts)
