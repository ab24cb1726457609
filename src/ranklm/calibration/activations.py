"""Activation statistics (forward hooks; collected in one forward pass or block by block).

- ``gram``: ``G = sum_t x_t x_t^T`` of a target's inputs, ``in x in`` float64 (whiten, kfac's ``A``).
  Memory: one such matrix per distinct input (about 1 GB for SmolLM2).
- ``abs_mean``: ``mean_t |x_t|`` per input channel (ASVD).
- ``out_cov``: ``C = sum_t y_t y_t^T`` of a target's outputs without the bias, ``out x out``; collected
  *instead of* ``gram`` for the targets a whitening base factors from the output side
  (``out <= in``, e.g. a down projection: ``C = W G W^T``, and the product costs ``out^2`` per token).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..registry import register_statistic
from .accumulate import add_abs_sum, add_product, finite
from .statistic import ACTIVATION, INPUT, OUTPUT, Statistic


def _bad(name: str, side: str) -> str:
    return f"non-finite calibration statistics (NaN/Inf activations) at the {side} of {name}"


@register_statistic("gram")
class Gram(Statistic):
    kind, reads, keys = ACTIVATION, INPUT, ("gram",)

    def update(self, acc: Any, x: torch.Tensor, module: nn.Module, scale: float | None) -> torch.Tensor:
        return add_product(acc, x)

    def finalize(self, acc: torch.Tensor, tokens: int, name: str, module: nn.Module) -> dict[str, Any]:
        return {"gram": finite(acc, _bad(name, "input"))}


@register_statistic("abs_mean")
class AbsMean(Statistic):
    kind, reads, keys = ACTIVATION, INPUT, ("abs_mean",)

    def update(self, acc: Any, x: torch.Tensor, module: nn.Module, scale: float | None) -> torch.Tensor:
        return add_abs_sum(acc, x)

    def finalize(self, acc: torch.Tensor, tokens: int, name: str, module: nn.Module) -> dict[str, Any]:
        return {"abs_mean": finite(acc / tokens, _bad(name, "input"))}


@register_statistic("out_cov")
class OutCov(Statistic):
    kind, reads, keys, replaces = ACTIVATION, OUTPUT, ("out_cov",), "gram"

    def update(self, acc: Any, y: torch.Tensor, module: nn.Module, scale: float | None) -> torch.Tensor:
        bias = getattr(module, "bias", None)
        if bias is not None:  # the covariance of W x: the bias is kept as is, so it is not part of the error
            y = y - bias.detach().to(y.dtype)
        return add_product(acc, y)

    def finalize(self, acc: torch.Tensor, tokens: int, name: str, module: nn.Module) -> dict[str, Any]:
        return {"out_cov": finite(acc, _bad(name, "output"))}
