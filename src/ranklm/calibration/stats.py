"""Streaming calibration statistics: which ones a base needs, gathered by the one collector.

Every statistic is a registered class (``@register_statistic``: ``activations`` holds ``gram``,
``abs_mean`` and ``out_cov``, ``gradients`` holds ``fisher`` and ``out_gram``/``out_sq``) that
declares its kind, hook, accumulator and finalization (``statistic``); ``collect`` places the hooks
and drives the passes. Here: the entry points that pick the passes from a base's ``needs``.

Activation statistics are streamed in float64 batch by batch (``accumulate``: float32 products,
float64 running sums, CPU memory) and no activation is kept after its batch; targets that read
the very same input tensor (q/k/v, gate/up) share one accumulator. Gradient statistics each run
their own backward passes on the first ``fisher_windows`` windows (``gradients``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..targets import Target
from .accumulate import product_dtype
from .collect import backbone, backward_pass, forward_pass, run_batches
from .statistic import (
    ACTIVATION,
    collection_passes,
    get_statistic,
    statistic_kind,
    statistics_for,
)


def collect_activations(
    model: nn.Module, targets: list[Target], windows: torch.Tensor, needs: Iterable[str], batch_size: int = 4,
    progress: bool = True, by_output: Callable[[Target], bool] | None = None,
) -> dict[str, dict[str, Any]]:
    """Activation statistics ``needs`` of every target (``{target: {..., "tokens", "name"}}``) in one forward pass;
    ``by_output(target)``: that target gets the statistics that replace them on the output side (``out_cov``)."""
    needs = set(needs)
    if any(statistic_kind(n) != ACTIVATION for n in needs):
        raise ValueError(f"not all of {sorted(needs)} are activation statistics")
    got = forward_pass(model, targets, windows, statistics_for(targets, needs, by_output), batch_size, progress)
    return {t.name: {**got.get(t.name, {}), "name": t.name} for t in targets}


def collect_stats(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    needs: frozenset[str] | set[str],
    batch_size: int = 4,
    progress: bool = True,
    fisher_windows: int | None = None,
    loss_fn=None,
    grad_batch_size: int | None = None,
) -> dict[str, dict[str, Any]]:
    """All statistics a base needs: ``{target: {<each statistic's keys>, "tokens"?, "out_tokens"?, "name"}}``.

    Activation statistics share one forward pass over all windows; each gradient statistic runs its
    backward passes on the first ``fisher_windows`` windows (one window per pass where it is ``per_example``, else
    ``grad_batch_size``, default ``batch_size``: the backward's activations grow with it).
    """
    out: dict[str, dict[str, Any]] = {t.name: {"name": t.name} for t in targets}
    for _key, names in collection_passes(needs):
        if all(statistic_kind(n) == ACTIVATION for n in names):
            got = collect_activations(model, targets, windows, names, batch_size, progress)
        else:
            (name,) = names
            stat = get_statistic(name)
            fw = windows if fisher_windows is None else windows[:fisher_windows]
            got = backward_pass(model, targets, fw, {t.name: (stat,) for t in targets}, loss_fn,
                                1 if stat.per_example else (grad_batch_size or batch_size), progress)
        for name, entry in got.items():
            out[name].update(entry)
    return out


def collect_grams(
    model: nn.Module, targets: list[Target], windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """``{target: {"gram": float64 in x in, "tokens": int, "name": target}}`` over all windows."""
    return collect_activations(model, targets, windows, {"gram"}, batch_size, progress)


def collect_activation_stats(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    gram: bool = True,
    abs_mean: bool = False,
    out_cov: frozenset[str] | set[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """The older flag form of ``collect_activations``: ``gram``/``abs_mean`` (``out_cov``: the targets given
    their output covariance instead of their Gram)."""
    by_output = {t.name for t in targets if t.name in out_cov}
    if by_output and (abs_mean or not gram):
        raise ValueError("out_cov replaces the input Gram only: not with abs_mean, and only where a Gram is asked for")
    needs = {n for n, on in (("gram", gram), ("abs_mean", abs_mean)) if on}
    return collect_activations(model, targets, windows, needs, batch_size, progress, lambda t: t.name in by_output)


__all__ = ["backbone", "collect_activation_stats", "collect_activations", "collect_grams", "collect_stats",
           "product_dtype", "run_batches"]
