"""Energy allocation: global greedy on normalised spectrum energy per parameter.

Each component i of target t is worth ``s_i^2 / sum(s^2)`` (its share of the
target's energy in the base's space); components are added in order of worth per
parameter until the budget is full. The step to dense is worth all the energy
still missing.
"""

from __future__ import annotations

from .base import AllocationContext
from ..budget import RankMap, fit_budget, max_factored_rank
from ..decompose.base import Factorization
from ..options import Configurable, NoOptions
from ..targets import Target
from ..registry import register_allocator


@register_allocator("energy")
class EnergyAllocator(Configurable):
    name = "energy"
    needs_context = False
    Options = NoOptions

    def allocate(
        self,
        targets: list[Target],
        factorizations: dict[str, Factorization],
        keep: float,
        min_rank: int = 1,
        context: AllocationContext | None = None,
    ) -> RankMap:
        shares = {}
        for t in targets:
            e = factorizations[t.name].s.double() ** 2
            shares[t.name] = (e / e.sum().clamp_min(1e-300)).tolist()

        def priority(t: Target, k: int) -> float:
            share = shares[t.name]
            if k >= max_factored_rank(t):
                return float(sum(share[k:]))
            return share[k]

        start: RankMap = {t.name: min(min_rank, max_factored_rank(t)) for t in targets}
        return fit_budget(targets, start, keep, priority, min_rank)
