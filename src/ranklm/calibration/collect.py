"""The one collector: hooks placed from the statistics' declarations, a forward or a backward driver, finalization.

It knows no statistic by name (``statistic``): each target gets the statistics a caller asks for
(``statistic.statistics_for``), and each statistic's ``reads`` says where its hook goes. Targets
whose ``INPUT`` statistics read the very same tensor (q/k/v, gate/up) share one accumulator per
statistic: the first batch detects the sharing (same storage, shape and contents) and later
batches compute it once. Nothing but the accumulators outlives a batch.

``forward_pass`` streams activation statistics under ``no_grad`` through the backbone (no vocab
logits). ``backward_pass`` runs the loss on whole windows (the LM loss, a ``loss_fn(model, ids)``
or a task ``train.Objective``, whose first ``len(windows)`` examples it uses) with only the
weights that ``WEIGHT_GRAD`` statistics read requiring grad (none: the input embeddings' output is
made to require grad so that activation gradients still flow); any statistic may ride along.

Under ``torch.distributed`` (torchrun, accelerate launch) each process runs its contiguous share of the
batches and ``finalize`` all-reduces the running sums and token counts first (``distributed``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import RanklmError
from ..modules import lm_loss, training_only
from ..targets import Target
from .accumulate import product_dtype
from .distributed import all_reduce_counts, all_reduce_sum, shard, world
from .statistic import (
    ACTIVATION,
    GRADIENT,
    INPUT,
    OUTPUT,
    OUTPUT_GRAD,
    TOKENS_KEY,
    WEIGHT_GRAD,
    Statistic,
)

SIDES = (INPUT, OUTPUT, OUTPUT_GRAD, WEIGHT_GRAD)


def backbone(model: nn.Module) -> nn.Module:
    """The model without its LM/classifier head, so calibration does not pay for vocab logits."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else model


@torch.no_grad()
def run_batches(model: nn.Module, windows: torch.Tensor, batch_size: int, desc: str, progress: bool = True) -> None:
    body = backbone(model)
    device = next(model.parameters()).device
    extra = {"use_cache": False} if hasattr(getattr(body, "config", None), "use_cache") else {}
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="batch"):
        body(input_ids=windows[i : i + batch_size].to(device), **extra)


def is_objective(loss_fn: Any) -> bool:
    """A ``train.Objective`` (told apart by shape, so calibration needs no import of train/)."""
    return loss_fn is not None and hasattr(loss_fn, "examples") and hasattr(loss_fn, "loss")


