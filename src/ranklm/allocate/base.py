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

from ..budget import RankMap, keep_ratio
from ..decompose.base import Factorization
from ..errors import RanklmError
from ..targets import Target


@dataclass
class AllocationContext:
    """What an allocator that measures or learns, and a trainer, may use (the pipeline fills it)."""

    model: nn.Module | None = None  # the dense model (targets not yet replaced)
    windows: torch.Tensor | None = None  # calibration token ids [N, seq_len]
    validation: torch.Tensor | None = None  # validation token ids (no document of calibration or evaluation)
    # A trainer's windows when it trains on more calibration text than the statistics read (heal's
    # ``windows``): the calibration windows first, then more of the same text (None: ``windows``).
    train_windows: torch.Tensor | None = None
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
    # What runs on copies of the same dense model share besides statistics (bench's cells: heal's cached
    # teacher, keyed by what it depends on); a private dict for a single run.
    shared: dict[Any, Any] = field(default_factory=dict)
    rank_map: dict[str, Any] | None = None  # the installed ranks, set before a trainer runs (heal's dense_targets)

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


LEARNED_KEEP_TOLERANCE = 0.02  # a learned keep farther than this from the request is reported as not reached


def training_record(name: str, stage: str, options: dict[str, Any], objective: Any, result: Any, keep: float,
                    learned_keep: float, targets: list[Target], rank_map: RankMap, **extra: Any) -> dict[str, Any]:
    """The ``ranklm.json`` training record of a learning allocator (ARS, SoftLMs, RankDyna): what it
    reached on its own (``keep_learned``) next to the request and the keep after the exact fit."""
    return {
        "trainer": name, "stage": stage, "steps": int(options.get("steps", 0)), "options": options,
        "objective": objective.description or objective.name, "final_loss": result.final_loss,
        "first_loss": (result.history.get("loss") or [None])[0],
        "keep_requested": keep, "keep_learned": learned_keep, "keep_after_fit": keep_ratio(targets, rank_map),
        "reached_budget": abs(learned_keep - keep) <= LEARNED_KEEP_TOLERANCE, **extra,
        "seconds": round(result.seconds, 2), "resumed_from_step": result.start_step, "world_size": result.world_size,
    }

