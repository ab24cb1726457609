"""What a calibration statistic is: a registered class that owns its hook, its accumulator and its finalization.

As llm-compressor's modifiers own their hooks, each statistic declares (``@register_statistic``)
everything the collector (``collect``) needs to gather it; the collector knows no statistic by
name, so adding one is one new module::

    @register_statistic("abs_mean")
    class AbsMean(Statistic):
        kind, reads = ACTIVATION, INPUT

        def update(self, acc, x, module, scale):
            return add_abs_sum(acc, x)  # x: this batch's (tokens x in) inputs, in the product dtype

        def finalize(self, acc, tokens, name, module):
            return {"abs_mean": finite(acc / tokens, f"non-finite ... of {name}")}

- ``kind``: ``ACTIVATION`` (forward hooks only: collected in one forward pass, or block by block
  by the sequential pipeline) or ``GRADIENT`` (needs end-to-end backward passes on whole windows:
  whole-model only, on the first ``--fisher-windows`` windows).
- ``reads``: what the hook sees, one batch at a time, as ``tokens x features`` in the product
  dtype (``accumulate.product_dtype``): ``INPUT`` (a forward pre-hook on the target's input;
  targets that read the very same tensor, q/k/v or gate/up, share one accumulator), ``OUTPUT``
  (a forward hook on its output), ``OUTPUT_GRAD`` (``dL/dy`` at its output, via a tensor hook) or
  ``WEIGHT_GRAD`` (its weight's gradient after each backward, in the weight's own layout and dtype).
- ``start(target, module)`` gives the accumulator before the first batch (``None``: the first
  ``update`` creates it); ``update(acc, x, module, scale)`` returns it with one batch added
  (``scale``: ``None``, or for a gradient pass over the *mean* loss the factor that turns its
  gradients into per-token gradients of the summed loss); ``finalize(acc, tokens, name, module)``
  returns the entry keys (``keys``) a base reads. The collector adds ``"tokens"`` (input/output
  statistics) or ``"out_tokens"`` (output-gradient statistics). ``tensors(acc)`` lists the running sums that
  data-parallel runs all-reduce before ``finalize`` (default: the accumulator if it is a tensor).
- ``replaces``: the statistic it is collected instead of for a target that a base factors from
  its output side (``out_cov`` for ``gram``: ``WhitenBase.factors_from_output``).
- Gradient statistics: ``per_example`` (one window per backward pass: squared per-example
  gradients), ``summed_loss`` (gradients of the loss summed over predicted tokens, not its mean),
  ``label``/``what`` for the progress bar and the non-finite-loss message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import Any

import torch
from torch import nn

from ..registry import build, lookup, table
from ..targets import Target

ACTIVATION, GRADIENT = "activation", "gradient"
INPUT, OUTPUT, OUTPUT_GRAD, WEIGHT_GRAD = "input", "output", "output_grad", "weight_grad"
TOKENS_KEY = {INPUT: "tokens", OUTPUT: "tokens", OUTPUT_GRAD: "out_tokens"}


class Statistic:
    """Base class of a calibration statistic (module docstring)."""

    name: str = ""  # set by @register_statistic
    kind: str = ACTIVATION
    reads: str = INPUT
    keys: tuple[str, ...] = ()  # entry keys finalize writes; () means (name,)
    replaces: str | None = None
    per_example: bool = False
    summed_loss: bool = False
    label: str = "calibration"
    what: str = "calibration statistics"

    def start(self, target: Target, module: nn.Module) -> Any:
        return None

    def update(self, acc: Any, x: torch.Tensor, module: nn.Module, scale: float | None) -> Any:
        raise NotImplementedError

    def finalize(self, acc: Any, tokens: int, name: str, module: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    def tensors(self, acc: Any) -> list[torch.Tensor]:
        """The accumulator's running sums, summed over processes before ``finalize`` (data-parallel statistics)."""
        return [acc] if torch.is_tensor(acc) else []


def get_statistic(name: str, **options: Any) -> Statistic:
    """The statistic registered as ``name``, built with ``options`` (an unknown name lists the valid ones)."""
    return build("statistic", name, options)


def statistic_kind(name: str) -> str:
    return lookup("statistic", name).kind


def check_statistics(needs: Iterable[str]) -> None:
    """``ValueError`` naming every statistic in ``needs`` that nobody registered."""
    unknown = set(needs) - set(table("statistic"))
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; registered: {', '.join(sorted(table('statistic')))}")


class StatisticNames(AbstractSet):
    """A live read-only set of the registered statistics of one kind (``needs & StatisticNames(GRADIENT)``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def _names(self) -> frozenset[str]:
        return frozenset(n for n, cls in table("statistic").items() if cls.kind == self.kind)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names()))

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _from_iterable(cls, it: Iterable[str]) -> frozenset[str]:
        return frozenset(it)

    def __repr__(self) -> str:
        return f"StatisticNames({self.kind!r}: {sorted(self._names())})"


def blockwise(needs: Iterable[str]) -> bool:
    """Whether every statistic in ``needs`` is an activation statistic (collectable block by block)."""
    check_statistics(needs)
    return all(statistic_kind(n) == ACTIVATION for n in needs)


def collection_passes(needs: Iterable[str]) -> list[tuple[str, frozenset[str]]]:
    """How ``collect_stats`` gathers ``needs``: ``("act", activation statistics)`` in one forward pass,
    then ``(name, {name})`` for each gradient statistic (a backward pass each, on its own batch size)."""
    needs = set(needs)
    check_statistics(needs)
    act = frozenset(n for n in needs if statistic_kind(n) == ACTIVATION)
    return ([("act", act)] if act else []) + [(n, frozenset({n})) for n in sorted(needs - act)]


def statistics_for(
    targets: list[Target], needs: Iterable[str] | dict[str, Any], by_output: Callable[[Target], bool] | None = None,
) -> dict[str, tuple[Statistic, ...]]:
    """``{target: statistics}`` for a collector: ``needs`` built once each (``{name: options}`` or names), and for
    targets where ``by_output(target)`` each one swapped for the statistic that ``replaces`` it."""
    options = dict(needs) if isinstance(needs, dict) else {n: {} for n in needs}
    check_statistics(options)
    asked = sorted(options)
    built = {n: get_statistic(n, **(options[n] or {})) for n in asked}
    swap = {cls.replaces: n for n, cls in sorted(table("statistic").items()) if cls.replaces in built}
    out: dict[str, tuple[Statistic, ...]] = {}
    for t in targets:
        names = list(asked)
        if by_output is not None and swap and by_output(t):
            names = [swap.get(n, n) for n in names]
            for n in names:
                if n not in built:
                    built[n] = get_statistic(n)
        out[t.name] = tuple(built[n] for n in names)
    return out


__all__ = ["ACTIVATION", "GRADIENT", "INPUT", "OUTPUT", "OUTPUT_GRAD", "TOKENS_KEY", "WEIGHT_GRAD", "Statistic",
           "StatisticNames", "blockwise", "check_statistics", "collection_passes", "get_statistic", "statistic_kind",
           "statistics_for"]
