"""Rank allocators (docs/design.md §5): one module per allocator."""

from ..registry import build
from .ars import ARSAllocator
from .rankdyna import RankDynaAllocator
from .static import StaticAllocator
from .base import AllocationContext, Allocator
from .energy import EnergyAllocator
from .knapsack import GlobalAllocator
from .loss import LossAllocator
from .sensitivity import SensitivityAllocator
from .softlm import SoftLMAllocator
from .uniform import UniformAllocator

ALLOCATORS: dict[str, type] = {
    "uniform": UniformAllocator,
    "energy": EnergyAllocator,
    "sensitivity": SensitivityAllocator,
    "loss": LossAllocator,
    "global": GlobalAllocator,
    "ars": ARSAllocator,
    "rankdyna": RankDynaAllocator,
    "static": StaticAllocator,
    "softlm": SoftLMAllocator,
}


def get_allocator(name: str, **options) -> Allocator:
    return build("allocator", ALLOCATORS, name, options)


__all__ = ["ALLOCATORS", "AllocationContext", "Allocator", "get_allocator"]
