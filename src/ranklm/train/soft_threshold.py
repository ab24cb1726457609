"""Building blocks of SoftLMs (docs/design.md §5): trainable U, s, V with a learnable soft threshold.

``SoftThresholdFactorized`` stands in for a target while SoftLMs trains:
``W = U diag(s * g) V`` with ``U`` (out x r), ``s`` (r), ``V`` (r x in) trainable and
the gate ``g`` computed from the normalised singular values ``s / s_max`` and the
target's threshold ``alpha``:

* soft gate ``h = 1/2 (1 + tanh(kappa (s/s_max - alpha)))`` (the paper's shifted tanh,
  sharpness ``kappa``);
* ``gate="hard"`` (default): the forward uses the hard threshold ``1[s/s_max > alpha]`` and
  the backward the soft gate's gradient (straight-through), so training sees exactly the
  model that will be installed; ``gate="soft"``: forward and backward use ``h``.

``s_max`` is the target's largest initial singular value (a constant), so ``alpha`` lives
on a fixed scale even while ``s`` trains. The original module is kept (not trained) so a
distillation teacher can run the dense model through the same wrappers (``dense=True``).
Factors, forward and export are the shared ``train.gated.GatedFactorized``; this class adds the gate.
"""

from __future__ import annotations

import torch
from torch import nn

from .gated import GatedFactorized


def gate_values(s_norm: torch.Tensor, alpha: torch.Tensor, kappa: float, hard: bool) -> torch.Tensor:
    """The gate of every component: hard 0/1 with the soft gradient, or the soft gate itself."""
    soft = 0.5 * (1.0 + torch.tanh(kappa * (s_norm - alpha)))
    if not hard:
        return soft
    return (s_norm > alpha).to(soft.dtype) + soft - soft.detach()


class SoftThresholdFactorized(GatedFactorized):
    """A target as trainable ``U diag(s * gate) V`` (+ the original bias, frozen)."""

    split = "sqrt"  # export sqrt|s| to both sides (sign on A), as the base's factors are split

    def __init__(self, original: nn.Module, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, alpha: float,
                 in_features: int, out_features: int) -> None:
        super().__init__(u, s, v, getattr(original, "bias", None), in_features, out_features, trainable=True)
        self.alpha = nn.Parameter(torch.tensor(float(alpha), dtype=u.dtype, device=u.device))
        self.register_buffer("s_max", s.detach().abs().max().clamp_min(1e-30).clone(), persistent=False)
        self.original = [original]  # a list: not a submodule (neither trained nor saved)
        self.kappa = 10.0
        self.hard = True
        self.dense = False  # run the original module (distillation teacher)

    @property
    def s_norm(self) -> torch.Tensor:
        return self.s.abs() / self.s_max

    def gate(self) -> torch.Tensor:
        """The threshold gate of every component at the current alpha, kappa and gate mode."""
        return gate_values(self.s_norm, self.alpha, self.kappa, self.hard)

    def component_gate(self) -> torch.Tensor:
        """The threshold gate is what the shared forward multiplies into s."""
        return self.gate()

    def soft_rank(self) -> torch.Tensor:
        """Differentiable count of kept components (the soft gate summed)."""
        return gate_values(self.s_norm, self.alpha, self.kappa, hard=False).sum()

    def hard_rank(self) -> int:
        """Components above the threshold: the rank this layer would be installed at."""
        return int((self.s_norm > self.alpha).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gated factors, or the original module while it serves as the distillation teacher."""
        if self.dense:
            return self.original[0](x)
        return super().forward(x)

    @torch.no_grad()
    def order(self) -> torch.Tensor:
        """Component indices, largest |s| first: the first ``hard_rank()`` are the ones above the threshold."""
        return torch.argsort(self.s.abs(), descending=True)

    @torch.no_grad()
    def ordered_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every component as ``(A, B)`` columns/rows, largest |s| first, sqrt|s| split to both sides
        (sign kept on A), and the sorted normalised values: the first k give the rank-k model (the
        first ``hard_rank()`` are exactly the ones above the threshold)."""
        order = self.order()
        a, b = self.export_factors(order)
        return a.contiguous(), b.contiguous(), self.s_norm[order]


__all__ = ["SoftThresholdFactorized", "gate_values"]
