"""``ranklm plot``, ``export``, ``generate`` and ``methods``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import RanklmError
from .app import app
from .common import dtype_arg, echo_err, pick_model, set_threads, torch_device
from .options import (
    device_option,
    dtype_option,
    model_argument,
    model_option,
    threads_option,
)


@app.command()
def plot(
    checkpoint: Path = typer.Argument(..., help="A ranklm checkpoint directory."),
    output: Path = typer.Option(..., "--output", "-o", help="PNG file to write."),
) -> None:
    """Draw rank per layer (and fraction kept) of a checkpoint's rank map as a PNG, plus any training trajectories.

    Trajectories recorded by learning methods (RankDyna's rank per matrix over training, ...) are
    drawn next to it as ``<output stem>-<name>.png``.
    """
    from ..io import read_metadata
    from ..report import plot_rank_map
    from ..report.trajectory import plot_trajectories

    meta = read_metadata(checkpoint)
    path = plot_rank_map(meta, output)
    typer.echo(f"wrote {path}")
    for extra in plot_trajectories(meta, output):
        typer.echo(f"wrote {extra}")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A ranklm checkpoint directory."),
    dense: Optional[Path] = typer.Option(None, "--dense", help="Write a plain Hugging Face folder here (factors multiplied back)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Write an ONNX folder here (model.onnx, factored targets as two MatMuls; checked in onnxruntime; needs ranklm[onnx])."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Export a checkpoint: as a dense Hugging Face model that loads without ranklm (--dense), or as
    an ONNX graph for onnxruntime that keeps the savings (--onnx)."""
    if dense is None and onnx is None:
        raise RanklmError("export needs --dense DIR and/or --onnx DIR")
    if dense is not None:
        from ..io import export_dense

        export_dense(checkpoint, dense, overwrite)
        typer.echo(f"wrote dense Hugging Face model to {dense}")
    if onnx is not None:
        from ..checkpoint.onnx import export_onnx

        res = export_onnx(checkpoint, onnx, overwrite)
        typer.echo(f"wrote ONNX model to {onnx} ({res['bytes'] / 2**20:.1f} MiB; onnxruntime matches the "
                   f"checkpoint to {res['max_rel_err']:.1e} relative)")


@app.command()
def generate(
    model_arg: Optional[str] = model_argument("Checkpoint or HF model folder"),
    model: Optional[str] = model_option("Checkpoint or HF model folder"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue (with --chat: the user's message)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate (prompt + new tokens must fit the model's positions)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template as a user message and generate the assistant's answer."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature", help="With --sample: softmax temperature."),
    top_p: float = typer.Option(1.0, "--top-p", help="With --sample: nucleus probability mass."),
    seed: int = typer.Option(0, "--seed", help="With --sample: random seed."),
    dtype: str = dtype_option("Run the model in this dtype (a bfloat16 checkpoint stays bfloat16 with auto)"),
    device: str = device_option("generate"),
    threads: Optional[int] = threads_option(),
) -> None:
    """Continue a prompt with a model or checkpoint, streaming the text to stdout."""
    from ..eval.generate import has_chat_template, stream_generate
    from ..models import load_model, require_tokenizer

    model = pick_model(model_arg, model)
    set_threads(threads)
    if max_new_tokens < 1:
        raise RanklmError("--max-new-tokens must be a positive integer")
    m, tok, info_ = load_model(model, dtype=dtype_arg(dtype), device=torch_device(device))
    tok = require_tokenizer(tok, str(model or "the default model"))
    if chat and not has_chat_template(tok):
        raise RanklmError(f"--chat: the tokenizer of {info_['name_or_path']} has no chat template")
    if not chat and has_chat_template(tok):
        echo_err("note: this model has a chat template; --chat applies it to the prompt")
    from ..architectures import max_positions

    stream_generate(m, tok, prompt, max_new_tokens, sample, temperature, top_p, seed, chat=chat,
                    max_positions=max_positions(m.config))


@app.command()
def methods() -> None:
    """Every base, allocator, trainer and recipe, with each option's type, default and help."""
    typer.echo(list_methods())


def _axes(axes: Any) -> list[str]:
    """A recipe's axes as names: ``("whiten", "uniform")`` or ``{"base": ..., "allocator": ..., ...}``."""
    from collections.abc import Mapping

    values = axes.values() if isinstance(axes, Mapping) else axes if isinstance(axes, (tuple, list)) else [axes]
    return [str(a) for a in values if a and a != "none"]


def list_methods() -> str:
    """Every base, allocator, trainer and recipe with its options, defaults and help."""
    from ..config import DEFAULT_RECIPE, LAYERWISE_DEFAULT_RECIPE, RECIPES
    from ..options import describe_options
    from ..registry import declared_options, table

    sections = []
    for kind, title in (("base", "Bases"), ("allocator", "Allocators"), ("trainer", "Trainers")):
        found = table(kind)
        if not found:
            continue
        flag = {"base": "--base-opt", "allocator": "--alloc-opt", "trainer": "--train-opt"}[kind]
        blocks = []
        for name, cls in sorted(found.items()):
            spec = declared_options(cls)
            blocks.append(describe_options(kind, name, spec) if spec is not None
                          else f"{kind} {name}\n    (options not declared)")
        sections.append(f"{title} (options: {flag} KEY=VALUE)\n\n" + "\n\n".join(blocks))
    width = max(len(r) for r in RECIPES)
    recipes = [f"    {name:<{width}}  = {' + '.join(_axes(axes))}" for name, axes in sorted(RECIPES.items())]
    recipes.append(f"\n    default: {DEFAULT_RECIPE} for models with an LM head; {LAYERWISE_DEFAULT_RECIPE} for encoders "
                   "(no LM loss) and with --sequential")
    sections.append("Recipes (--recipe NAME; --base/--allocator override an axis)\n\n" + "\n".join(recipes))
    return "\n\n".join(sections)
