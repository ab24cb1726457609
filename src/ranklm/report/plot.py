"""Rank-per-layer plot of any checkpoint's rank map (matplotlib, Agg backend, PNG).

Reads only ``ranklm.json``'s ``rank_map`` and ``modules`` (works for every
allocator). Top panel: the rank of each target against its block index, one
line per module type (``q_proj``, ``mlp.down_proj``, ...); a dense target is
drawn at ``min(out, in)`` with a hollow marker. Bottom panel: the fraction of
each target's parameters kept, with the requested/achieved keep ratio.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..budget import DENSE, kept_fraction
from ..errors import RanklmError


def _module_type(name: str, block: int) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (the part after the block index)."""
    parts = name.split(".")
    if str(block) in parts:
        i = parts.index(str(block))
        return ".".join(parts[i + 1 :]) or name
    return parts[-1]


def rank_series(meta: dict[str, Any]) -> dict[str, list[tuple[int, int, float, bool]]]:
    """``{module type: [(block, rank, kept fraction, dense?), ...]}`` from a ranklm.json dict."""
    out: dict[str, list[tuple[int, int, float, bool]]] = defaultdict(list)
    for i, (name, rank) in enumerate(meta["rank_map"].items()):
        mod = meta["modules"].get(name)
        if mod is None:
            raise RanklmError(f"ranklm.json has no shape for {name}")
        m, n = int(mod["out"]), int(mod["in"])
        block = int(mod.get("block", -1))
        block = i if block < 0 else block
        dense = rank == DENSE
        r = min(m, n) if dense else int(rank)
        kept = kept_fraction(m, n, rank)
        out[_module_type(name, block)].append((block, r, kept, dense))
    return dict(out)


def plot_rank_map(meta: dict[str, Any], output: str | os.PathLike, title: str | None = None) -> Path:
    """Write the rank-per-layer PNG for a checkpoint's metadata; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = rank_series(meta)
    if not series:
        raise RanklmError("the rank map is empty: nothing to plot")
    fig, (ax_r, ax_k) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for kind, pts in series.items():
        pts = sorted(pts)
        xs = [p[0] for p in pts]
        (line,) = ax_r.plot(xs, [p[1] for p in pts], marker="o", ms=3, label=kind)
        dense_pts = [p for p in pts if p[3]]
        if dense_pts:
            ax_r.scatter([p[0] for p in dense_pts], [p[1] for p in dense_pts], facecolors="none",
                         edgecolors=line.get_color(), s=40)
        ax_k.plot(xs, [p[2] for p in pts], marker="o", ms=3, color=line.get_color())
    recipe = meta.get("recipe", {})
    name = title or f"{recipe.get('name', '')} (base {recipe.get('base')}, allocator {recipe.get('allocator')})"
    ax_r.set_title(name)
    ax_r.set_ylabel("rank (hollow = dense)")
    ax_r.legend(fontsize=7, ncol=2)
    ax_r.grid(alpha=0.3)
    keep_req, keep_ach = meta.get("keep_requested"), meta.get("keep_achieved")
    if isinstance(keep_req, (int, float)):
        ax_k.axhline(keep_req, color="gray", ls="--", lw=1,
                     label=f"keep requested {keep_req:.3f}" + (f", achieved {keep_ach:.4f}" if isinstance(keep_ach, (int, float)) else ""))
        ax_k.legend(fontsize=7)
    ax_k.set_ylabel("fraction of parameters kept")
    ax_k.set_xlabel("block")
    ax_k.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
