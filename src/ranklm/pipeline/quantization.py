"""Stages for bytes (issue 29): resolve ``--budget-bytes``, the joint allocation, and the final quantization."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..budget import DENSE, RankMap
from ..errors import RanklmError
from ..quantize.sizes import bytes_summary
from ..quantize.spec import parse_budget_bytes
from ..targets import Target, weight_matrix
from .plan import Plan


@dataclass(frozen=True)
class ByteBudget:
    bytes: float  # absolute, for the targets as stored
    given: str  # how --budget-bytes was given, in words
    dense_bytes: int  # the targets' dense bytes in the model's dtype
    dense_params: int


def dense_target_bytes(model: nn.Module, targets: list[Target]) -> tuple[int, int]:
    """(bytes, parameters) of the targets' dense weights in the model's own dtype."""
    total_b = total_p = 0
    for t in targets:
        w = weight_matrix(model.get_submodule(t.name))
        total_b += w.numel() * w.element_size()
        total_p += w.numel()
    return total_b, total_p


def resolve_byte_budget(plan: Plan, model: nn.Module, targets: list[Target]) -> tuple[Plan, ByteBudget | None]:
    """The plan with ``--budget-bytes`` resolved: without ``--quantize`` it is the keep ratio of float factors
    (bytes and parameters are proportional in one dtype); with it, the joint allocator's budget."""
    if plan.budget.bytes is None:
        return plan, None
    dense_b, dense_p = dense_target_bytes(model, targets)
    value, given = parse_budget_bytes(plan.budget.bytes, dense_b, dense_p)
    budget = ByteBudget(float(value), given, dense_b, dense_p)
    if plan.quant is None:
        keep = budget.bytes / dense_b
        if not 0.0 < keep < 1.0:
            raise RanklmError(f"--budget-bytes {plan.budget.bytes} is {keep:.3g} of the targets' dense bytes "
                              f"({dense_b:,}); without --quantize it must be below 1 (float factors)")
        return replace(plan, budget=replace(plan.budget, keep=keep)), budget
    return plan, budget


def uniform_bits(plan: Plan, targets: list[Target]) -> dict[str, int]:
    """One width for every target (``--quantize intN`` without a byte budget)."""
    return {t.name: plan.quant.bits[0] for t in targets} if plan.quant is not None else {}


def quantize_model(model: nn.Module, targets: list[Target], plan: Plan, bits: dict[str, int], rank_map: RankMap,
                   budget: ByteBudget | None, dense_bytes: int) -> dict[str, Any]:
    """Quantize every target at its width; the record ranklm.json keeps (``artifacts.quantization``)."""
    from ..quantize.apply import quantize_targets

    spec = plan.quant
    quantize_targets(model, targets, bits, spec.group_size)
    sizes = bytes_summary(model, targets, dense_bytes)
    record = {**spec.record(), "bits": {n: int(b) for n, b in bits.items()},
              "dense_targets": sum(1 for t in targets if rank_map[t.name] == DENSE), **sizes}
    if budget is not None:
        record.update(budget_bytes=budget.bytes, budget_given=budget.given,
                      budget_used=sizes["target_bytes"] / budget.bytes)
    return record