class Collector:
    """Accumulators and hooks for ``{target: statistics}`` on one model."""

    def __init__(self, model: nn.Module, targets: list[Target], wanted: dict[str, tuple[Statistic, ...]]) -> None:
        self.model = model
        self.targets = [t for t in targets if wanted.get(t.name)]
        self.modules = {t.name: model.get_submodule(t.name) for t in self.targets}
        self.sides = {t.name: {side: tuple(s for s in wanted[t.name] if s.reads == side) for side in SIDES}
                      for t in self.targets}
        self.acc: dict[tuple[str, str], Any] = {}
        for t in self.targets:
            for s in wanted[t.name]:
                self.acc[(t.name, s.name)] = s.start(t, self.modules[t.name])
        self.tokens: dict[tuple[str, str], int] = {}
        self.alias: dict[str, str] = {}  # target -> target whose identical input it shares
        self.fingerprints: dict[tuple, str] = {}
        self.first = True  # the batch that detects shared inputs
        self.scale: float | None = None  # backward passes over the mean loss: tokens (or examples) of the batch

    def wants(self, side: str) -> list[str]:
        return [n for n, sides in self.sides.items() if sides[side]]

    def _update(self, name: str, side: str, x: torch.Tensor, module: nn.Module, convert: bool = True) -> None:
        xp = x.to(product_dtype(x.dtype)) if convert else x
        for s in self.sides[name][side]:
            self.acc[(name, s.name)] = s.update(self.acc[(name, s.name)], xp, module, self.scale)
        self.tokens[(name, side)] = self.tokens.get((name, side), 0) + (x.shape[0] if convert else 1)

    def _input_hook(self, name: str):
        stats = self.sides[name][INPUT]

        def hook(module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            if name in self.alias:
                return
            x = args[0] if args else next(iter(kwargs.values()))  # type: ignore[union-attr]
            x = x.detach().reshape(-1, x.shape[-1])
            if self.first:
                key = (tuple(s.name for s in stats), x.data_ptr(), tuple(x.shape), float(x.sum()), float((x * x).sum()))
                if key in self.fingerprints:
                    self.alias[name] = self.fingerprints[key]
                    for s in stats:
                        self.acc.pop((name, s.name), None)
                    return
                self.fingerprints[key] = name
            self._update(name, INPUT, x, module)

        return hook

    def _output_hook(self, name: str):
        def on_grad(g: torch.Tensor) -> None:
            self._update(name, OUTPUT_GRAD, g.detach().reshape(-1, g.shape[-1]), module_)

        module_ = self.modules[name]

        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            y = out[0] if isinstance(out, (tuple, list)) else out
            if self.sides[name][OUTPUT]:
                self._update(name, OUTPUT, y.detach().reshape(-1, y.shape[-1]), module)
            if self.sides[name][OUTPUT_GRAD] and torch.is_tensor(y) and y.requires_grad:
                y.register_hook(on_grad)

        return hook

    def attach(self) -> list:
        handles = []
        for name, module in self.modules.items():
            if self.sides[name][INPUT]:
                handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            if self.sides[name][OUTPUT] or self.sides[name][OUTPUT_GRAD]:
                handles.append(module.register_forward_hook(self._output_hook(name)))
        return handles

    def weights(self) -> list[nn.Parameter]:
        return [self.modules[n].weight for n in self.wants(WEIGHT_GRAD)]

    def after_backward(self) -> None:
        """Hand every read weight gradient to its statistics, then drop it."""
        self.first = False
        for name in self.wants(WEIGHT_GRAD):
            w = self.modules[name].weight
            if w.grad is not None:
                self._update(name, WEIGHT_GRAD, w.grad, self.modules[name], convert=False)
                w.grad = None

    def reduce(self) -> None:
        """Sum every running sum and token count over the processes of a data-parallel run (``distributed``)."""
        if world()[1] == 1:
            return
        stats = {(t.name, s.name): s for t in self.targets for side in SIDES for s in self.sides[t.name][side]}
        keys = sorted(self.acc)
        if any(self.acc[k] is None for k in keys):
            raise RanklmError("a process saw no calibration batch: give more windows or fewer processes")
        all_reduce_sum([x for k in keys for x in stats[k].tensors(self.acc[k])])
        self.tokens = all_reduce_counts(self.tokens)

    def finalize(self) -> dict[str, dict[str, Any]]:
        """``{target: entry}``: every statistic's keys, plus ``"tokens"``/``"out_tokens"``."""
        self.reduce()
        out: dict[str, dict[str, Any]] = {}
        for t in self.targets:
            name, entry = t.name, {}
            for side in SIDES:
                if not self.sides[name][side]:
                    continue
                src = self.alias.get(name, name) if side == INPUT else name
                tokens = self.tokens.get((src, side), 0)
                if not tokens and side == OUTPUT_GRAD:
                    raise RanklmError(f"no gradient reached the output of {name}: it does not affect the loss")
                if not tokens and side != WEIGHT_GRAD:
                    raise RanklmError(f"no calibration batch reached the {side} of {name}")
                if side in TOKENS_KEY:
                    entry[TOKENS_KEY[side]] = tokens
                for s in self.sides[name][side]:
                    entry.update(s.finalize(self.acc[(src, s.name)], tokens, name, self.modules[name]))
            out[name] = entry
        return out


def _kinds(wanted: dict[str, tuple[Statistic, ...]]) -> set[str]:
    return {s.kind for stats in wanted.values() for s in stats}


@torch.no_grad()
def forward_pass(
    model: nn.Module, targets: list[Target], windows: torch.Tensor, wanted: dict[str, tuple[Statistic, ...]],
    batch_size: int = 4, progress: bool = True, desc: str = "calibration",
) -> dict[str, dict[str, Any]]:
    """Activation statistics of every target over all windows, in one streamed forward pass."""
    if _kinds(wanted) - {ACTIVATION}:
        raise ValueError("a forward pass collects activation statistics only (gradient ones need backward_pass)")
    col = Collector(model, targets, wanted)
    handles = col.attach()
    try:
        for i in tqdm(shard(len(windows), batch_size), desc=desc, disable=not progress, unit="batch"):
            run_batches(model, windows[i : i + batch_size], batch_size, "", progress=False)
            col.first = False
    finally:
        for h in handles:
            h.remove()
    return col.finalize()


def _needs_grad(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.requires_grad_(True) if not out.requires_grad else out


def backward_pass(
    model: nn.Module, targets: list[Target], windows: torch.Tensor, wanted: dict[str, tuple[Statistic, ...]],
    loss_fn: Any = None, batch_size: int = 1, progress: bool = True, desc: str | None = None, what: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Statistics of every target from forward and backward passes of the loss (module docstring).

    If every gradient statistic wants the summed loss (``summed_loss``), the loss is the batch loss times its
    predicted tokens (or examples, for an objective); otherwise it is the batch loss and ``Collector.scale``
    carries that factor to the statistics that want it.
    """
    grads = [s for stats in wanted.values() for s in stats if s.kind == GRADIENT]
    summed = bool(grads) and all(s.summed_loss for s in grads)
    desc = desc or (grads[0].label if grads else "calibration")
    what = what or (grads[0].what if grads else "calibration statistics")
    objective = loss_fn if is_objective(loss_fn) else None
    fn = loss_fn or lm_loss
    total = min(len(windows), len(objective)) if objective is not None else len(windows)
    col = Collector(model, targets, wanted)
    params = col.weights()
    handles = col.attach()
    if not params and col.wants(OUTPUT_GRAD):
        handles.append(model.get_input_embeddings().register_forward_hook(_needs_grad))
    device = next(model.parameters()).device
    try:
        with training_only(model, params):
            for i in tqdm(shard(total, batch_size), desc=desc, disable=not progress, unit="batch"):
                j = min(i + batch_size, total)
                if objective is not None:
                    n = j - i
                    loss = objective.loss(model, {k: v[i:j] for k, v in objective.examples.items()})
                else:
                    ids = windows[i:j].to(device)
                    n = ids.shape[0] * (ids.shape[1] - 1)
                    loss = fn(model, ids)
                if summed:
                    loss, col.scale = loss * n, None
                else:
                    col.scale = float(n)
                if not torch.isfinite(loss):
                    raise RanklmError(f"non-finite loss while collecting {what} (NaN/Inf in the model?)")
                loss.backward()
                col.after_backward()
    finally:
        for h in handles:
            h.remove()
    return col.finalize()


__all__ = ["Collector", "backbone", "backward_pass", "forward_pass", "is_objective", "run_batches"]
