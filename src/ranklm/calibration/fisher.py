"""Per-element Fisher information of the target weights (FWSVD, TFWSVD, SVD-drop predictor), and one pass for all.

``F_ij = sum over calibration windows of (dL/dW_ij)^2`` (the ``fisher`` statistic, ``gradients``),
with L the LM loss of one window (decoders) or a caller-given task loss (encoders). The loss may
also be a ``train.Objective`` (a task: input ids, attention mask, labels): Fisher is then summed over
its first ``len(windows)`` examples, one example per backward pass (per-example squared gradients,
as FWSVD/TFWSVD compute them on the task-tuned encoder), and the windows only say how many.

``collect_curvature`` runs the same passes and, from their forwards and backwards, also streams
what the activation and Kronecker bases read, with the same statistics and keys: ``"gram"`` and
``"abs_mean"`` (targets reading the same tensor share one Gram) and ``"out_gram"`` (``"out_sq"``
past ``gradients.DENSE_OUT_MAX``) of per-token gradients of the summed loss (the batch-mean loss's
gradient times the predicted tokens, or times the batch size for a task objective). One set of
passes instead of three: ``ranklm info --diagnose`` compares every base on the same windows.
Memory on top of Fisher's: one ``in x in`` and one ``out x out`` float64 per target (SmolLM2: ~2 GB).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..modules import lm_loss
from ..targets import Target
from .collect import backward_pass
from .statistic import get_statistic

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def collect_fisher(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    loss_fn: LossFn | Any | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """``{target: F}`` with F float32 ``out x in`` (torch layout, Conv1D transposed)."""
    return collect_curvature(model, targets, windows, loss_fn, batch_size, progress, grams=False)[0]


def collect_curvature(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    loss_fn: LossFn | Any | None = None,
    batch_size: int = 1,
    progress: bool = True,
    grams: bool = True,
    dense_out_max: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """``(fisher, stats)``: Fisher as ``collect_fisher``; with ``grams``, ``stats[target]`` holds ``"gram"``,
    ``"abs_mean"``, ``"tokens"``, ``"out_gram"`` or ``"out_sq"``, ``"out_tokens"`` and ``"name"`` from the same
    passes (module docstring), ready for any base's ``decompose``; without, ``stats`` is empty."""
    wanted = (get_statistic("fisher"),)
    if grams:
        wanted += (get_statistic("gram"), get_statistic("abs_mean"), get_statistic("out_gram", dense_max=dense_out_max))
    got = backward_pass(model, targets, windows, {t.name: wanted for t in targets}, loss_fn, batch_size, progress,
                        desc="fisher", what="Fisher statistics")
    fisher = {name: entry.pop("fisher") for name, entry in got.items()}
    stats = {t.name: {"name": t.name, **got[t.name]} for t in targets} if grams else {}
    return fisher, stats


__all__ = ["collect_curvature", "collect_fisher", "lm_loss"]
