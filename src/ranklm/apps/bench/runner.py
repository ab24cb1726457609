"""The grid runner: every cell through the one pipeline, side by side in one process, on shared statistics."""

from __future__ import annotations

import copy
import gc
import json
import math
import shlex
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ...budget import TOLERANCE, meets_budget, model_params, targets_dense_params
from ...calibration import TextSource, token_windows
from ...errors import RanklmError
from ...eval.generate import generation_quality, prompts_from_stream
from ...eval.latency import flop_ratio_limit, measure_decode, measure_latency
from ...eval.perplexity import perplexity, require_causal_lm
from ...pipeline import FactorCache, calibration_info, make_plan, trainer_windows
from ...pipeline.memory import out_of_memory_as_error, preflight
from ...pipeline import run as run_pipeline
from ...registry import registered
from ...targets import find_targets
from .commands import reproduce_command
from ...quantize.sizes import bytes_summary
from ...quantize.spec import QuantSpec, parse_quantize
from .grid import BenchOptions, BenchResult, Method
from .memory import PeakRSS
from .windows import calibration_split, eval_windows_of


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
    val_src: TextSource | None = None,
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
    shared = opts.shared  # the run fields every cell shares (windows, seed, rank rules, trainer)
    targets = find_targets(model, shared.include, shared.exclude)
    dense_params = model_params(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    calib, held = calibration_split(
        tokenizer, calib_src, shared.seq_len, shared.calib_windows, opts.auto_windows if opts.auto else 0, shared.seed
    )
    validation = None  # a trainer that validates (heal) gets the validation part's windows, as compress gives them
    trainer_cls = registered("trainer").get(shared.trainer or "none")
    if val_src is not None and getattr(trainer_cls, "validates", False):
        validation = token_windows(tokenizer, val_src, shared.seq_len, None, purpose="validation")
    # a trainer that trains on more calibration text (heal's windows) gets it after --auto's held-out windows
    asked = int(getattr(trainer_cls(**opts.trainer_config()), "windows", 0) or 0) if trainer_cls is not None else 0
    train_windows = trainer_windows(tokenizer, calib_src, shared.seq_len, len(calib), asked, shared.seed, skip=len(held))
    evals = []
    for label, src in eval_srcs:
        w, stream = eval_windows_of(tokenizer, src, opts.eval_seq_len, opts.eval_windows)
        evals.append((label, src, w, stream))
    prompts = None
    if opts.gen_prompts > 0:
        prompts = prompts_from_stream(evals[0][3], opts.gen_prompts, opts.gen_prompt_len, opts.gen_new_tokens)

    cells = [(m, k) for m in sorted(methods, key=lambda m: (m.base, methods.index(m))) for k in keeps]
    bar = tqdm(total=len(cells) + 1, desc="bench", disable=not opts.progress, unit="cell")

    def perplexities(m: nn.Module, row: dict[str, Any], suffix: str = "") -> None:
        """Perplexity on every evaluation text: column ppl<suffix> for the first, ppl_<label><suffix> for the rest."""
        for i, (label, _, w, _) in enumerate(evals):
            bar.set_postfix_str(f"{row['method']}@{row['keep']:g}: perplexity {label}{suffix.replace('_', ' ')}")
            r = perplexity(m, w, shared.batch_size, progress=False)
            row[f"ppl{suffix}" if i == 0 else f"ppl_{label}{suffix}"] = r.ppl
            if i == 0 and not suffix:
                row.update(eval_windows=r.windows, eval_tokens=r.tokens, seq_len=r.seq_len)

    def evaluate(m: nn.Module, row: dict[str, Any], dense: bool = False) -> None:
        perplexities(m, row)
        if prompts is not None:
            bar.set_postfix_str(f"{row['method']}@{row['keep']:g}: generation")
            q = generation_quality(m, prompts, opts.gen_new_tokens, tokenizer=tokenizer)
            row.update(distinct2=q.distinct2, repeat4=q.repeat4)
        if opts.auto:
            row["calib_ppl"] = perplexity(m, held, shared.batch_size, progress=False).ppl
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

    def evaluate_untrained(row: dict[str, Any]) -> Any:
        """The cell's perplexities just before its trainer runs: the trainer's gain, from one allocation."""
        return lambda m: perplexities(m, row, suffix="_untrained")

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
            + (["--data", str(command_args["eval_data"][0])] if command_args.get("eval_data") else [])  # the main text
            + ["--seq-len", str(opts.eval_seq_len)] + (["--windows", str(opts.eval_windows)] if opts.eval_windows else [])
            + ["--batch-size", str(shared.batch_size)]
            + (["--dtype", str(command_args["dtype"])] if command_args.get("dtype") else [])
            + (["--threads", str(command_args["threads"])] if command_args.get("threads") is not None else [])
        )
    else:  # the evaluation part of a split --data has no file of its own
        dense_row["command"] = "any cell's ranklm compress command prints it (dense perplexity, --json: ppl_dense)"
    rows.append(dense_row)
    log(json.dumps({k: v for k, v in dense_row.items() if k != "latency"}, default=str))
    bar.update(1)

    cache = FactorCache(model, targets, calib, shared.batch_size, shared.fisher_windows, progress=False,
                        stats_dtype=getattr(shared, "stats_dtype", "auto"))
    rank_maps: dict[str, dict[str, Any]] = {}
    best: dict[str, Any] | None = None
    best_model: nn.Module | None = None
    remaining = {m.base: sum(1 for c in cells if c[0].base == m.base) for m in methods}
    shared_cost: dict[tuple[str, bool, bool], tuple[float, float]] = {}  # pass 1 per (base, mode): seconds, RSS growth

    probe = None  # the union of the joint cells' widths: kfac's quantization prices, computed once
    joint_widths = sorted({b for m in methods if m.quantize and opts.in_bytes for b in parse_quantize(m.quantize).bits})
    if joint_widths:
        probe = QuantSpec(tuple(joint_widths), int(shared.quant_group_size))
    for method, keep in cells:
        bar.set_postfix_str(f"{method.name}@{keep:g}")
        row: dict[str, Any] = {"method": method.name, "base": method.base, "allocator": method.allocator, "keep": keep,
                               "status": "ok", "error": ""}
        row["command"] = reproduce_command(method, keep, opts, command_args, out_dir)
        cell_model = None
        try:
            config = opts.cell_config(method, keep)
            plan = make_plan(config)
            if probe is not None and plan.base.name == "kfac":  # one factorization prices every cell's widths
                plan.base.quant_probe = probe
            memory = preflight(plan, model, targets, calib, cache)  # once per base: the cells share its mode
            bounded = bool(memory and memory.bounded)
            key = (method.base, plan.sequential, bounded)
            if plan.needs_pass1 and key not in shared_cost:  # pass 1 once per base and mode, timed on its own
                bar.set_postfix_str(f"{method.name}@{keep:g}: statistics + decomposition ({method.base})")
                t0 = time.perf_counter()
                with PeakRSS() as mem, out_of_memory_as_error(memory):
                    cache.factorizations(plan.base, plan.sequential, bounded=bounded)
                shared_cost[key] = (time.perf_counter() - t0, mem.growth_mib)
            shared_s, shared_rss = shared_cost.get(key, (0.0, 0.0)) if plan.needs_pass1 else (0.0, 0.0)
            bar.set_postfix_str(f"{method.name}@{keep:g}: compress")
            t0 = time.perf_counter()
            with PeakRSS() as mem:
                torch.manual_seed(shared.seed)
                cell_model = _deepcopy_model(model)
                calib_info = {**calibration_info(calib_src.description, calib, config), "used": True}
                run_pipeline(cell_model, tokenizer, plan, data=calib, calibration=calib_info, cache=cache,
                             progress=False, base_model=model_info, validation=validation,
                             train_windows=train_windows,
                             before_training=None if (shared.trainer or "none") == "none" else evaluate_untrained(row))
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
            row.update(bytes_summary(cell_model))
            if not (opts.in_bytes and method.quantize) and not meets_budget(achieved, keep):
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
                from ...io import save

                cell_dir = Path(opts.save_dir) / f"{method.name.replace('/', '_')}@{keep:g}"
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
        from ...io import save

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
        "calibration": f"{len(calib)} x {shared.seq_len} tokens of {calib_src.description}",
        "evaluation": {label: f"{len(w)} x {opts.eval_seq_len} tokens ({len(w) * (opts.eval_seq_len - 1)} predicted) of {src.description}"
                       for label, src, w, _ in evals},
        "eval_labels": [label for label, *_ in evals],
        "generation": (f"greedy, {opts.gen_new_tokens} new tokens after {len(prompts)} prompts of {opts.gen_prompt_len} tokens "
                       f"at evenly spaced positions of the '{evals[0][0]}' evaluation text") if prompts is not None else None,
        "auto": f"{len(held)} held-out calibration windows x {shared.seq_len} tokens" if opts.auto else None,
        "stats_seconds": dict(cache.seconds),
        "statistics": "block by block (sequential)" if shared.sequential is not False else "whole model",
        "torch_threads": torch.get_num_threads(),
        "keeps": keeps,
        "columns": "byte budget (fraction of the targets' dense bytes)" if opts.in_bytes else "keep ratio",
        "methods": [m.name for m in methods],
        "rank_plot_keep": opts.rank_plot_keep if opts.rank_plot_keep is not None else min(keeps),
    }
    return BenchResult(rows=rows, meta=meta, rank_maps=rank_maps, targets=targets, best=best)
