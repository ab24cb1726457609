"""``static``: the two-stage baseline RankDyna replaces (docs/design.md §5, RankDyna's "static baseline").

Fine-tune dense on the task, truncate with the chosen base at the budget, fine-tune again,
with the same total steps as a RankDyna run. The stages are driven by
``ranklm.apps.finetune.finetune_task`` (``ranklm finetune --allocator static``): the first
dense fine-tune runs before the pipeline (so Fisher bases see the task-tuned model, the
FWSVD/TFWSVD papers' setting), the pipeline then factors and truncates, and its
``finetune`` trainer (all parameters) spends the remaining steps.

As an allocator it gives every target the same keep ratio (``uniform``), the allocation the
FWSVD/TFWSVD papers use; ``allocation=energy`` ranks components by normalised spectrum energy
instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..budget import RankMap
from ..decompose.base import Factorization
from ..errors import RanklmError
from ..options import Configurable, MethodOptions, opt
from ..targets import Target
from .base import AllocationContext
from .energy import EnergyAllocator
from .uniform import UniformAllocator
from ..registry import register_allocator


@dataclass(frozen=True)
class StaticOptions(MethodOptions):
    allocation: str = opt("uniform", "ranks after the dense fine-tune: uniform keep ratio, or energy",
                          choices=("uniform", "energy"))
    dense_fraction: float = opt(0.5, "fraction of the total steps spent fine-tuning dense before truncating")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation not in ("uniform", "energy"):
            raise RanklmError("static allocation must be 'uniform' or 'energy'")
        if not 0 <= self.dense_fraction < 1:
            raise RanklmError("static dense_fraction must lie in [0, 1)")


@register_allocator("static")
class StaticAllocator(Configurable):
    name = "static"
    needs_context = False
    needs_spectra = True
    dense_first = True  # the task driver fine-tunes the dense model before truncating
    Options = StaticOptions

    def allocate(self, targets: list[Target], factorizations: dict[str, Factorization], keep: float, min_rank: int = 1,
                 context: AllocationContext | None = None) -> RankMap:
        inner = UniformAllocator() if self.allocation == "uniform" else EnergyAllocator()
        return inner.allocate(targets, factorizations, keep, min_rank, context)


__all__ = ["StaticAllocator"]
