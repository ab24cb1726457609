"""Allocator interface: factorizations + keep ratio -> rank map meeting the budget exactly."""

from __future__ import annotations

from typing import Protocol

from ..budget import RankMap
from ..decompose.base import Factorization
from ..targets import Target


class Allocator(Protocol):
    name: str

    def allocate(
        self, targets: list[Target], factorizations: dict[str, Factorization], keep: float, min_rank: int = 1
    ) -> RankMap: ...
