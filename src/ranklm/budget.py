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


def round_ranks(targets: list[Target], rank_map: RankMap, keep: float, multiple: int, max_ratio: float = 1.0) -> RankMap:
    """The factored ranks of ``rank_map`` moved to multiples of ``multiple``, budget rules kept.

    Why: a rank that is a multiple of 8/16/32 gives GEMM shapes the kernels tile well, so the
    factored layers run closer to their FLOP ratio. Allocator-independent: the allocator's ranks
    are the reference. Each factored rank starts at its multiple below (at least one multiple);
    while over budget the target furthest above its allocated rank drops a multiple; then, while
    a step fits, the target furthest below its allocated rank gains one. Dense targets stay
    dense, and a target whose largest factored rank is below ``multiple`` keeps its rank.
    Raises ``ValueError`` when the result cannot meet :func:`meets_budget` (steps too coarse
    for the budget: a smaller multiple is needed). With ``max_ratio`` < 1 no rank grows past
    :func:`fast_rank` (the latency rule's ceiling).
    """
    if multiple <= 1:
        return dict(rank_map)
    budget = budget_params(targets, keep)
    out = dict(rank_map)
    movable: dict[str, tuple[Target, int, int]] = {}  # name -> (target, allocated rank, largest multiple allowed)
    for t in targets:
        top = rank_ceiling(t, max_ratio, multiple) // multiple * multiple
        if rank_map[t.name] != DENSE and top > 0:
            movable[t.name] = (t, int(rank_map[t.name]), top)
            out[t.name] = max(multiple, int(rank_map[t.name]) // multiple * multiple)
    cost = targets_cost(targets, out)

    def off(name: str) -> int:  # rounded minus allocated rank
        return int(out[name]) - movable[name][1]

    def step(name: str) -> int:
        t = movable[name][0]
        return multiple * (t.out_features + t.in_features)

    while cost > budget:
        shrinkable = [n for n in movable if int(out[n]) > multiple]
        if not shrinkable:
            break
        n = max(shrinkable, key=off)
        out[n] = int(out[n]) - multiple
        cost -= step(n)
    while True:
        growable = [n for n in movable if int(out[n]) + multiple <= movable[n][2] and cost + step(n) <= budget]
        if not growable:
            break
        n = min(growable, key=off)
        out[n] = int(out[n]) + multiple
        cost += step(n)
    achieved = cost / targets_dense_params(targets)
    if not meets_budget(achieved, keep):
        raise ValueError(
            f"ranks rounded to multiples of {multiple} reach keep {achieved:.4f}, not within {TOLERANCE:.1%} "
            f"below {keep}: use a smaller multiple"
        )
    return out


def fast_rank(t: Target, max_ratio: float) -> int:
    """Largest factored rank whose cost (= FLOPs per token) is at most ``max_ratio`` of the dense matrix's."""
    return min(int(max_ratio * t.dense_params) // (t.out_features + t.in_features), max_factored_rank(t))


def rank_ceiling(t: Target, max_ratio: float = 1.0, multiple: int = 1) -> int:
    """Largest factored rank allowed under the latency rule's ``max_ratio``, on a multiple of ``multiple`` when one fits."""
    top = max_factored_rank(t) if max_ratio >= 1.0 else fast_rank(t, max_ratio)
    return top // multiple * multiple if multiple > 1 and top >= multiple else top


def latency_dense_rule(targets: list[Target], rank_map: RankMap, keep: float, max_ratio: float,
                       multiple: int = 1) -> RankMap:
    """No target left factored above ``max_ratio`` of its dense FLOPs: such a target goes dense or below the ratio.

    Why: ``x V^T U^T`` costs ``r (m+n)`` multiply-adds per token against ``m n`` for ``x W^T``,
    but two thin GEMMs run below the throughput of one square one; near the break-even rank
    the factored layer is *slower* than the dense one while still costing budget. Allocator-
    independent (the allocator's ranks are the reference, as in :func:`round_ranks`):

    1. every factored target above the ratio is cut to its ceiling (:func:`rank_ceiling`);
    2. in the order of how close to dense the allocator put them, cut targets go dense while
       the budget pays for it (the allocator valued those most; ties, as in a uniform
       allocation, go in model order, so the first blocks stay dense);
    3. parameters still free go, one rank at a time, to the factored targets furthest below
       their allocated rank in relative terms (none past its fast rank);
    4. if that still misses the budget window (every factored target at its ceiling, no cut
       target fits dense: few, coarse targets), the cut target cheapest to densify goes dense
       and single ranks are taken back from the factored targets furthest above their share.

    The keep ratio never rises above the request; ``ValueError`` when the result falls short of
    :func:`meets_budget` (only with very coarse targets). ``multiple``: the ceilings are
    multiples of it, so that :func:`round_ranks` afterwards has room to land the budget.
    """
    if max_ratio >= 1.0:
        return dict(rank_map)
    if max_ratio <= 0.0:
        raise ValueError("the latency rule's FLOP ratio must lie in (0, 1]")
    budget = budget_params(targets, keep)
    out: RankMap = dict(rank_map)
    cut: list[Target] = []
    for t in targets:
        r = rank_map[t.name]
        if r != DENSE and int(r) > rank_ceiling(t, max_ratio, multiple):
            out[t.name] = rank_ceiling(t, max_ratio, multiple)
            cut.append(t)
    cost = targets_cost(targets, out)
    cut.sort(key=lambda t: -target_cost(t, rank_map[t.name]) / t.dense_params)
    for t in cut:
        extra = t.dense_params - target_cost(t, out[t.name])
        if cost + extra <= budget:
            out[t.name] = DENSE
            cost += extra
    allocated = {t.name: max(int(rank_map[t.name]), 1) for t in targets if out[t.name] != DENSE}
    heap = [(int(out[t.name]) / allocated[t.name], t.name) for t in targets
            if out[t.name] != DENSE and int(out[t.name]) < rank_ceiling(t, max_ratio, multiple)]
    heapq.heapify(heap)
    by_name = {t.name: t for t in targets}
    while heap:
        _, name = heapq.heappop(heap)
        t = by_name[name]
        step = t.out_features + t.in_features
        if cost + step > budget:
            continue
        out[name] = int(out[name]) + 1
        cost += step
        if int(out[name]) < rank_ceiling(t, max_ratio, multiple):
            heapq.heappush(heap, (int(out[name]) / allocated[name], name))
    if not meets_budget(cost / targets_dense_params(targets), keep):
        # every factored target is at its ceiling and no cut target fits dense: make the cheapest one dense
        # and pay for it by single ranks from the factored targets furthest above their share
        left = [t for t in cut if out[t.name] != DENSE]
        if left:
            t = min(left, key=lambda t: t.dense_params - target_cost(t, out[t.name]))
            cost += t.dense_params - target_cost(t, out[t.name])
            out[t.name] = DENSE
            shrink = [(-int(out[n]) / allocated[n], n) for n in allocated if out[n] != DENSE and int(out[n]) > 1]
            heapq.heapify(shrink)
            while cost > budget and shrink:
                _, name = heapq.heappop(shrink)
                out[name] = int(out[name]) - 1
                cost -= by_name[name].out_features + by_name[name].in_features
                if int(out[name]) > 1:
                    heapq.heappush(shrink, (-int(out[name]) / allocated[name], name))
    achieved = cost / targets_dense_params(targets)
    if not meets_budget(achieved, keep):
        raise ValueError(
            f"with no target factored above {max_ratio} of its dense FLOPs the ranks reach keep {achieved:.4f}, "
            f"not within {TOLERANCE:.1%} below {keep}"
        )
    return out
