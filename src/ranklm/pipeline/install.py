"""Stages 3-5: the allocated rank map (with --max-flop-ratio and --round-to applied) and its installation."""

from __future__ import annotations

import torch
from torch import nn

from ..allocate import AllocationContext
from ..budget import DENSE, RankMap, latency_dense_rule, round_ranks
from ..decompose import Factorization
from ..errors import RanklmError
from ..layers import LowRankLinear, replace_module
from ..targets import Target, weight_matrix
from .plan import BudgetPlan


def check_finite_weights(model: nn.Module, targets: list[Target]) -> None:
    for t in targets:
        if not torch.isfinite(weight_matrix(model.get_submodule(t.name))).all():
            raise RanklmError(f"non-finite weights (NaN/Inf) in {t.name}")


def allocate_ranks(allocator, targets, factorizations, budget: BudgetPlan, context: AllocationContext) -> RankMap:
    """``allocator.allocate`` with an unreachable budget reported as a user error."""
    try:
        return allocator.allocate(targets, factorizations, budget.keep, budget.min_rank, context)
    except ValueError as e:
        raise RanklmError(f"keep ratio {budget.keep} cannot be met: {e}") from None


def adjusted_rank_map(targets: list[Target], rank_map: RankMap, budget: BudgetPlan,
                      context: AllocationContext, allocator: str = "") -> RankMap:
    """The allocated rank map after ``budget.max_flop_ratio`` (budget.latency_dense_rule), then ``budget.round_to``
    (budget.round_ranks, under the rule's ceilings); either failure is one error line naming its option."""
    steps = [("--max-flop-ratio", budget.max_flop_ratio, budget.max_flop_ratio < 1.0,
              lambda m: latency_dense_rule(targets, m, budget.keep, budget.max_flop_ratio, budget.round_to)),
             ("--round-to", budget.round_to, budget.round_to > 1,
              lambda m: round_ranks(targets, m, budget.keep, budget.round_to, budget.max_flop_ratio))]
    for flag, value, active, adjust in steps:
        if not active:
            continue
        if context.trained_factors is not None:
            raise RanklmError(f"{flag} does not apply to the {allocator} allocator: it trains factors at its own ranks")
        try:
            rank_map = adjust(rank_map)
        except ValueError as e:
            raise RanklmError(f"keep ratio {budget.keep} with {flag} {value}: {e}") from None
    return rank_map


def install_rank_map(
    model: nn.Module, targets: list[Target], factorizations: dict[str, Factorization], rank_map: RankMap
) -> None:
    """Swap every factored target for a LowRankLinear of its rank; dense ones stay as they are."""
    for t in targets:
        rank = rank_map[t.name]
        if rank == DENSE:
            continue
        a, b = factorizations[t.name].factors(int(rank))
        replace_module(model, t.name, LowRankLinear.from_factors(model.get_submodule(t.name), a, b))


def install_factors(model: nn.Module, targets: list[Target], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    rank_map: RankMap) -> None:
    """Install trained ``(A, B)`` pairs as they are (their rank must be the rank map's)."""
    for t in targets:
        rank = rank_map[t.name]
        if rank == DENSE:
            continue
        a, b = factors[t.name]
        if a.shape[1] != int(rank) or b.shape[0] != int(rank):
            raise RanklmError(f"trained factors of {t.name} have rank {a.shape[1]}, the rank map says {rank}")
        replace_module(model, t.name, LowRankLinear.from_factors(model.get_submodule(t.name), a, b))
