"""Bench plots: perplexity vs keep ratio per method, and rank per layer per method (PNG, Agg backend)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..budget import DENSE
from .plot import _module_type


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity_vs_keep(result: Any, output: str | os.PathLike) -> Path:
    """One line per method (log y), the dense perplexity as a dashed line; failed/infinite cells left out."""
    plt = _plt()
    labels = result.meta["eval_labels"]
    fig, ax = plt.subplots(figsize=(8, 5))
    dense = next((r for r in result.rows if r["method"] == "dense"), None)
    if dense and isinstance(dense.get("ppl"), float) and math.isfinite(dense["ppl"]):
        ax.axhline(dense["ppl"], color="black", ls="--", lw=1, label=f"dense ({dense['ppl']:.2f})")
    for method in result.meta["methods"]:
        pts = sorted(
            (r["keep"], r["ppl"]) for r in result.rows
            if r["method"] == method and r["status"] == "ok" and isinstance(r.get("ppl"), float)
            and math.isfinite(r["ppl"]) and r["ppl"] > 0
        )
        failed = [r["keep"] for r in result.rows if r["method"] == method and r["status"] != "ok"]
        label = method + (f" (failed at {', '.join(f'{k:g}' for k in failed)})" if failed else "")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        else:
            ax.plot([], [], marker="x", ls="", label=label + " (no finite result)")
    ax.set_yscale("log")
    ax.set_xlabel("keep ratio of the target matrices (requested)")
    ax.set_ylabel(f"perplexity on '{labels[0]}' (log scale)")
    ev = result.meta["evaluation"][labels[0]]
    import textwrap

    ax.set_title(f"{result.meta['model']}: perplexity vs keep ratio\n" + "\n".join(textwrap.wrap(ev, 100)), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.invert_xaxis()  # more compression to the right
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(output)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_rank_heatmap(result: Any, output: str | os.PathLike, keep: float | None = None) -> Path:
    """One heat map per method at one keep ratio: module type (rows) x block (columns), colour = rank / full rank
    (1 = dense); the rank is written in each cell when the model has few blocks."""
    import numpy as np

    plt = _plt()
    keep = keep if keep is not None else result.meta.get("rank_plot_keep")
    targets = result.targets
    methods = [m for m in result.meta["methods"] if f"{m}@{keep:g}" in result.rank_maps]
    blocks = sorted({t.block for t in targets})
    types: list[str] = []
    for t in targets:
        ty = _module_type(t.name, t.block)
        if ty not in types:
            types.append(ty)
    n = max(len(methods), 1)
    fig, axes = plt.subplots(n, 1, figsize=(max(7, 0.32 * len(blocks) + 3), 0.35 * len(types) * n + 0.9 * n + 0.6),
                             squeeze=False, constrained_layout=True)
    im = None
    for ax, method in zip(axes[:, 0], methods or [None]):
        if method is None:
            ax.text(0.5, 0.5, f"no successful cell at keep {keep:g}", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        rank_map = result.rank_maps[f"{method}@{keep:g}"]
        frac = np.full((len(types), len(blocks)), np.nan)
        ranks = np.full((len(types), len(blocks)), -1)
        for t in targets:
            r = rank_map.get(t.name)
            if r is None:
                continue
            full = min(t.out_features, t.in_features)
            k = full if r == DENSE else int(r)
            i, j = types.index(_module_type(t.name, t.block)), blocks.index(t.block)
            frac[i, j] = k / full
            ranks[i, j] = k
        im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        if len(blocks) <= 12:
            for i in range(len(types)):
                for j in range(len(blocks)):
                    if ranks[i, j] >= 0:
                        ax.text(j, i, str(ranks[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if frac[i, j] < 0.6 else "black")
        ax.set_yticks(range(len(types)))
        ax.set_yticklabels(types, fontsize=7)
        step = max(1, len(blocks) // 15)
        ax.set_xticks(range(0, len(blocks), step))
        ax.set_xticklabels([str(b) for b in blocks[::step]], fontsize=7)
        ax.set_title(f"{method} at keep {keep:g}", fontsize=9)
    axes[-1, 0].set_xlabel("block")
    if im is not None:
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="rank / full rank (1 = dense)", shrink=0.8)
    fig.suptitle(f"rank per layer, {result.meta['model']}", fontsize=10)
    out = Path(output)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
