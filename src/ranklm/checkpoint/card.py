"""The checkpoint's model card (``README.md``, as the hub expects): what was compressed, how, how well, how to load it.

Front matter through ``huggingface_hub.ModelCardData`` (``base_model``, ``library_name``, tags);
the body repeats the numbers of ``ranklm.json`` a reader looks for first, with the command that
produced the perplexity when the run recorded one.
"""

from __future__ import annotations

from typing import Any

CARD_FILE = "README.md"


def _ppl(evaluation: dict[str, Any], key: str) -> float | None:
    v = evaluation.get(key)
    return v.get("ppl") if isinstance(v, dict) else None


def _quantization_line(modules: dict[str, dict[str, Any]]) -> str | None:
    """``| weight-only quantization | int4 (groups of 64) on 14 of 14 targets |`` from config.json's
    ``quantization_config.modules``; None when nothing is quantized."""
    widths: dict[tuple[int, int], int] = {}
    for info in modules.values():
        if info.get("bits") is not None:
            key = (info["bits"], info.get("group_size"))
            widths[key] = widths.get(key, 0) + 1
    if not widths:
        return None
    parts = [f"int{b} (groups of {g}) on {n}" for (b, g), n in sorted(widths.items())]
    return f"| weight-only quantization | {', '.join(parts)} of {len(modules)} targets |"


def model_card(meta: dict[str, Any], auto_class: str, task: str | None,
               modules: dict[str, dict[str, Any]] | None = None) -> str:
    """``modules``: config.json's ``quantization_config.modules`` (their bits make the quantization line)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = meta.get("base_model") or {}
    recipe = meta.get("recipe") or {}
    base_id = base.get("name_or_path")
    data = ModelCardData(
        base_model=base_id if base_id and "/" in str(base_id) and not str(base_id).startswith("/") else None,
        library_name="transformers",
        pipeline_tag=task,
        tags=["ranklm", "low-rank", "svd", "compressed"],
    )
    params = meta.get("params") or {}
    rank_map = meta.get("rank_map") or {}
    factored = sum(1 for r in rank_map.values() if r != "dense")
    lines = [
        f"# {base_id or 'model'} compressed with ranklm ({recipe.get('name') or recipe.get('base')})",
        "",
        "Low-rank factorization with adaptive ranks: each compressed linear layer is two smaller ones "
        "(`x -> B -> A`).",
        "",
        "| | |",
        "|---|---|",
        f"| recipe | `{recipe.get('name')}` (base `{recipe.get('base')}`, allocator `{recipe.get('allocator')}`, "
        f"training `{recipe.get('training')}`) |",
        f"| keep requested / achieved (targets) | {meta.get('keep_requested')} / {meta.get('keep_achieved')} |",
        f"| keep achieved (whole model) | {meta.get('keep_achieved_model')} |",
        f"| factored targets | {factored} of {len(rank_map)} |",
    ]
    quantized = _quantization_line(modules or {})
    if quantized:
        lines.append(quantized)
    if params:
        lines.append(f"| parameters | {params.get('model_compressed', '?')} (dense {params.get('model_dense', '?')}) |")
    evaluation = meta.get("evaluation") or {}
    dense, compressed = _ppl(evaluation, "dense"), _ppl(evaluation, "compressed")
    if compressed is not None:
        windows = (evaluation.get("compressed") or {}).get("windows")
        lines.append(f"| perplexity | {compressed:.3f} (dense {dense:.3f}, {windows} windows of "
                     f"{evaluation.get('data', 'the evaluation text')}) |" if dense is not None
                     else f"| perplexity | {compressed:.3f} |")
    if meta.get("command"):
        lines += ["", "Produced (compression and the perplexity above) by:", "", "```", meta["command"], "```"]
    lines += [
        "",
        "## Load it",
        "",
        "With ranklm installed (`pip install ranklm`):",
        "",
        "```python",
        "import ranklm",
        f"from transformers import {auto_class}",
        f'model = {auto_class}.from_pretrained("PATH_OR_HUB_ID")',
        "```",
        "",
        "Without ranklm, the bundled `modeling_ranklm.py` builds the factored layers:",
        f'`{auto_class}.from_pretrained("PATH_OR_HUB_ID", trust_remote_code=True)` '
        "(also `lm_eval --model hf --model_args pretrained=PATH_OR_HUB_ID,trust_remote_code=True`). "
        "Loading without either stops with a size-mismatch error rather than giving random layers.",
        "",
        "`ranklm export --dense` writes the plain dense equivalent.",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


__all__ = ["CARD_FILE", "model_card"]
