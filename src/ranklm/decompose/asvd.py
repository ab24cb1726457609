"""Activation-aware SVD (ASVD, Yuan et al. 2023).

Input channels that carry large activations matter more: scale the columns of W by
``S = diag(mean_t |x_{t,i}|^alpha)`` (alpha = 0.5 by default), truncate the SVD of
``W S`` and undo the scaling on B: ``A = U_k sqrt(S_k)``, ``B = sqrt(S_k) V_k^T S^{-1}``.
Dead channels get a floor of 1e-6 of the mean scale so S stays invertible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..options import Configurable, MethodOptions, opt
from .base import Factorization, split_sqrt, thin_svd
from ..registry import register_base


@dataclass(frozen=True)
class ASVDOptions(MethodOptions):
    alpha: float = opt(0.5, "exponent of the activation scaling S = mean|x|^alpha (0 = plain SVD)")


@register_base("asvd")
class ASVDBase(Configurable):
    name = "asvd"
    needs: frozenset[str] = frozenset({"abs_mean"})
    Options = ASVDOptions

    def scales(self, abs_mean: torch.Tensor) -> torch.Tensor:
        s = abs_mean.to(torch.float64).clamp_min(0) ** self.alpha
        return s.clamp_min(float(s.mean()) * 1e-6 or 1e-12)

    def decompose(self, weight: torch.Tensor, stats: dict[str, Any], max_rank: int) -> Factorization:
        w = weight.detach().to(torch.float64)
        scale = self.scales(stats["abs_mean"])
        u, s, vt = thin_svd(w * scale[None, :])
        a, b = split_sqrt(u, s, vt, max_rank)
        return Factorization(a.float(), (b / scale[None, :]).float(), s.float())
