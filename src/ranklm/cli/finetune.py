"""``ranklm finetune``: fine-tune an encoder on a classification task while compressing it."""

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
    echo_err,
    given,
    parse_options,
    pick_model,
    set_threads,
)
from .options import model_argument, model_option, threads_option


@app.command()
def finetune(
    ctx: typer.Context,
    task: str = typer.Option("rotten-tomatoes", "--task", help="rotten-tomatoes or convention-party (packaged) or a CSV/JSONL file with text,label (optional group) columns."),
    model_arg: Optional[str] = model_argument("Encoder folder (any AutoModelForSequenceClassification)"),
    model: Optional[str] = model_option("Encoder folder (any AutoModelForSequenceClassification)", "packaged all-MiniLM-L6-v2"),
    keep: float = typer.Option(0.6, "--keep", help="Fraction of the targets' parameters to keep, in (0, 1]; 1 = dense fine-tuning."),
    remove: Optional[float] = typer.Option(None, "--remove", help="Fraction to remove (= 1 - keep)."),
    allocator: str = typer.Option("rankdyna", "--allocator", help="rankdyna (ranks move while fine-tuning), static (dense fine-tune, truncate, fine-tune), ars, softlm, or any allocator."),
    base: str = typer.Option("svd", "--base", help="Base decomposition: svd, fwsvd, tfwsvd, whiten, asvd (Fisher bases use the task loss)."),
    steps: int = typer.Option(200, "--steps", help="Total training steps (every method spends the same number)."),
    lr: float = typer.Option(1e-4, "--lr", help="Adam learning rate."),
    head_steps: int = typer.Option(50, "--head-steps", help="Steps training the new classification head alone (encoder frozen) before any method's --steps (LP-FT); 0 = off."),
    head_lr: float = typer.Option(1e-3, "--head-lr", help="Adam learning rate of the head warm-up."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="constant, linear or cosine for the dense stage, RankDyna's round and the fine-tuning after truncation (equal terms for all methods); default: each stage's own (RankDyna's round linear, the others constant)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples per step (the global batch, split over processes)."),
    max_length: int = typer.Option(64, "--max-length", help="Tokens per example (longer ones are truncated; snippets are <= 53 words)."),
    calib_windows: int = typer.Option(64, "--calib-windows", help="Windows of train-split text for activation statistics (whiten, asvd)."),
    fisher_examples: int = typer.Option(64, "--fisher-examples", help="Train examples whose task-loss gradients make the Fisher statistics (fwsvd, tfwsvd)."),
    base_opt: list[str] = typer.Option([], "--base-opt", help="Base option KEY=VALUE; repeatable."),
    alloc_opt: list[str] = typer.Option([], "--alloc-opt", help="Allocator option KEY=VALUE (see `ranklm methods`); repeatable."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Save resumable training state here every --save-every steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run whose state is in --state-dir (same command otherwise)."),
    save_every: int = typer.Option(25, "--save-every", help="Training steps between state saves with --state-dir."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Checkpoint directory to write (atomically; main process only)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
    seed: int = typer.Option(0, "--seed", help="Seed for the head's initialisation, batches and anything random."),
    threads: Optional[int] = threads_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary object as the last line on stdout."),
) -> None:
    """Fine-tune an encoder on a classification task while compressing it (docs/design.md §5); runs data-parallel under torchrun."""
    from ..config import resolve_keep
    from ..io import check_output_dir, save
    from ..models import load_classifier, require_tokenizer
    from ..tasks import load_task
    from ..train.loop import process_state
    from ..apps.finetune import TaskRunConfig, finetune_task

    model = pick_model(model_arg, model)
    keep_given = given(ctx, "keep", keep)
    ratio = resolve_keep(keep if keep_given is None and remove is None else keep_given, remove)
    if resume and state_dir is None:
        raise RanklmError("--resume needs --state-dir (the folder the interrupted run saved its state in)")
    set_threads(threads)
    cfg = TaskRunConfig(keep=ratio, allocator=allocator, base=base, steps=steps, lr=lr, head_steps=head_steps, head_lr=head_lr,
                        batch_size=batch_size,
                        max_length=max_length, seed=seed, calib_windows=calib_windows, fisher_examples=fisher_examples,
                        save_every=save_every, lr_schedule=lr_schedule, base_options=parse_options(base_opt, "--base-opt"),
                        allocator_options=parse_options(alloc_opt, "--alloc-opt"))
    from ..config import CompressConfig
    from ..apps.finetune import plan_steps

    if ratio < 1:  # unknown base/allocator/options: one error line before any long work
        CompressConfig(keep=ratio, recipe=None, base=base, allocator=allocator, base_options=cfg.base_options,
                       allocator_options=plan_steps(cfg)["allocator_options"]).validate_options(from_cli=True)
    if output is not None:
        check_output_dir(output, overwrite)
    data = load_task(task)
    state = process_state()
    if batch_size < state.num_processes:
        raise RanklmError(f"--batch-size {batch_size} is smaller than the {state.num_processes} processes")
    t0 = time.perf_counter()
    m, tok, info_ = load_classifier(model, data.label_names, seed=seed)
    if getattr(m, "ranklm", None) is not None:
        raise RanklmError(f"{model} is already a ranklm checkpoint: finetune starts from a dense encoder")
    tok = require_tokenizer(tok, str(model or "the default encoder"))
    check_positions(m, {"--max-length": max_length})
    if state.is_main_process:
        echo_err(f"loaded {info_['name_or_path']} ({sum(p.numel() for p in m.parameters()):,} params) in {time.perf_counter() - t0:.1f}s; "
                  f"task {data.name}: " + ", ".join(f"{k} {v}" for k, v in data.sizes.items()) + f"; {state.num_processes} process(es)")
    summary = finetune_task(m, tok, data, cfg, state_dir=state_dir, resume=resume, progress=state.is_main_process,
                            model_info=info_)
    if not state.is_main_process:
        return
    if output is not None:
        save(m, tok, output, overwrite=overwrite)
    summary["output"] = str(output) if output else None
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(f"method            {summary['method']} on {data.name} ({summary['world_size']} process(es))")
    typer.echo(f"keep (targets)    requested {summary['keep_requested']:.4f}, achieved {summary['keep_achieved']:.4f}"
               + (f" (learned {summary['keep_learned']:.4f})" if "keep_learned" in summary else ""))
    typer.echo(f"keep (whole model) {summary['keep_achieved_model']:.4f}")
    typer.echo(f"test              accuracy {summary['accuracy']:.4f}, macro-F1 {summary['macro_f1']:.4f} "
               f"({summary['test_examples']} examples); validation accuracy {summary['validation_accuracy']:.4f}")
    typer.echo(f"training          {summary['steps']} steps in {summary['train_seconds']:.1f}s")
    typer.echo(f"saved             {output}" if output else "saved             (no --output given: nothing written)")
