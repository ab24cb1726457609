"""Factorize a set of targets from their statistics: the step every calibration mode ends each block with.

Its own module so that the whole-model pass (``factorize``) and the bounded, block-at-a-time pass
(``bounded``) both call it without importing each other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..budget import max_factored_rank
from ..decompose import Base, Factorization
from ..targets import Target, weight_matrix


def on_device(stats: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One target's statistics (kept in CPU memory) moved next to its weight for the factorization."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in stats.items()}


def decompose_targets(
    model: nn.Module, targets: list[Target], base: Base, stats: dict[str, dict], progress: bool = True
) -> dict[str, Factorization]:
    """Factorize every target; each target's statistics are released as soon as it is done."""
    out: dict[str, Factorization] = {}
    for t in tqdm(targets, desc=f"decompose ({base.name})", disable=not progress, unit="matrix"):
        w = weight_matrix(model.get_submodule(t.name))
        st = on_device(stats.pop(t.name, {"name": t.name}), w.device)
        out[t.name] = base.decompose(w, st, max_factored_rank(t))
    return out


__all__ = ["decompose_targets", "on_device"]
