"""Rank allocators (docs/design.md §5): one module per allocator."""

from ..registry import build, registered
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

# Filled by each module's @register_allocator as it is imported above (the registry's live table).
ALLOCATORS: dict[str, type] = registered("allocator")


def get_allocator(name: str, **options) -> Allocator:
    return build("allocator", name, options)


__all__ = ["ALLOCATORS", "AllocationContext", "Allocator", "get_allocator"]
