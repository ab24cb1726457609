"""The shared tail of the learning allocators (ARS, SoftLMs, RankDyna; docs/design.md §1, §5).

Each of them trains on the one loop and then turns what it learned into a rank map the same
way; that sequence lives here once so the three cannot drift apart:

1. ``objective``: the run's objective (or the allocator's ``loss_fn``) on the calibration
   windows, built on the dense model (a distillation teacher needs it);
2. ``train``: ``run_loop`` with the context's seed, progress, state file and resume rules;
3. ``conclude``: learned ranks clamped to ``[min(min_rank, r_max), r_max]`` -> ``fit_budget``
   (single components added or dropped by the allocator's own per-component values) -> the keep
   the training reached itself (``keep_learned``) -> the allocator's artifacts / trained
   factors (``export``) -> the ``ranklm.json`` training record.

The allocator keeps only what is its own: the hooks, how learned ranks and per-component
values are read off them, and what it saves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..budget import (
    RankMap,
    fit_budget,
    max_factored_rank,
    target_cost,
    targets_dense_params,
)
from ..errors import RanklmError
from ..targets import Target
from ..train.loop import Hooks, LoopConfig, LoopResult, run_loop
from ..train.objective import Objective, as_objective
from .base import AllocationContext, training_record


def objective(loss_fn: Any, context: AllocationContext, seq_len: int | None = None) -> Objective:
    """The training objective: ``loss_fn`` or the run's, on the windows cut to ``seq_len`` tokens (None: all)."""
    windows = context.windows if seq_len is None else context.windows[:, :seq_len]
    return as_objective(loss_fn or context.objective, context.model, windows, context.batch_size)


def train(context: AllocationContext, name: str, hooks: Hooks, obj: Objective, *, steps: int, lr: float,
          batch_size: int | None, desc: str, state_file: Any = None, resume: bool = False,
          save_every: int | None = None, **loop: Any) -> LoopResult:
    """Run the hooks on the loop; with ``--state-dir`` the context's state file and save interval win."""
    if context.state_dir is not None:
        state_file, save_every = context.state_file(name), context.save_every
    cfg = LoopConfig(steps=steps, lr=lr, batch_size=batch_size or context.batch_size, seed=int(context.seed),
                     save_every=context.save_every if save_every is None else save_every, state_file=state_file,
                     resume=context.resume or resume, progress=context.progress, desc=desc, **loop)
    return run_loop(context.model, obj, hooks, cfg)


def never_scaled(t: Target) -> float:
    """Priority of a step past the learned components: below any learned one, in per-parameter units."""
    return -1e30 * (t.out_features + t.in_features)


def priority_by(values: dict[str, list[float]], never: Callable[[Target], float] = never_scaled
                ) -> Callable[[Target, int], float]:
    """``fit_budget``'s priority from per-component values (best first): value x step cost, since the fit
    divides by it; going dense or past the learned components gets ``never(t)``."""

    def priority(t: Target, j: int) -> float:
        if j >= max_factored_rank(t) or j >= len(values[t.name]):
            return never(t)
        return values[t.name][j] * (t.out_features + t.in_features)

    return priority


def start_ranks(targets: list[Target], learned: dict[str, int], min_rank: int) -> RankMap:
    """The learned ranks clamped to what can be factored and to the floor ``fit_budget`` keeps."""
    return {t.name: max(min(learned[t.name], max_factored_rank(t)), min(min_rank, max_factored_rank(t)))
            for t in targets}


def learned_keep(targets: list[Target], learned: dict[str, int], name: str) -> float:
    """The keep ratio the training reached on its own, before the exact fit."""
    keep = sum(target_cost(t, learned[t.name]) for t in targets) / targets_dense_params(targets)
    if not math.isfinite(keep):  # pragma: no cover - defensive
        raise RanklmError(f"{name} produced a non-finite keep ratio")
    return keep


def conclude(context: AllocationContext, name: str, stage: str, options: dict[str, Any], obj: Objective,
             result: LoopResult, targets: list[Target], keep: float, min_rank: int, learned: dict[str, int],
             values: dict[str, list[float]], export: Callable[[RankMap, float], None],
             never: Callable[[Target], float] = never_scaled, **record_extra: Any) -> RankMap:
    """Learned ranks -> exact budget fit -> learned keep -> ``export(rank_map, keep_learned)`` -> training record."""
    rank_map = fit_budget(targets, start_ranks(targets, learned, min_rank), keep, priority_by(values, never), min_rank)
    reached = learned_keep(targets, learned, name)
    export(rank_map, reached)
    context.training.append(training_record(name, stage, options, obj, result, keep, reached, targets, rank_map,
                                            **record_extra))
    return rank_map


__all__ = ["conclude", "learned_keep", "never_scaled", "objective", "priority_by", "start_ranks", "train"]
