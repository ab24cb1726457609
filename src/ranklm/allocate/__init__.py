"""Rank allocators (DESIGN §5): one module per allocator."""

from .ars import ARSAllocator
from .base import AllocationContext, Allocator
from .energy import EnergyAllocator
from .loss import LossAllocator
from .sensitivity import SensitivityAllocator
from .uniform import UniformAllocator

ALLOCATORS: dict[str, type] = {
    "uniform": UniformAllocator,
    "energy": EnergyAllocator,
    "sensitivity": SensitivityAllocator,
    "loss": LossAllocator,
    "ars": ARSAllocator,
}


def get_allocator(name: str, **options) -> Allocator:
    from ..errors import RanklmError

    if name not in ALLOCATORS:
        raise RanklmError(f"unknown allocator {name!r}; valid allocators: {', '.join(sorted(ALLOCATORS))}")
    return ALLOCATORS[name](**options)


__all__ = ["ALLOCATORS", "AllocationContext", "Allocator", "get_allocator"]
