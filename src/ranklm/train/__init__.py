"""Training loops: mask learning (ARS) and limited fine-tuning of installed factors (DESIGN §1, §5)."""

from .finetune import finetune_factors
from .masks import HyperNetwork, MaskedFactorized, gumbel_sigmoid_mask, is_prefix, logistic_noise, prefix_fraction

__all__ = [
    "HyperNetwork",
    "MaskedFactorized",
    "finetune_factors",
    "gumbel_sigmoid_mask",
    "is_prefix",
    "logistic_noise",
    "prefix_fraction",
]
