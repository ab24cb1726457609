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


@dataclass
class Plan:
    """The three axes built from a config, and how statistics are gathered."""

    base: Base
    allocator: Any
    trainer: Any | None
    sequential: bool  # statistics block by block (dense propagation for pass 1)
    refit: bool  # re-factor block by block on compressed activations at the allocated ranks

    @property
    def needs_windows(self) -> bool:
        return bool(self.base.needs) or bool(getattr(self.allocator, "needs_context", False)) or self.trainer is not None

    @property
    def needs_pass1(self) -> bool:
        return not self.refit or bool(getattr(self.allocator, "needs_spectra", True))


def make_plan(config: CompressConfig) -> Plan:
    """Build base, allocator and trainer (options validated) and choose the statistics mode.

    Activation-statistics bases (whiten, asvd) calibrate block by block by default, with
    compressed propagation (measured: SmolLM2 keep 0.6, 117.8 vs 152.5 perplexity);
    Fisher bases need end-to-end gradients and run whole-model; ``--whole-model`` opts out.
    """
    from ..train import get_trainer

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
    return Plan(base, allocator, trainer, sequential, sequential and config.propagate == "compressed")
