"""Truncation-loss allocation (SVD-LLM V2, Wang et al. 2025).

In the base's space the error of dropping component i is exactly ``s_i^2`` (for
the whitened base: the squared output error on the calibration data), so a
component's value per parameter is ``s_i^2 / (m+n)`` in absolute terms,
comparable across matrices. Components are kept greedily by that value.

``group_by_type=True`` (the paper's grouping): targets of the same type (q/k/v/o,
gate/up/down, ... i.e. the same module name without its block index) share one
budget, each group meeting the keep ratio, and within a group the greedy decides;
``False`` allocates globally.
"""

from __future__ import annotations

import re
from collections import defaultdict

from ..budget import RankMap, fit_budget, max_factored_rank
from ..decompose.base import Factorization
from ..targets import Target
from .base import AllocationContext


def target_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``."""
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


class LossAllocator:
    name = "loss"
    needs_context = False

    def __init__(self, group_by_type: bool = True, **_: object) -> None:
        self.group_by_type = bool(group_by_type)

    def allocate(
        self,
        targets: list[Target],
        factorizations: dict[str, Factorization],
        keep: float,
        min_rank: int = 1,
        context: AllocationContext | None = None,
    ) -> RankMap:
        energy = {t.name: (factorizations[t.name].s.double() ** 2).tolist() for t in targets}

        def priority(t: Target, k: int) -> float:
            e = energy[t.name]
            return float(sum(e[k:])) if k >= max_factored_rank(t) else e[k]

        groups: dict[str, list[Target]] = defaultdict(list)
        for t in targets:
            groups[target_type(t.name) if self.group_by_type else "all"].append(t)
        rank_map: RankMap = {}
        for members in groups.values():
            start: RankMap = {t.name: min(min_rank, max_factored_rank(t)) for t in members}
            rank_map.update(fit_budget(members, start, keep, priority, min_rank))
        # Per-group rounding slack adds up; one global pass lands the total exactly.
        return fit_budget(targets, rank_map, keep, priority, min_rank)
