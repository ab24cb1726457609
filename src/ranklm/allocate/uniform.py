"""Uniform allocation: the same keep ratio for every target (SVD-LLM's default)."""

from __future__ import annotations

from .base import AllocationContext
from ..budget import RankMap, fit_budget, max_factored_rank
from ..decompose.base import Factorization
from ..options import Configurable, NoOptions
from ..targets import Target
from ..registry import register_allocator


@register_allocator("uniform")
class UniformAllocator(Configurable):
    name = "uniform"
    needs_context = False
    needs_spectra = False  # shapes only: the block-by-block refit pass can factor without a first pass
    Options = NoOptions

    def allocate(
        self,
        targets: list[Target],
        factorizations: dict[str, Factorization],
        keep: float,
        min_rank: int = 1,
        context: AllocationContext | None = None,
    ) -> RankMap:
        start: RankMap = {}
        for t in targets:
            k = int(keep * t.dense_params // (t.out_features + t.in_features))
            start[t.name] = max(min(k, max_factored_rank(t) + 1), min(min_rank, max_factored_rank(t)))

        def priority(t: Target, k: int) -> float:
            # Fill the rounding slack where the kept fraction is lowest, so ratios stay equal
            # (fit_budget divides by the step cost m+n, which this multiplies back).
            step = t.out_features + t.in_features
            return -((k + 1) * step / t.dense_params) * step

        return fit_budget(targets, start, keep, priority, min_rank)
