"""``ranklm info``: a checkpoint's recipe, ratios and rank map; ``--diagnose`` ranks the bases on a model."""

from __future__ import annotations

import json
from typing import Optional

import typer

from ..errors import RanklmError
from .app import app
from .common import fmt_ppl, is_encoder, label2id, pick_model
from .options import model_option


@app.command()
def info(
    checkpoint: Optional[str] = typer.Argument(None, help="A ranklm checkpoint (or, with --diagnose, a model; or give it as --model).", show_default="packaged model with --diagnose", metavar="[MODEL]"),
    model: Optional[str] = model_option("A ranklm checkpoint (or, with --diagnose, a model)", "packaged model with --diagnose"),
    as_json: bool = typer.Option(False, "--json", help="Print ranklm.json's summary and rank map as JSON."),
    diagnose_: bool = typer.Option(False, "--diagnose", help="Predict per layer and overall which base decomposition loses least, and whether plain SVD will hurt badly."),
    data: Optional[str] = typer.Option(None, "--data", help="With --diagnose: calibration text (encoders: a task).", show_default="packaged corpus"),
    keep: float = typer.Option(0.6, "--keep", help="With --diagnose: keep ratio at which to compare the bases."),
    windows: int = typer.Option(8, "--windows", help="With --diagnose: Fisher windows."),
    seq_len: int = typer.Option(256, "--seq-len", help="With --diagnose: tokens per window."),
) -> None:
    """Recipe, keep ratios and the rank map of a checkpoint; or --diagnose a model.

    The checkpoint is validated as ``ranklm.load``/``evaluate`` validate it (ranklm.json, file
    hashes, rank map against the model's structure) before anything is printed.
    """
    from ..budget import kept_fraction
    from ..io import check_checkpoint

    checkpoint = pick_model(checkpoint, model)
    if diagnose_:
        diagnose_model(checkpoint, data, keep, windows, seq_len, as_json)
        return
    if checkpoint is None:
        raise RanklmError("give a checkpoint directory (or --diagnose MODEL)")
    meta = check_checkpoint(checkpoint)
    if as_json:
        typer.echo(json.dumps(meta, indent=2))
        return

    def ratio(key: str) -> str:
        return "n/a" if meta.get(key) is None else f"{meta[key]:.4f}"

    r = meta.get("recipe") or {}
    typer.echo(f"checkpoint   {checkpoint}")
    typer.echo(f"base model   {(meta.get('base_model') or {}).get('name_or_path')}")
    typer.echo(f"method       {r.get('name')} (base {r.get('base')}, allocator {r.get('allocator')}, seed {r.get('seed')})")
    typer.echo(
        f"keep         targets: requested {ratio('keep_requested')}, achieved {ratio('keep_achieved')}; "
        f"whole model: {ratio('keep_achieved_model')}"
    )
    cal = meta.get("calibration") or {}
    if cal:
        typer.echo(f"calibration  {cal.get('windows')} x {cal.get('seq_len')} tokens from {cal.get('source')}")
    ev = meta.get("evaluation") or {}
    if "dense" in ev:
        typer.echo(f"perplexity   dense {fmt_ppl(ev['dense']['ppl'])} -> compressed {fmt_ppl(ev['compressed']['ppl'])}")
    typer.echo("")
    typer.echo(f"{'module':<48} {'shape':>12} {'rank':>6} {'kept':>7}")
    for name, rank in meta["rank_map"].items():
        mod = meta["modules"][name]
        m, n = mod["out"], mod["in"]
        kept = kept_fraction(m, n, rank)
        typer.echo(f"{name:<48} {f'{m}x{n}':>12} {str(rank):>6} {kept:>7.3f}")


def diagnose_model(model: Optional[str], data: Optional[str], keep: float, windows: int, seq_len: int, as_json: bool) -> None:
    from ..calibration import default_corpus, read_text_source, token_windows
    from ..calibration.fisher import collect_curvature
    from ..config import resolve_keep
    from ..diagnose import diagnose
    from ..models import load_model, require_tokenizer
    from ..targets import find_targets

    keep = resolve_keep(keep, None)
    # One forward/backward per window collects everything every base needs (Fisher, input Gram, |x|,
    # output-gradient Gram), so the bases are compared on the same windows.
    if is_encoder(model):
        # Encoders: Fisher of the task loss (the FWSVD/TFWSVD papers' setting); --data names the task
        # (rotten-tomatoes or a text,label file); as many examples as the decoder default's tokens.
        from ..models import load_classifier
        from ..tasks import load_task
        from ..train.task import DEFAULT_MAX_LENGTH, task_objective

        task = load_task(data)
        m, tok, info_ = load_classifier(model, task.label_names)
        tok = require_tokenizer(tok, str(model or "the default encoder"))
        objective = task_objective(task, tok, DEFAULT_MAX_LENGTH, "train", label2id(m))
        n = max(1, min(len(objective), windows * seq_len // DEFAULT_MAX_LENGTH))
        targets = find_targets(m)
        fisher, stats = collect_curvature(m, targets, objective.examples["input_ids"][:n], loss_fn=objective)
        what = f"{n} {task.name} train examples, task loss"
    else:
        m, tok, info_ = load_model(model)
        tok = require_tokenizer(tok, str(model or "the default model"))
        src = default_corpus()[0] if data is None else read_text_source(data)
        ids = token_windows(tok, src, seq_len, windows, seed=0)
        targets = find_targets(m)
        fisher, stats = collect_curvature(m, targets, ids)
        what = f"{len(ids)} x {seq_len} tokens, LM loss"
    report = diagnose(m, targets, fisher, keep, stats)
    report["fisher_data"] = what
    if as_json:
        typer.echo(json.dumps(report))
        return
    bases = report["bases"]
    typer.echo(f"Diagnosis of {info_['name_or_path']} at keep {keep} ({what}; Fisher and both Grams from the same passes)")
    typer.echo("estimated loss increase of each base's truncation at the uniform rank, 1/2 tr(G dW A dW^T) in nats/token:")
    typer.echo(f"{'module':<48} {'cv_rows':>8} {'cv_cols':>8} {'svd/fwsvd':>10}" + "".join(f" {b:>10}" for b in bases))
    for name, sc in report["targets"].items():
        typer.echo(f"{name:<48} {sc['cv_rows']:>8.2f} {sc['cv_cols']:>8.2f} {sc['fisher_error_ratio']:>10.2f}"
                   + "".join(f" {sc['loss'][b]:>10.3g}" for b in bases))
    o = report["overall"]
    typer.echo(f"{'overall (parameter-weighted; losses summed)':<48} {o['cv_rows']:>8.2f} {o['cv_cols']:>8.2f} "
               f"{o['fisher_error_ratio']:>10.2f}" + "".join(f" {o['loss'][b]:>10.3g}" for b in bases))
    typer.echo(f"recommendation: {report['recommendation']}")
    typer.echo(f"svd vs fwsvd: {report['svd_drop']}")
