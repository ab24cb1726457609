"""Output-gradient second moments of the target layers (the ``G`` factor of ``kfac``): the ``out_gram`` statistic.

``G = E[g g^T]`` with ``g = dL/dy`` at a target's output, one vector per token, streamed in float64
(``"out_gram"``, ``out x out``; ``"out_sq"``, its diagonal, past ``DENSE_OUT_MAX``). ``L`` is the
summed per-token LM loss (decoders; ``modules.lm_loss`` times the predicted tokens, so each g is a
per-token gradient) or a task ``train.Objective``'s loss times its batch size (encoders). See
``gradients`` for the statistic itself and its memory.

Gradients reach every target output without any weight gradient: all parameters are frozen and the
input embeddings' output is made to require grad, so backward computes activation gradients only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..targets import Target
from .collect import backward_pass
from .gradients import DENSE_OUT_MAX
from .statistic import get_statistic


def collect_output_grams(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    loss_fn: Any = None,
    batch_size: int = 4,
    progress: bool = True,
    dense_max: int | None = None,
) -> dict[str, dict[str, Any]]:
    """``{target: {"out_gram" (out x out) or "out_sq" (out), "out_tokens"}}``, sums over tokens, float64."""
    stat = get_statistic("out_gram", dense_max=dense_max)
    return backward_pass(model, targets, windows, {t.name: (stat,) for t in targets}, loss_fn, batch_size, progress)


__all__ = ["DENSE_OUT_MAX", "collect_output_grams"]
