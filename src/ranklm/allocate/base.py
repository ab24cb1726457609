"""Allocator interface: factorizations + keep ratio -> rank map meeting the budget exactly.

Simple allocators read only the spectra (``Factorization.s``). Allocators that
measure or learn (sensitivity, ARS, SoftLMs, RankDyna) also get an
``AllocationContext`` with the model (dense targets still in place), the
calibration windows and a place to cache expensive results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..budget import RankMap
from ..decompose.base import Factorization
from ..errors import RanklmError
from ..targets import Target


@dataclass
class AllocationContext:
    """What an allocator that measures or learns, and a trainer, may use (the pipeline fills it)."""

    model: nn.Module | None = None  # the dense model (targets not yet replaced)
    windows: torch.Tensor | None = None  # calibration token ids [N, seq_len]
    batch_size: int = 4
    seed: int = 0
    progress: bool = True
    cache_dir: Path | None = None  # where an allocator may keep reusable results
    artifacts: dict[str, Any] = field(default_factory=dict)  # what the allocator wants saved in the checkpoint
    objective: Any = None  # a train.Objective (e.g. a task loss); None = the default for the model
    state_dir: Path | None = None  # resumable training state: one file per training run
    resume: bool = False
    save_every: int = 50
    training: list[dict[str, Any]] = field(default_factory=list)  # records of the training runs (-> ranklm.json)
    # Factors trained by a learning allocator, {target: (A, B)} at the allocated ranks: the
    # pipeline installs these instead of re-solving or re-installing the base's originals.
    trained_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def state_file(self, name: str) -> Path | None:
        """Where training run ``name`` keeps its state (None: not saved)."""
        return None if self.state_dir is None else Path(self.state_dir) / f"{name}.safetensors"


def require_context(context: AllocationContext | None, allocator: str) -> AllocationContext:
    """The context of an allocator that measures or learns, refused without a model and windows."""
    if context is None or context.model is None or context.windows is None:
        raise RanklmError(f"the {allocator} allocator needs the model and calibration windows (an AllocationContext)")
    return context


class Allocator(Protocol):
    name: str
    needs_context: bool  # True: needs model + calibration windows

    def allocate(
        self,
        targets: list[Target],
        factorizations: dict[str, Factorization],
        keep: float,
        min_rank: int = 1,
        context: AllocationContext | None = None,
    ) -> RankMap: ...
