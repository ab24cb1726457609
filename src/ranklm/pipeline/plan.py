"""The plan of a run: the three axes built from a config, and how statistics are gathered."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Union

import torch

from ..allocate import get_allocator
from ..calibration import ACTIVATION, StatisticNames, TextSource
from ..config import CompressConfig
from ..decompose import Base, get_base
from ..errors import RanklmError

Data = Union[None, str, os.PathLike, TextSource, list, torch.Tensor]


ACTIVATION_NEEDS = StatisticNames(ACTIVATION)  # live view of the registry: statistics collectable block by block


@dataclass(frozen=True)
class BudgetPlan:
    """What the allocation must meet: the keep ratio and the rank rules applied after it."""

    keep: float
    min_rank: int = 1
    round_to: int = 1
    max_flop_ratio: float = 1.0
    bytes: str | None = None  # --budget-bytes as given (resolved against the model's dtype by the sequencer)


@dataclass(frozen=True)
class CalibrationPlan:
    """How calibration windows are cut and batched (the field names are CompressConfig's)."""

    calib_windows: int
    seq_len: int
    batch_size: int
    fisher_windows: int
    seed: int
    stats_dtype: str = "auto"


@dataclass
class Plan:
    """A run resolved from its config: the three axes built (options validated), the budget, the
    calibration, the targets' patterns and how statistics are gathered. The pipeline reads only this;
    ``config`` stays for what ranklm.json and resumable state record about the run."""

    base: Base
    allocator: Any
    trainer: Any | None
    sequential: bool  # statistics block by block (dense propagation for pass 1)
    refit: bool  # re-factor block by block on compressed activations at the allocated ranks
    budget: BudgetPlan
    calibration: CalibrationPlan
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    method: str  # the human-readable name (recipe, or base+allocator, + trainer)
    config: CompressConfig
    memory_mode: str = "auto"  # requested: auto, bounded, whole (the preflight decides auto: pipeline.memory)
    quant: Any = None  # quantize.QuantSpec: --quantize (after install and training), or None
    block_refit: str = "off"  # --block-refit mode (pipeline/block_refit.py), after install, before training
    block_refit_damping: float = 0.01

    @property
    def joint(self) -> bool:
        """Ranks and widths chosen together under a byte budget (allocate/joint.py) instead of the allocator."""
        return self.quant is not None and self.budget.bytes is not None

    @property
    def quantize_only(self) -> bool:
        """``--keep 1 --quantize intN``: weight-only quantization of the dense targets, nothing factored or read."""
        return self.quant is not None and self.budget.bytes is None and self.budget.keep >= 1.0

    @property
    def needs_windows(self) -> bool:
        if self.quantize_only:
            return False
        return (bool(self.base.needs) or bool(getattr(self.allocator, "needs_context", False)) or self.trainer is not None
                or self.block_refit != "off")

    @property
    def needs_pass1(self) -> bool:
        return not self.refit or bool(getattr(self.allocator, "needs_spectra", True))

    @property
    def trains(self) -> bool:
        """True when something in the run trains (a learning allocator or a trainer): resumable state applies."""
        return bool(getattr(self.allocator, "needs_training", False)) or self.trainer is not None

    def record(self) -> dict[str, Any]:
        """``recipe.config`` of ranklm.json (``CompressConfig.record``)."""
        return self.config.record()


def make_plan(config: CompressConfig | None = None, model: Any = None) -> Plan:
    """Resolve a config into a Plan: the default recipe for ``model`` (``CompressConfig.for_model``), base,
    allocator and trainer built (options validated), and the statistics mode chosen.

    Activation-statistics bases (whiten, asvd) calibrate block by block by default, with
    compressed propagation (measured better at keep 0.6, benchmarks/sequential.py);
    Fisher bases need end-to-end gradients and run whole-model; ``--whole-model`` opts out.
    """
    from ..train import get_trainer

    config = config or CompressConfig()
    if model is not None:
        config = config.for_model(model)
    base = get_base(config.base, **config.base_options)
    allocator = get_allocator(config.allocator, **config.allocator_options)
    trainer = None if config.trainer in (None, "none") else get_trainer(config.trainer, **config.trainer_options)
    activation_only = bool(base.needs) and set(base.needs) <= ACTIVATION_NEEDS
    if config.sequential and base.needs and not activation_only:
        raise RanklmError(
            f"--sequential works with activation-statistics bases (whiten, asvd); {base.name} needs end-to-end "
            "gradients (Fisher): drop --sequential"
        )
    sequential = activation_only and (config.sequential is None or bool(config.sequential))
    memory_mode = getattr(config, "memory_mode", "auto")
    if memory_mode == "bounded":
        from .bounded import can_bound

        if sequential or not can_bound(base, allocator):
            raise RanklmError(
                f"--memory-mode bounded applies to whole-model statistics of a base with activation statistics "
                f"and an allocator that reads only spectra (kfac-global); {base.name} + {allocator.name}"
                + (" already runs block by block (--sequential)" if sequential else " cannot")
                + ": drop --memory-mode bounded")
    quant = config.quant_spec
    if quant is not None:
        from ..quantize.affine import require_torchao

        require_torchao()
    if quant is not None and config.budget_bytes is not None and base.name != "kfac":
        raise RanklmError(f"--quantize with --budget-bytes chooses ranks and widths on the kfac curvature scale; "
                          f"{base.name} provides no such estimate: use the kfac base (kfac-global, the default recipe)")
    return Plan(
        base, allocator, trainer, sequential, sequential and config.propagate == "compressed",
        budget=BudgetPlan(float(config.keep), int(config.min_rank), int(config.round_to), float(config.max_flop_ratio),
                          config.budget_bytes),
        calibration=CalibrationPlan(int(config.calib_windows), int(config.seq_len), int(config.batch_size),
                                    int(config.fisher_windows), int(config.seed),
                                    str(getattr(config, "stats_dtype", "auto"))),
        include=tuple(config.include), exclude=tuple(config.exclude), method=config.method, config=config,
        memory_mode=memory_mode, quant=quant, block_refit=config.block_refit,
        block_refit_damping=float(config.block_refit_damping),
    )
