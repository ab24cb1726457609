"""Building blocks for learning masks over factorized components (docs/design.md §5, ARS).

``MaskedFactorized`` stands in for a target ``nn.Linear``/``Conv1D`` while masks
are learned: ``x -> ((x @ B^T) * m) @ A^T + bias`` where ``A`` (out x r) and
``B`` (r x in) are a base's factors (``A[:, :k] @ B[:k]`` is its best rank-k
approximation) and ``m`` (length r) switches components on and off. Since every
base splits ``s`` into A and B, this is ``U diag(m * s) V`` with the base's
transform undone. It is the shared ``train.gated.GatedFactorized`` with ``U = A``,
``V = B``, ``s`` folded in and the mask as its gate; the factors are buffers:
nothing of the model is trained.

``HyperNetwork`` generates all masks' logits from fixed random inputs (one per
target, sampled once from the seed, never trained): Bi-GRU over the sequence of
targets -> LayerNorm -> GeLU -> one linear head per target.

``gumbel_sigmoid_mask`` is the straight-through binary mask
``round(sigmoid((o + g + b) / tau))``. The noise ``g`` is the difference of two
Gumbel samples (= logistic noise, ``log u - log(1 - u)``), the usual
Gumbel-sigmoid/binary-concrete choice; the forward value is the hard 0/1 mask,
the gradient that of the soft sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gated import GatedFactorized


class MaskedFactorized(GatedFactorized):
    """A target replaced by its factors with a component mask (set ``.mask`` before each forward)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int):
        super().__init__(a, None, b, bias, in_features, out_features, trainable=False)
        self.mask: torch.Tensor | None = None  # length r; None = all components

    @property
    def A(self) -> torch.Tensor:
        """The base's A (out x r), under its old name."""
        return self.U

    @property
    def B(self) -> torch.Tensor:
        """The base's B (r x in), under its old name."""
        return self.V

    def component_gate(self) -> torch.Tensor | None:
        """The mask of this step (ARS sets it from the hypernetwork before the forward)."""
        return self.mask


class HyperNetwork(nn.Module):
    """Fixed random z (one per target) -> Bi-GRU -> LayerNorm -> GeLU -> per-target linear heads."""

    def __init__(self, ranks: list[int], input_dim: int = 32, hidden: int = 64):
        super().__init__()
        self.ranks = list(ranks)
        self.register_buffer("z", torch.randn(len(ranks), input_dim))
        self.gru = nn.GRU(input_dim, hidden, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(2 * hidden)
        self.heads = nn.ModuleList(nn.Linear(2 * hidden, r) for r in ranks)

    def forward(self) -> list[torch.Tensor]:
        h, _ = self.gru(self.z[None])
        h = F.gelu(self.norm(h[0]))
        return [head(h[i]) for i, head in enumerate(self.heads)]


def logistic_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """g = Gumbel1 - Gumbel2 = log u - log(1 - u), u ~ U(0, 1)."""
    u = torch.rand(shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    return u.log() - (-u).log1p()


def gumbel_sigmoid_mask(
    logits: torch.Tensor, tau: float, bias: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through mask: (value = hard 0/1 with the soft gradient, soft probabilities)."""
    z = logits + bias if noise is None else logits + noise + bias
    soft = torch.sigmoid(z / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach(), soft


def is_prefix(mask: torch.Tensor) -> bool:
    """True when a 0/1 mask is ones then zeros (keeps exactly the top components)."""
    m = mask.detach() > 0.5
    k = int(m.sum())
    return bool(m[:k].all())


def prefix_fraction(masks: list[torch.Tensor]) -> float:
    """Share of masks that are top-k prefixes (ARS reports it: a fit that reorders is visible)."""
    return sum(is_prefix(m) for m in masks) / max(len(masks), 1)


__all__ = ["HyperNetwork", "MaskedFactorized", "gumbel_sigmoid_mask", "is_prefix", "logistic_noise", "prefix_fraction"]
