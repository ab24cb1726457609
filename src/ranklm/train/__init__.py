"""The training axis (docs/design.md §1): objectives, the one resumable loop, and the trainers built on it.

Learning allocators (ARS) train inside allocation; the trainers registered here run
after the rank map is installed (``--trainer finetune --train-opt steps=100``).
"""

from ..registry import build, registered
from .finetune import FinetuneTrainer, TrainResult, finetune_factors
from .heal import HealTrainer
from .loop import Hooks, LoopConfig, LoopResult, run_loop
from .masks import HyperNetwork, MaskedFactorized, gumbel_sigmoid_mask, is_prefix, logistic_noise, prefix_fraction
from .objective import Objective, default_objective, lm_objective

# Filled by each module's @register_trainer as it is imported above (the registry's live table).
TRAINERS: dict[str, type] = registered("trainer")


def get_trainer(name: str, **options):
    return build("trainer", name, options)


__all__ = [
    "FinetuneTrainer",
    "HealTrainer",
    "Hooks",
    "HyperNetwork",
    "LoopConfig",
    "LoopResult",
    "MaskedFactorized",
    "Objective",
    "TRAINERS",
    "TrainResult",
    "default_objective",
    "finetune_factors",
    "get_trainer",
    "gumbel_sigmoid_mask",
    "is_prefix",
    "lm_objective",
    "logistic_noise",
    "prefix_fraction",
    "run_loop",
]
