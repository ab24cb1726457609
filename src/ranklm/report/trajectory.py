"""Training trajectories of any learning method, one PNG each (``ranklm plot``).

A method stores a trajectory in its checkpoint as
``meta["artifacts"][<name>]["trajectory"] = {"steps": [...], "series": {target: [...]},
"ylabel": str, "title": str}`` (RankDyna: active rank per matrix at every mask update;
SoftLMs: each threshold alpha over training). ``plot_trajectories`` draws every one it finds
into ``<out stem>-<name>.png`` next to ``out``, one line per target coloured by module type
(the part of the name after the block index); a checkpoint without trajectories gives ``[]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _kind(name: str) -> str:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i + 1 :]) or name
    return parts[-1]


def trajectories(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{artifact name: trajectory}`` for every well-formed trajectory in a ranklm.json dict."""
    out = {}
    for name, art in (meta.get("artifacts") or {}).items():
        traj = art.get("trajectory") if isinstance(art, dict) else None
        if isinstance(traj, dict) and isinstance(traj.get("series"), dict) and traj.get("steps") is not None:
            out[str(name)] = traj
    return out


def plot_trajectories(meta: dict[str, Any], out: str | os.PathLike) -> list[Path]:
    """Draw every ``artifacts[<name>]["trajectory"]`` into ``<out stem>-<name>.png``; returns the paths written."""
    found = trajectories(meta)
    if not found:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    written = []
    for name, traj in found.items():
        steps = list(traj["steps"])
        fig, ax = plt.subplots(figsize=(10, 5))
        colors: dict[str, Any] = {}
        cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
        for target, ys in traj["series"].items():
            ys = list(ys)
            kind = _kind(target)
            first = kind not in colors
            if first:
                colors[kind] = cycle[len(colors) % len(cycle)]
            n = min(len(steps), len(ys))
            ax.plot(steps[:n], ys[:n], color=colors[kind], lw=1, alpha=0.7, label=kind if first else None)
        ax.set_xlabel("training step")
        ax.set_ylabel(str(traj.get("ylabel", name)))
        ax.set_title(str(traj.get("title", name)))
        if colors:
            ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}-{name}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


__all__ = ["plot_trajectories", "trajectories"]
