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
"""

from __future__ import annotations

import copy
import csv
import gc
import io
import json
import math
import os
import shlex
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .budget import TOLERANCE, meets_budget, model_params, targets_dense_params
from .calibration import TextSource, token_stream
from .calibration.data import seeded_split, stream_windows
from .config import RECIPES, CompressConfig, parse_option_value, resolve_keep
from .decompose import get_base
from .errors import RanklmError
from .eval.generate import generation_quality, prompts_from_stream
from .eval.latency import DEFAULT_DECODE, DEFAULT_SHAPES, flop_ratio_limit, measure_decode, measure_latency
from .eval.perplexity import perplexity, require_causal_lm
from .pipeline import FactorCache, calibration_info, make_plan
from .pipeline import run as run_pipeline
from .targets import Target, find_targets

# Statistics computed from gradients on --fisher-windows windows (fwsvd/tfwsvd's Fisher, kfac's output-gradient Gram):
# a base reading either needs --fisher-windows in its reproducing command.
GRADIENT_STATISTICS = frozenset({"fisher", "out_gram"})


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Resident set size of this process (from /proc/self/statm)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        return 0


class PeakRSS:
    """Peak resident-memory growth over a ``with`` block, polled in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20


# --------------------------------------------------------------------------- grid description


@dataclass(frozen=True)
class Method:
    """One row family of the grid: a recipe name or a ``base+allocator`` pair."""

    name: str
    base: str
    allocator: str
    recipe: str | None  # None when written as base+allocator and not a named recipe


def parse_method(spec: str) -> Method:
    """``svd-llm`` (a recipe) or ``whiten+loss`` (base+allocator); unknown names raise RanklmError."""
    spec = spec.strip()
    if not spec:
        raise RanklmError("empty method name in --recipes")
    if "+" in spec:
        b, _, a = spec.partition("+")
        cfg = CompressConfig(recipe=None, base=b.strip(), allocator=a.strip())
        recipe = next((r for r, pair in RECIPES.items() if pair == (cfg.base, cfg.allocator)), None)
        return Method(spec, cfg.base, cfg.allocator, recipe)  # type: ignore[arg-type]
    cfg = CompressConfig(recipe=spec)
    return Method(spec, cfg.base, cfg.allocator, spec)  # type: ignore[arg-type]


def parse_methods(specs: str | list[str]) -> list[Method]:
    items = specs.split(",") if isinstance(specs, str) else [s for x in specs for s in x.split(",")]
    methods = [parse_method(s) for s in items if s.strip()]
    if not methods:
        raise RanklmError("--recipes names no method")
    names = [m.name for m in methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RanklmError(f"--recipes names {', '.join(dup)} twice")
    return methods


def parse_keeps(spec: str | list[float]) -> list[float]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    keeps = []
    for x in items:
        if isinstance(x, str):
            x = x.strip()
            if not x:
                continue
            try:
                x = float(x)
            except ValueError:
                raise RanklmError(f"bad ratio --keep {x!r}: not a number") from None
        k = resolve_keep(float(x), None)
        if k >= 1.0:
            raise RanklmError("--keep 1.0 keeps every target dense: nothing to compress (the dense row is always included)")
        keeps.append(k)
    if not keeps:
        raise RanklmError("--keep names no ratio")
    return sorted(set(keeps), reverse=True)


def parse_scoped_options(items: list[str], flag: str) -> dict[str, dict[str, Any]]:
    """``["tfwsvd:adam_steps=40", "side=in"]`` -> ``{"tfwsvd": {...}, "*": {...}}`` (values parsed as JSON)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        scope, sep, rest = item.partition(":")
        if not sep or "=" in scope:
            scope, rest = "*", item
        key, eq, value = rest.partition("=")
        if not eq or not key.strip():
            raise RanklmError(f"{flag} expects [NAME:]KEY=VALUE, got {item!r}")
        out.setdefault(scope.strip(), {})[key.strip()] = parse_option_value(value)
    return out


def _scoped(options: dict[str, dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    """A method's options: the unscoped ones it declares, then the ones scoped to its name (validated later)."""
    from .registry import method_options

    declared = {o.name for o in method_options(kind, name)}
    shared = {k: v for k, v in options.get("*", {}).items() if k.replace("-", "_") in declared}
    return {**shared, **options.get(name, {})}


@dataclass
class BenchOptions:
    calib_windows: int = 128
    seq_len: int = 512  # calibration windows
    eval_seq_len: int = 512  # evaluation windows
    sequential: bool | None = None  # None: the pipeline's default (block by block for activation bases)
    propagate: str = "compressed"
    eval_windows: int | None = 40
    batch_size: int = 4
    seed: int = 0
    fisher_windows: int = 32
    min_rank: int = 1
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    base_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # {base or "*": {k: v}}
    allocator_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    gen_prompts: int = 20  # 0 = no generation-quality columns
    gen_prompt_len: int = 32
    gen_new_tokens: int = 64
    latency: bool = False
    latency_shapes: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_SHAPES))
    latency_reps: int = 5
    latency_warmup: int = 1
    decode: tuple[int, int] | None = DEFAULT_DECODE  # with latency: (prompt, new) tokens of the decode column; None = skip
    auto: bool = False
    auto_windows: int = 8  # held-out calibration windows for --auto
    save_best: str | None = None
    save_dir: str | None = None  # save every cell's model as save_dir/<method>@<keep> (ranklm checkpoints)
    rank_plot_keep: float | None = None
    progress: bool = True


@dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    rank_maps: dict[str, dict[str, Any]]  # "method@keep" -> rank map
    targets: list[Target]
    best: dict[str, Any] | None = None


# --------------------------------------------------------------------------- windows


def calibration_split(
    tokenizer, source: TextSource, seq_len: int, n: int, holdout: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, held-out calibration windows) of one source.

    The first are exactly ``token_windows(tokenizer, source, seq_len, n, seed=seed)`` (what
    ``ranklm compress`` uses); the held-out ones come next in the same seeded permutation, so
    they never overlap the calibration windows."""
    windows = stream_windows(token_stream(tokenizer, source.documents), seq_len, source.description)
    total = len(windows)
    calib, held = seeded_split(windows, n, seed, holdout)
    if holdout and len(held) == 0:
        raise RanklmError(
            f"--auto needs held-out calibration windows, but all {total} windows of {seq_len} tokens of the "
            f"calibration text are used for calibration: lower --calib-windows (at most {total - 1})"
        )
    return calib, held


def eval_windows_of(tokenizer, source: TextSource, seq_len: int, max_windows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluation windows as ``ranklm compress``/``evaluate`` cut them, the whole token stream)."""
    stream = token_stream(tokenizer, source.documents)
    w = stream_windows(stream, seq_len, source.description, purpose="evaluation")
    if max_windows is not None:
        w = w[:max_windows]
    return w.contiguous(), stream


# --------------------------------------------------------------------------- reproducing command


