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
"""

from __future__ import annotations

import torch
from torch import nn


def gate_values(s_norm: torch.Tensor, alpha: torch.Tensor, kappa: float, hard: bool) -> torch.Tensor:
    """The gate of every component: hard 0/1 with the soft gradient, or the soft gate itself."""
    soft = 0.5 * (1.0 + torch.tanh(kappa * (s_norm - alpha)))
    if not hard:
        return soft
    return (s_norm > alpha).to(soft.dtype) + soft - soft.detach()


class SoftThresholdFactorized(nn.Module):
    """A target as trainable ``U diag(s * gate) V`` (+ the original bias, frozen)."""

    def __init__(self, original: nn.Module, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, alpha: float,
                 in_features: int, out_features: int) -> None:
        super().__init__()
        self.U = nn.Parameter(u.detach().clone())
        self.s = nn.Parameter(s.detach().clone())
        self.V = nn.Parameter(v.detach().clone())
        self.alpha = nn.Parameter(torch.tensor(float(alpha), dtype=u.dtype, device=u.device))
        self.register_buffer("s_max", s.detach().abs().max().clamp_min(1e-30).clone(), persistent=False)
        self.original = [original]  # a list: not a submodule (neither trained nor saved)
        bias = getattr(original, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        self.in_features, self.out_features = in_features, out_features
        self.kappa = 10.0
        self.hard = True
        self.dense = False  # run the original module (distillation teacher)

    @property
    def s_norm(self) -> torch.Tensor:
        return self.s.abs() / self.s_max

    def gate(self) -> torch.Tensor:
        return gate_values(self.s_norm, self.alpha, self.kappa, self.hard)

    def soft_rank(self) -> torch.Tensor:
        """Differentiable count of kept components (the soft gate summed)."""
        return gate_values(self.s_norm, self.alpha, self.kappa, hard=False).sum()

    def hard_rank(self) -> int:
        return int((self.s_norm > self.alpha).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return self.original[0](x)
        h = x @ self.V.t()
        h = h * (self.s * self.gate()).to(h.dtype)
        y = h @ self.U.t()
        if self.bias is not None:
            y = y + self.bias
        return y

    @torch.no_grad()
    def ordered_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every component as ``(A, B)`` columns/rows, largest |s| first, sqrt|s| split to both sides
        (sign kept on A), and the sorted normalised values: the first k give the rank-k model (the
        first ``hard_rank()`` are exactly the ones above the threshold)."""
        order = torch.argsort(self.s.abs(), descending=True)
        s = self.s[order]
        root = s.abs().sqrt()
        a = self.U[:, order] * (root * torch.sign(s))
        b = root[:, None] * self.V[order]
        return a.contiguous(), b.contiguous(), self.s_norm[order]


__all__ = ["SoftThresholdFactorized", "gate_values"]
