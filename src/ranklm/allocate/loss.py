"""Truncation-loss allocation (SVD-LLM V2, Wang et al. 2025).

In the base's space the error of dropping component i is exactly ``s_i^2`` (for the
whitened base: the squared output error on the calibration data). Two modes:

``mode="v2"`` (default; our reading of the paper's heterogeneous ratio allocation):
within each group of same-type targets (q/k/v/o/gate/up/down across blocks), compute
each target's truncation loss ``L_i`` at the uniform keep ratio, then give it a removal
ratio proportional to ``1 / log(e + L_i / median_group(L))``: targets that would lose
more are cut less, damped by the log so one loud layer cannot take the whole budget.
The median normalisation makes it independent of the loss's units (the paper's
``log L`` is not). Every group keeps its average removal ratio; ``fit_budget`` then lands
the total exactly, adding or dropping single ranks by relative energy.

``mode="greedy"``: components kept greedily by absolute ``s_i^2`` per parameter
(within groups when ``group_by_type``). Measured on SmolLM2 it is much worse than
uniform: absolute whitened losses grow with depth (the residual stream grows), so it
starves the first blocks and keeps the last ones dense (benchmarks/README.md).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from ..budget import RankMap, fit_budget, max_factored_rank
from ..decompose.base import Factorization
from ..errors import RanklmError
from ..options import Configurable, MethodOptions, opt
from ..targets import Target
from .base import AllocationContext
from ..registry import register_allocator


def target_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``."""
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


@dataclass(frozen=True)
class LossOptions(MethodOptions):
    group_by_type: bool = opt(True, "allocate within groups of same-type targets (q/k/v/o/gate/up/down)")
    mode: str = opt("v2", "v2: removal ratio by 1/log(e + L/median L) per group; greedy: by absolute s^2",
                    choices=("v2", "greedy"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("v2", "greedy"):
            raise RanklmError(f"unknown loss-allocator mode {self.mode!r}; valid: v2, greedy")


@register_allocator("loss")
class LossAllocator(Configurable):
    name = "loss"
    needs_context = False
    Options = LossOptions

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
        if self.mode == "v2":
            return self._v2(targets, groups, energy, keep, min_rank)
        rank_map: RankMap = {}
        for members in groups.values():
            start: RankMap = {t.name: min(min_rank, max_factored_rank(t)) for t in members}
            rank_map.update(fit_budget(members, start, keep, priority, min_rank))
        # Per-group rounding slack adds up; one global pass lands the total exactly.
        return fit_budget(targets, rank_map, keep, priority, min_rank)

    def _v2(
        self, targets: list[Target], groups: dict[str, list[Target]], energy: dict[str, list[float]], keep: float, min_rank: int
    ) -> RankMap:
        def uniform_rank(t: Target, ratio: float) -> int:
            return int(ratio * t.dense_params // (t.out_features + t.in_features))

        start: RankMap = {}
        for members in groups.values():
            loss = {t.name: float(sum(energy[t.name][uniform_rank(t, keep):])) for t in members}
            ordered = sorted(loss.values())
            median = ordered[len(ordered) // 2] or (max(ordered) or 1.0)
            inv = {n: 1.0 / math.log(math.e + v / median) for n, v in loss.items()}
            mean_inv = sum(inv.values()) / len(inv)
            for t in members:
                removal = (1.0 - keep) * inv[t.name] / mean_inv
                ratio = min(max(1.0 - removal, 0.0), 1.0)
                start[t.name] = max(min(uniform_rank(t, ratio), max_factored_rank(t) + 1), min(min_rank, max_factored_rank(t)))
        shares = {n: [x / (sum(e) or 1.0) for x in e] for n, e in energy.items()}

        def relative(t: Target, k: int) -> float:
            sh = shares[t.name]
            return float(sum(sh[k:])) if k >= max_factored_rank(t) else sh[k]

        return fit_budget(targets, start, keep, relative, min_rank)