def reproduce_command(method: Method, keep: float, opts: BenchOptions, args: dict[str, Any], out_dir: str) -> str:
    """The ``ranklm compress`` command that gives this cell's model and perplexity."""
    parts = ["ranklm", "compress"]
    if args.get("model") not in (None, "default"):
        parts += ["--model", str(args["model"])]
    if args.get("data") not in (None, "default"):
        parts += ["--data", str(args["data"])]
    evals = [str(e) for e in (args.get("eval_data") or [])]
    if isinstance(args.get("eval_data"), str):
        evals = [args["eval_data"]]
    if evals:
        parts += ["--eval-data", evals[0]]
    if args.get("dtype"):
        parts += ["--dtype", str(args["dtype"])]
    if method.recipe:
        parts += ["--recipe", method.recipe]
    else:
        parts += ["--base", method.base, "--allocator", method.allocator]
    parts += ["--keep", f"{keep:g}", "--calib-windows", str(opts.calib_windows), "--seq-len", str(opts.seq_len),
              "--eval-seq-len", str(opts.eval_seq_len)]
    if opts.eval_windows is not None:
        parts += ["--eval-windows", str(opts.eval_windows)]
    parts += ["--batch-size", str(opts.batch_size), "--seed", str(opts.seed)]
    if get_base(method.base).needs & GRADIENT_STATISTICS:
        parts += ["--fisher-windows", str(opts.fisher_windows)]
    if opts.sequential is False and get_base(method.base).needs:
        parts += ["--whole-model"]
    if opts.propagate != "compressed":
        parts += ["--propagate", opts.propagate]
    for k, v in _scoped(opts.base_options, method.base, "base").items():
        parts += ["--base-opt", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    for k, v in _scoped(opts.allocator_options, method.allocator, "allocator").items():
        parts += ["--alloc-opt", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    for p in opts.include:
        parts += ["--include", p]
    for p in opts.exclude:
        parts += ["--exclude", p]
    if args.get("threads") is not None:
        parts += ["--threads", str(args["threads"])]
    out = f"{out_dir}/{method.name.replace('+', '_')}-keep{keep:g}"
    parts += ["--output", out]
    # The second and later evaluation texts: the same windows through `ranklm evaluate` on the saved cell.
    extra = [["ranklm", "evaluate", out, "--data", e, "--seq-len", str(opts.eval_seq_len), "--batch-size", str(opts.batch_size)]
             + (["--windows", str(opts.eval_windows)] if opts.eval_windows is not None else [])
             + (["--threads", str(args["threads"])] if args.get("threads") is not None else [])
             for e in evals[1:]]
    return " && ".join(shlex.join(c) for c in [parts, *extra])


# --------------------------------------------------------------------------- the grid


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or x == "":
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if math.isinf(x):
            return "inf"
        if abs(x) >= 1e5:
            return f"{x:.3g}"
        return f"{x:.{digits}f}"
    return str(x)


def _deepcopy_model(model: nn.Module) -> nn.Module:
    state = getattr(model, "ranklm", None)
    if state is not None:
        del model.ranklm
    try:
        return copy.deepcopy(model)
    finally:
        if state is not None:
            model.ranklm = state


def run_bench(
    model: nn.Module,
    tokenizer,
    methods: list[Method],
    keeps: list[float],
    calib_src: TextSource,
    eval_srcs: list[tuple[str, TextSource]],
    opts: BenchOptions,
    model_info: dict[str, Any] | None = None,
    command_args: dict[str, Any] | None = None,
    out_dir: str = "ckpt",
    log: Callable[[str], None] | None = None,
) -> BenchResult:
    """Run the grid; never raises for a failing cell (it becomes a row with ``status=error``)."""
    require_causal_lm(model)
    if tokenizer is None:
        raise RanklmError("tokenizer missing: bench needs the model's tokenizer to cut text into windows")
    if not eval_srcs:
        raise RanklmError("bench needs at least one evaluation text")
    if opts.auto and len(keeps) != 1:
        raise RanklmError(f"--auto picks the best method at one budget: give one --keep ratio (got {len(keeps)})")
    model_info = model_info or {"name_or_path": getattr(model.config, "name_or_path", "") or type(model).__name__}
    command_args = command_args or {}
    log = log or (lambda s: None)
    model.eval()
    targets = find_targets(model, opts.include, opts.exclude)
    dense_params = model_params(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    calib, held = calibration_split(
        tokenizer, calib_src, opts.seq_len, opts.calib_windows, opts.auto_windows if opts.auto else 0, opts.seed
    )
    evals = []
    for label, src in eval_srcs:
        w, stream = eval_windows_of(tokenizer, src, opts.eval_seq_len, opts.eval_windows)
        evals.append((label, src, w, stream))
    prompts = None
    if opts.gen_prompts > 0:
        prompts = prompts_from_stream(evals[0][3], opts.gen_prompts, opts.gen_prompt_len, opts.gen_new_tokens)

    cells = [(m, k) for m in sorted(methods, key=lambda m: (m.base, methods.index(m))) for k in keeps]
    bar = tqdm(total=len(cells) + 1, desc="bench", disable=not opts.progress, unit="cell")

    def evaluate(m: nn.Module, row: dict[str, Any], dense: bool = False) -> None:
        for i, (label, src, w, _) in enumerate(evals):
            bar.set_postfix_str(f"{row['method']}@{row['keep']:g}: perplexity {label}")
            r = perplexity(m, w, opts.batch_size, progress=False)
            row["ppl" if i == 0 else f"ppl_{label}"] = r.ppl
            if i == 0:
                row.update(eval_windows=r.windows, eval_tokens=r.tokens, seq_len=r.seq_len)
        if prompts is not None:
            bar.set_postfix_str(f"{row['method']}@{row['keep']:g}: generation")
            q = generation_quality(m, prompts, opts.gen_new_tokens, tokenizer=tokenizer)
            row.update(distinct2=q.distinct2, repeat4=q.repeat4)
        if opts.auto:
            row["calib_ppl"] = perplexity(m, held, opts.batch_size, progress=False).ppl
        if opts.latency and not dense:
            bar.set_postfix_str(f"{row['method']}@{row['keep']:g}: latency")
            lat = measure_latency(model, m, opts.latency_shapes, opts.latency_reps, opts.latency_warmup)
            row["speedup"] = lat.speedup
            if opts.decode is not None:
                bar.set_postfix_str(f"{row['method']}@{row['keep']:g}: decode")
                lat.decode = measure_decode(model, m, *opts.decode, reps=opts.latency_reps, warmup=opts.latency_warmup)
                row.update(decode_speedup=lat.decode.speedup, decode_limit=lat.decode.limit)
            row["latency"] = lat.to_dict()
        row["flop_limit"] = flop_ratio_limit(targets, m.ranklm.rank_map) if not dense else 1.0

    rows: list[dict[str, Any]] = []
    dense_row: dict[str, Any] = {"method": "dense", "base": "-", "allocator": "-", "keep": 1.0, "keep_achieved": 1.0,
                                 "keep_model": 1.0, "status": "ok", "error": "", "compress_s": 0.0, "cell_s": 0.0}
    try:
        evaluate(model, dense_row, dense=True)
    except Exception as e:  # noqa: BLE001
        dense_row.update(status="error", error=f"{type(e).__name__}: {e}")
    if command_args.get("eval_data") or command_args.get("data") in (None, "default"):
        dense_row["command"] = shlex.join(
            ["ranklm", "evaluate"] + ([str(command_args["model"])] if command_args.get("model") not in (None, "default") else [])
            + (["--data", str(command_args["eval_data"])] if command_args.get("eval_data") else [])
            + ["--seq-len", str(opts.eval_seq_len)] + (["--windows", str(opts.eval_windows)] if opts.eval_windows else [])
            + ["--batch-size", str(opts.batch_size)]
            + (["--dtype", str(command_args["dtype"])] if command_args.get("dtype") else [])
        )
    else:  # the evaluation part of a split --data has no file of its own
        dense_row["command"] = "any cell's ranklm compress command prints it (dense perplexity, --json: ppl_dense)"
    rows.append(dense_row)
    log(json.dumps({k: v for k, v in dense_row.items() if k != "latency"}, default=str))
    bar.update(1)

    cache = FactorCache(model, targets, calib, opts.batch_size, opts.fisher_windows, progress=False)
    rank_maps: dict[str, dict[str, Any]] = {}
    best: dict[str, Any] | None = None
    best_model: nn.Module | None = None
    remaining = {m.base: sum(1 for c in cells if c[0].base == m.base) for m in methods}
    shared_cost: dict[tuple[str, bool], tuple[float, float]] = {}  # pass 1 per (base, mode): seconds, RSS growth

    for method, keep in cells:
        bar.set_postfix_str(f"{method.name}@{keep:g}")
        row: dict[str, Any] = {"method": method.name, "base": method.base, "allocator": method.allocator, "keep": keep,
                               "status": "ok", "error": ""}
        row["command"] = reproduce_command(method, keep, opts, command_args, out_dir)
        cell_model = None
        try:
            config = CompressConfig(
                keep=keep, recipe=method.recipe, base=method.base, allocator=method.allocator,
                include=list(opts.include), exclude=list(opts.exclude), calib_windows=opts.calib_windows,
                seq_len=opts.seq_len, batch_size=opts.batch_size, seed=opts.seed, min_rank=opts.min_rank,
                fisher_windows=opts.fisher_windows, sequential=opts.sequential, propagate=opts.propagate,
                base_options=_scoped(opts.base_options, method.base, "base"),
                allocator_options=_scoped(opts.allocator_options, method.allocator, "allocator"),
            )
            plan = make_plan(config)
            key = (method.base, plan.sequential)
            if plan.needs_pass1 and key not in shared_cost:  # pass 1 once per base and mode, timed on its own
                bar.set_postfix_str(f"{method.name}@{keep:g}: statistics + decomposition ({method.base})")
                t0 = time.perf_counter()
                with PeakRSS() as mem:
                    cache.factorizations(plan.base, plan.sequential)
                shared_cost[key] = (time.perf_counter() - t0, mem.growth_mib)
            shared_s, shared_rss = shared_cost.get(key, (0.0, 0.0)) if plan.needs_pass1 else (0.0, 0.0)
            bar.set_postfix_str(f"{method.name}@{keep:g}: compress")
            t0 = time.perf_counter()
            with PeakRSS() as mem:
                torch.manual_seed(opts.seed)
                cell_model = _deepcopy_model(model)
                calib_info = {**calibration_info(calib_src.description, calib, config), "used": True}
                run_pipeline(cell_model, tokenizer, config, data=calib, calibration=calib_info, cache=cache,
                             progress=False, base_model=model_info)
            cell_s = time.perf_counter() - t0
            if not plan.needs_windows:
                cell_model.ranklm.calibration = None
            cell_model.ranklm.timings.update({"total_s": shared_s + cell_s, "shared_s": shared_s, "cell_s": cell_s})
            achieved = cell_model.ranklm.keep_achieved
            row.update(keep_achieved=achieved, keep_model=cell_model.ranklm.keep_achieved_model,
                       compress_s=shared_s + cell_s, cell_s=cell_s, rss_shared_mib=shared_rss, rss_cell_mib=mem.growth_mib)
            for r in cell_model.ranklm.training:
                if "keep_learned" in r:
                    row["keep_learned"] = r["keep_learned"]
                    if "prefix_fraction" in r:
                        row["prefix_fraction"] = r["prefix_fraction"]
            if not meets_budget(achieved, keep):
                row["error"] = f"achieved keep {achieved:.4f} not within {TOLERANCE:.1%} below {keep}"
            rank_maps[f"{method.name}@{keep:g}"] = cell_model.ranklm.rank_map
            evaluate(cell_model, row)
            ev = {"data": evals[0][1].description,
                  "dense": {"ppl": dense_row.get("ppl"), "windows": dense_row.get("eval_windows"),
                            "tokens": dense_row.get("eval_tokens"), "seq_len": opts.eval_seq_len},
                  "compressed": {"ppl": row.get("ppl"), "windows": row.get("eval_windows"),
                                 "tokens": row.get("eval_tokens"), "seq_len": opts.eval_seq_len}}
            cell_model.ranklm.evaluation = ev
            if opts.save_dir:
                from .io import save

                cell_dir = Path(opts.save_dir) / f"{method.name}@{keep:g}"
                save(cell_model, tokenizer, cell_dir, overwrite=True)
                row["checkpoint"] = str(cell_dir)
            if opts.auto and math.isfinite(row.get("calib_ppl", math.inf)) and (
                best is None or row["calib_ppl"] < best["calib_ppl"]
            ):
                best = {"method": method.name, "keep": keep, "calib_ppl": row["calib_ppl"], "ppl": row.get("ppl"),
                        "command": row["command"]}
                best_model, cell_model = cell_model, None
        except Exception as e:  # noqa: BLE001 - one failing cell must not stop the grid
            row.update(status="error", error=f"{type(e).__name__}: {e}".strip())
            row["traceback"] = traceback.format_exc(limit=4)
        finally:
            del cell_model
            remaining[method.base] -= 1
            if remaining[method.base] == 0:
                cache.release(method.base)
            gc.collect()
        rows.append(row)
        log(json.dumps({k: v for k, v in row.items() if k not in ("latency", "traceback")}, default=str))
        bar.update(1)
    bar.close()

    if opts.auto and opts.save_best:
        if best_model is None:
            raise RanklmError("--auto: no cell succeeded with a finite calibration perplexity: nothing to save")
        from .io import save

        save(best_model, tokenizer, opts.save_best, overwrite=True)
        best["saved"] = str(opts.save_best)

    order = {m.name: i for i, m in enumerate(methods)}
    rows[1:] = sorted(rows[1:], key=lambda r: (order[r["method"]], -r["keep"]))
    meta = {
        "model": model_info.get("name_or_path"),
        "model_params": dense_params,
        "model_mib": param_bytes / 2**20,
        "targets": len(targets),
        "targets_params": targets_dense_params(targets),
        "calibration": f"{len(calib)} x {opts.seq_len} tokens of {calib_src.description}",
        "evaluation": {label: f"{len(w)} x {opts.eval_seq_len} tokens ({len(w) * (opts.eval_seq_len - 1)} predicted) of {src.description}"
                       for label, src, w, _ in evals},
        "eval_labels": [label for label, *_ in evals],
        "generation": (f"greedy, {opts.gen_new_tokens} new tokens after {len(prompts)} prompts of {opts.gen_prompt_len} tokens "
                       f"at evenly spaced positions of the '{evals[0][0]}' evaluation text") if prompts is not None else None,
        "auto": f"{len(held)} held-out calibration windows x {opts.seq_len} tokens" if opts.auto else None,
        "stats_seconds": dict(cache.seconds),
        "statistics": "block by block (sequential)" if opts.sequential is not False else "whole model",
        "torch_threads": torch.get_num_threads(),
        "keeps": keeps,
        "methods": [m.name for m in methods],
        "rank_plot_keep": opts.rank_plot_keep if opts.rank_plot_keep is not None else min(keeps),
    }
    return BenchResult(rows=rows, meta=meta, rank_maps=rank_maps, targets=targets, best=best)


# --------------------------------------------------------------------------- outputs

CSV_COLUMNS = [
    "method", "base", "allocator", "keep", "keep_achieved", "keep_model", "ppl", "keep_learned", "prefix_fraction",
    "eval_windows", "eval_tokens",
    "seq_len", "distinct2", "repeat4", "calib_ppl", "speedup", "flop_limit", "decode_speedup", "decode_limit", "compress_s", "cell_s",
    "rss_shared_mib", "rss_cell_mib", "status", "error", "command",
]


def _columns(result: BenchResult) -> list[str]:
    extra = [f"ppl_{label}" for label in result.meta["eval_labels"][1:]]
    cols = CSV_COLUMNS[:7] + extra + CSV_COLUMNS[7:]
    if not any("calib_ppl" in r for r in result.rows):
        cols.remove("calib_ppl")
    for c in ("speedup", "decode_speedup", "decode_limit"):
        if not any(c in r for r in result.rows):
            cols.remove(c)
    if not any("distinct2" in r for r in result.rows):
        cols.remove("distinct2")
        cols.remove("repeat4")
    for c in ("keep_learned", "prefix_fraction"):
        if not any(c in r for r in result.rows):
            cols.remove(c)
    return cols


def results_csv(result: BenchResult) -> str:
    buf = io.StringIO()
    cols = _columns(result)
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in result.rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c, "")) for c in cols})
    return buf.getvalue()


