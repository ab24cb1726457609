"""Gradient statistics (end-to-end backward passes on whole windows; whole-model only).

- ``fisher`` (FWSVD, TFWSVD, the SVD-drop predictor): ``F_ij = sum over windows of (dL/dW_ij)^2``,
  one window per backward pass (per-example squared gradients), L the mean LM loss of the window or
  a task loss. Only the target weights require grad; each gradient is squared into one float32
  ``out x in`` accumulator (torch layout, Conv1D transposed) right after its backward and dropped.
  Memory: the model, one backward pass and one accumulator the size of every target weight
  (about 0.43 GB for SmolLM2-135M).
- ``out_gram`` (kfac's ``G``): ``sum_t g_t g_t^T`` with ``g = dL/dy`` at the target's output per
  token, L the loss *summed* over predicted tokens (the LM loss times the tokens, a task loss times
  the batch size), so that ``0.5 vec(dW)^T (A ⊗ G) vec(dW)`` estimates the change of the mean
  per-token loss when A and G are means. No weight gradient is computed (only activation gradients).
  Outputs wider than ``dense_max`` (default ``DENSE_OUT_MAX`` = 4096, env ``RANKLM_KFAC_DENSE_OUT_MAX``)
  keep only the diagonal ``sum_t g_t^2`` (key ``"out_sq"``): a dense G for an MLP up projection of a
  1 B model (out 8192) is 0.5 GB per target in float64. Memory: one ``out x out`` float64 per target
  (SmolLM2-135M: about 1.4 GB) plus the backward pass of one batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..options import Configurable, MethodOptions, opt
from ..registry import register_statistic
from ..targets import Conv1D, Target
from .accumulate import add_product, add_square_sum, add_sum, finite, to_running
from .statistic import GRADIENT, OUTPUT_GRAD, WEIGHT_GRAD, Statistic

DENSE_OUT_MAX: int = int(os.environ.get("RANKLM_KFAC_DENSE_OUT_MAX", "4096"))


@register_statistic("fisher")
class Fisher(Statistic):
    kind, reads, keys = GRADIENT, WEIGHT_GRAD, ("fisher",)
    per_example, label, what = True, "fisher", "Fisher statistics"

    def start(self, target: Target, module: nn.Module) -> torch.Tensor:
        # in CPU memory: on an accelerator the device holds the model and one backward pass only
        return torch.zeros_like(module.weight, dtype=torch.float32, device="cpu")

    def update(self, acc: torch.Tensor, grad: torch.Tensor, module: nn.Module, scale: float | None) -> torch.Tensor:
        return acc.add_(grad.float().square().cpu())

    def finalize(self, acc: torch.Tensor, tokens: int, name: str, module: nn.Module) -> dict[str, Any]:
        f = acc.t().contiguous() if bool(Conv1D) and isinstance(module, Conv1D) else acc
        return {"fisher": finite(f, f"non-finite Fisher statistics for {name}")}


@dataclass
class _Sum:
    dense: bool
    total: torch.Tensor | None = None


@dataclass(frozen=True)
class OutGramOptions(MethodOptions):
    dense_max: int | None = opt(None, "widest output that keeps a dense G (wider: its diagonal, out_sq); "
                                "default DENSE_OUT_MAX")


@register_statistic("out_gram")
class OutGram(Configurable, Statistic):
    kind, reads, keys = GRADIENT, OUTPUT_GRAD, ("out_gram", "out_sq")
    summed_loss, label, what = True, "kfac output gradients", "kfac output gradients"
    Options = OutGramOptions

    def start(self, target: Target, module: nn.Module) -> _Sum:
        return _Sum(target.out_features <= (DENSE_OUT_MAX if self.dense_max is None else int(self.dense_max)))

    def update(self, acc: _Sum, g: torch.Tensor, module: nn.Module, scale: float | None) -> _Sum:
        if scale is None:  # gradients of the summed loss: one product per batch, then added
            part = (g.T @ g) if acc.dense else g.square().sum(0)
            acc.total = add_sum(acc.total, to_running(part))
        else:  # gradients of the batch-mean loss (shared with Fisher's passes): per-token gradients of the sum
            g = g * scale
            acc.total = add_product(acc.total, g) if acc.dense else add_square_sum(acc.total, g)
        return acc

    def tensors(self, acc: _Sum) -> list[torch.Tensor]:
        return [acc.total] if acc.total is not None else []

    def finalize(self, acc: _Sum, tokens: int, name: str, module: nn.Module) -> dict[str, Any]:
        bad = f"non-finite kfac output-gradient statistics for {name}"
        return {"out_gram" if acc.dense else "out_sq": finite(acc.total, bad)}
