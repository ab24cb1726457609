"""The gated low-rank layer every learning method trains through (docs/design.md §3, §5).

While ARS, SoftLMs or RankDyna learn, a target is replaced by ``GatedFactorized``:
``x -> ((x V^T) * (s * g)) U^T + bias`` with ``U`` (out x r), ``s`` (r), ``V`` (r x in) and a
gate ``g`` over the r components. One class holds the factors, the forward and the export to
plain ``LowRankLinear``, so the three methods differ only where they really do, in the gate:

* ARS (``train.masks.MaskedFactorized``): a binary mask set before each forward; ``s`` is
  folded into the base's frozen ``A``, ``B`` (``s=None``);
* SoftLMs (``train.soft_threshold.SoftThresholdFactorized``): a hard/soft threshold on
  ``s / s_max``, U, s, V trained;
* RankDyna (``allocate.rankdyna.DynaFactorized``): a 0/1 triplet mask with a gradient.

``export_factors(index)`` turns the chosen components into ``(A, B)`` (``A[:, :k] @ B[:k]``
the rank-k model) with the subclass's ``split`` of ``s`` between the sides: ``"sqrt"`` puts
``sqrt|s|`` on both (sign on A), ``"left"`` all of ``s`` on A. The pipeline installs such
factors with ``LowRankLinear.from_factors``; ``to_low_rank`` does the same for one layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import LowRankLinear


def split_factors(u: torch.Tensor, s: torch.Tensor | None, v: torch.Tensor, index: torch.Tensor | None = None,
                  split: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of components ``index`` (all if None) of ``U diag(s) V``; one rule for every gated layer's export."""
    if index is not None:
        u, v = u[:, index], v[index]
        s = None if s is None else s[index]
    if s is None:
        return u, v
    if split == "sqrt":
        root = s.abs().sqrt()
        return u * (root * torch.sign(s)), root[:, None] * v
    if split == "left":
        return u * s, v
    raise ValueError(f"unknown split {split!r}")


class GatedFactorized(nn.Module):
    """A target as ``U diag(s * gate) V`` (+ bias); subclasses supply ``component_gate``."""

    split = "left"  # how export_factors places s: "left" (on A) or "sqrt" (both sides, sign on A)

    def __init__(self, u: torch.Tensor, s: torch.Tensor | None, v: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out_features: int, trainable: bool = True, share_bias: bool = False) -> None:
        super().__init__()
        if trainable:  # fresh trainable copies of the initial factors
            self.U = nn.Parameter(u.detach().clone())
            self.s = None if s is None else nn.Parameter(s.detach().clone())
            self.V = nn.Parameter(v.detach().clone())
        else:  # frozen factors, not saved with the model (they are rebuilt from the base)
            self.register_buffer("U", u.detach(), persistent=False)
            self.register_buffer("s", None if s is None else s.detach(), persistent=False)
            self.register_buffer("V", v.detach(), persistent=False)
        if share_bias:  # the original module's Parameter, trained in place with the rest of the model
            self.bias = bias
        else:
            self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        self.in_features, self.out_features = in_features, out_features

    @property
    def rank(self) -> int:
        """Number of components the gate ranges over (the largest rank this layer can export)."""
        return int(self.U.shape[1])

    def component_gate(self) -> torch.Tensor | None:
        """The gate over the components for this forward (None: every component fully on)."""
        return None

    def coefficients(self) -> torch.Tensor | None:
        """What multiplies each component in the forward: ``s * gate`` (None when both are absent)."""
        g = self.component_gate()
        if self.s is None:
            return g
        return self.s if g is None else self.s * g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two thin GEMMs with the gated coefficients between them (never the dense product)."""
        h = x @ self.V.t()
        c = self.coefficients()
        if c is not None:
            h = h * c.to(h.dtype)
        y = h @ self.U.t()
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def export_factors(self, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the components ``index`` in that order (all if None), ungated: what gets installed."""
        return split_factors(self.U.detach(), None if self.s is None else self.s.detach(), self.V.detach(), index,
                             self.split)

    @torch.no_grad()
    def to_low_rank(self, original: nn.Module, index: torch.Tensor | None = None) -> LowRankLinear:
        """A plain ``LowRankLinear`` of the components ``index`` (dtype, device, bias and kind of ``original``)."""
        a, b = self.export_factors(index)
        return LowRankLinear.from_factors(original, a, b)


__all__ = ["GatedFactorized", "split_factors"]