def results_markdown(result: BenchResult, command: str | None = None) -> str:
    m = result.meta
    labels = m["eval_labels"]
    lines = []
    if command:
        lines += [f"`{command}`", ""]
    lines += [
        f"- model: {m['model']} ({m['model_params']:,} parameters, {m['model_mib']:.1f} MiB; {m['targets']} target matrices, "
        f"{m['targets_params']:,} parameters)",
        f"- calibration: {m['calibration']}",
    ]
    for label in labels:
        lines.append(f"- evaluation `{label}`: {m['evaluation'][label]}")
    if m.get("generation"):
        lines.append(f"- generation quality: {m['generation']}; distinct-2 = unique/total bigrams (higher is better), "
                     "rep-4 = fraction of 4-grams already seen earlier in the continuation (lower is better)")
    if m.get("auto"):
        lines.append(f"- `--auto` selection: calibration perplexity on {m['auto']}")
    lines.append(
        "- keep = parameters of the target matrices kept (requested / achieved); whole model = all parameters, "
        "embeddings included. compress s = shared statistics + decomposition of its base + the cell; "
        "RSS = resident-memory growth (MiB) of the shared part / of the cell, against a model of "
        f"{m['model_mib']:.1f} MiB. torch threads: {m['torch_threads']}"
    )
    lines.append("")
    cols = _columns(result)
    head = ["method", "base", "allocator", "keep", "keep achieved (targets)", "keep (whole model)"]
    head += [f"ppl {labels[0]}"] + [f"ppl {lab}" for lab in labels[1:]]
    if "keep_learned" in cols:
        head += ["keep learned (before fit)"]
    if "prefix_fraction" in cols:
        head += ["prefix masks"]
    if "distinct2" in cols:
        head += ["distinct-2", "rep-4"]
    if "calib_ppl" in cols:
        head += ["calib ppl"]
    if "speedup" in cols:
        hl = next((r["latency"]["headline"] for r in result.rows if r.get("latency")), None)
        head += [f"speed-up (batch {hl[0]}, seq {hl[1]})" if hl else "speed-up"]
    head += ["FLOP limit"]
    if "decode_speedup" in cols:
        head += ["decode speed-up (batch 1)", "decode limit (weight bytes)"]
    head += ["compress s", "RSS MiB shared / cell", "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        cells = [r["method"], r.get("base", "-"), r.get("allocator", "-"), f"{r['keep']:g}",
                 _fmt(r.get("keep_achieved"), 4), _fmt(r.get("keep_model"), 4), _fmt(r.get("ppl"))]
        cells += [_fmt(r.get(f"ppl_{lab}")) for lab in labels[1:]]
        if "keep_learned" in cols:
            cells += [_fmt(r.get("keep_learned"), 4)]
        if "prefix_fraction" in cols:
            cells += [_fmt(r.get("prefix_fraction"), 3)]
        if "distinct2" in cols:
            cells += [_fmt(r.get("distinct2"), 3), _fmt(r.get("repeat4"), 3)]
        if "calib_ppl" in cols:
            cells += [_fmt(r.get("calib_ppl"))]
        if "speedup" in cols:
            cells += [_fmt(r.get("speedup")) + ("x" if r.get("speedup") is not None else "")]
        cells += [_fmt(r.get("flop_limit"))]
        if "decode_speedup" in cols:
            cells += [_fmt(r.get("decode_speedup")) + ("x" if r.get("decode_speedup") is not None else ""),
                      _fmt(r.get("decode_limit"))]
        cells += [_fmt(r.get("compress_s"), 1),
                  f"{_fmt(r.get('rss_shared_mib'), 0)} / {_fmt(r.get('rss_cell_mib'), 0)}" if r["method"] != "dense" else "-",
                  r["status"] + (f": {r['error']}" if r.get("error") else "")]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    if result.best:
        b = result.best
        lines += ["", f"**--auto choice at keep {b['keep']:g}: {b['method']}** (calibration perplexity {_fmt(b['calib_ppl'])}, "
                  f"evaluation perplexity {_fmt(b['ppl'])})" + (f", saved to `{b['saved']}`" if b.get("saved") else "")]
    lat = [r for r in result.rows if r.get("latency")]
    if lat:
        lines += ["", "Latency (median forward ms, dense vs compressed, interleaved runs):", "",
                  "| method | keep | batch | seq | dense ms | compressed ms | speed-up | FLOP limit |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in lat:
            for p in r["latency"]["points"]:
                lines.append(f"| {r['method']} | {r['keep']:g} | {p['batch']} | {p['seq_len']} | {p['dense_ms']:.1f} | "
                             f"{p['compressed_ms']:.1f} | {p['speedup']:.2f}x | {r['latency']['flop_ratio_limit']:.2f}x |")
    dec = [r for r in lat if r["latency"].get("decode")]
    if dec:
        lines += ["", "Decode (batch 1, KV cache, greedy, fixed length; median tokens/s of the cached one-token steps, "
                  "interleaved runs; limit = weight bytes read per token, dense / compressed):", "",
                  "| method | keep | prompt | new tokens | dense tok/s | compressed tok/s | speed-up | limit |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in dec:
            d = r["latency"]["decode"]
            lines.append(f"| {r['method']} | {r['keep']:g} | {d['prompt_len']} | {d['new_tokens']} | {d['dense_tok_s']:.1f} | "
                         f"{d['compressed_tok_s']:.1f} | {d['speedup']:.2f}x | {d['limit']:.2f}x |")
    lines += ["", "Reproduce a cell:", ""]
    for r in result.rows:
        lines.append(f"- {r['method']} @ {r['keep']:g}: `{r['command']}`")
    return "\n".join(lines) + "\n"


def write_outputs(result: BenchResult, out: str | os.PathLike, command: str | None = None, overwrite: bool = False) -> Path:
    """results.csv, results.md, results.json, ppl_vs_keep.png, ranks.png, written atomically to ``out``."""
    from .io import atomic_dir
    from .report.bench import plot_perplexity_vs_keep, plot_rank_heatmap

    with atomic_dir(out, overwrite) as tmp:
        (tmp / "results.csv").write_text(results_csv(result))
        (tmp / "results.md").write_text(results_markdown(result, command))
        (tmp / "results.json").write_text(json.dumps(
            {"command": command, "meta": result.meta, "rows": result.rows, "best": result.best,
             "rank_maps": result.rank_maps}, indent=1, default=str))
        plot_perplexity_vs_keep(result, tmp / "ppl_vs_keep.png")
        plot_rank_heatmap(result, tmp / "ranks.png")
    return Path(out)


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
