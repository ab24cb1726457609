"""Parameter costs, keep ratios and exact budget fitting (docs/design.md §2).

Cost of an ``m x n`` target at rank k is ``k*(m+n)``; factoring pays only while
that is below ``m*n``, so the largest useful rank is ``(m*n - 1) // (m+n)``;
one step past it the target stays dense (cost ``m*n``). A rank map value is an
``int`` (factored) or ``"dense"``.

``fit_budget`` is the one greedy every allocator uses to land exactly on the
budget: it removes the lowest-priority components while over budget, then adds
the highest-priority ones that still fit, so the achieved ratio is <= the keep
ratio and short of it by less than one rank step.
"""

from __future__ import annotations

import heapq
from typing import Callable, Union

from torch import nn

from .targets import Target

Rank = Union[int, str]  # int or "dense"
RankMap = dict[str, Rank]
DENSE = "dense"
TOLERANCE = 0.005  # achieved keep ratio must be within 0.5 % (relative) below the request


def max_factored_rank(t: Target) -> int:
    """Largest k with k*(m+n) < m*n."""
    return (t.out_features * t.in_features - 1) // (t.out_features + t.in_features)


def target_cost(t: Target, rank: Rank) -> int:
    if rank == DENSE:
        return t.dense_params
    k = int(rank)
    if k > max_factored_rank(t):
        return t.dense_params
    return k * (t.out_features + t.in_features)


def kept_fraction(out_features: int, in_features: int, rank: Rank) -> float:
    """Fraction of an ``out x in`` matrix's parameters that ``rank`` keeps (1.0 for dense), for
    reports that have only a checkpoint's shapes (``ranklm.json`` ``modules``), not Targets."""
    dense = out_features * in_features
    return 1.0 if rank == DENSE else min(int(rank) * (out_features + in_features), dense) / dense


def normalize_rank(t: Target, rank: Rank) -> Rank:
    """Ranks at or past the break-even point are recorded as dense."""
    if rank == DENSE or int(rank) > max_factored_rank(t):
        return DENSE
    return int(rank)


def targets_dense_params(targets: list[Target]) -> int:
    return sum(t.dense_params for t in targets)


def targets_cost(targets: list[Target], rank_map: RankMap) -> int:
    return sum(target_cost(t, rank_map[t.name]) for t in targets)


def keep_ratio(targets: list[Target], rank_map: RankMap) -> float:
    """Achieved keep ratio over the targets: cost after / dense params of the targets."""
    return targets_cost(targets, rank_map) / targets_dense_params(targets)


def meets_budget(achieved: float, keep: float) -> bool:
    """DESIGN's exactness rule: at most the requested ratio, at most TOLERANCE (relative) below it."""
    return keep * (1 - TOLERANCE) <= achieved <= keep + 1e-12


def model_params(model: nn.Module) -> int:
    """Unique parameters of a model (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_keep_ratio(total_dense_model: int, targets: list[Target], rank_map: RankMap) -> float:
    """Whole-model ratio: all parameters (embeddings included) after / before."""
    saved = targets_dense_params(targets) - targets_cost(targets, rank_map)
    return (total_dense_model - saved) / total_dense_model


def budget_params(targets: list[Target], keep: float) -> int:
    return int(keep * targets_dense_params(targets))


# priority(target, k) scores the step that adds component index k (0-based);
# k == max_factored_rank(target) means the step to dense (all remaining components).
Priority = Callable[[Target, int], float]


def _step_cost(t: Target, k: int) -> int:
    kmax = max_factored_rank(t)
    if k >= kmax:
        return t.dense_params - kmax * (t.out_features + t.in_features)
    return t.out_features + t.in_features


def _as_int(t: Target, rank: Rank) -> int:
    return max_factored_rank(t) + 1 if rank == DENSE else int(rank)


def fit_budget(
    targets: list[Target], rank_map: RankMap, keep: float, priority: Priority, min_rank: int = 1
) -> RankMap:
    """Shrink then grow ``rank_map`` greedily by ``priority`` per parameter until it meets the budget.

    Raises ``ValueError`` if even ``min_rank`` everywhere exceeds the budget.
    """
    budget = budget_params(targets, keep)
    ranks = {t.name: _as_int(t, rank_map[t.name]) for t in targets}
    by_name = {t.name: t for t in targets}
    floor = {t.name: min(min_rank, max_factored_rank(t)) for t in targets}
    cost = sum(target_cost(t, ranks[t.name]) for t in targets)

    def removal_key(t: Target) -> float:
        k = ranks[t.name] - 1  # index of the last kept step
        return priority(t, k) / max(_step_cost(t, k), 1)

    # Shrink: drop the least valuable last step until within budget.
    if cost > budget:
        heap = [(removal_key(t), t.name) for t in targets if ranks[t.name] > floor[t.name]]
        heapq.heapify(heap)
        while cost > budget and heap:
            _, name = heapq.heappop(heap)
            t = by_name[name]
            k = ranks[name] - 1
            cost -= _step_cost(t, k)
            ranks[name] = k
            if k > floor[name]:
                heapq.heappush(heap, (removal_key(t), name))
        if cost > budget:
            raise ValueError(
                f"the budget ({budget} params) is below the minimum rank {min_rank} for every target ({cost} params)"
            )

    # Grow: add the most valuable next step that still fits.
    heap = [
        (-priority(t, ranks[t.name]) / max(_step_cost(t, ranks[t.name]), 1), t.name)
        for t in targets
        if ranks[t.name] <= max_factored_rank(t)
    ]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        t = by_name[name]
        k = ranks[name]
        step = _step_cost(t, k)
        if cost + step > budget:
            continue  # this target cannot grow any more; others with cheaper steps may
        cost += step
        ranks[name] = k + 1
        if k + 1 <= max_factored_rank(t):
            heapq.heappush(heap, (-priority(t, k + 1) / max(_step_cost(t, k + 1), 1), name))
    return {t.name: normalize_rank(t, ranks[t.name]) for t in targets}
