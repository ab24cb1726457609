"""Plain truncated SVD: minimises ||W - W_k||_F (Eckart-Young)."""

from __future__ import annotations

from typing import Any

import torch

from ..options import Configurable, NoOptions
from .base import Factorization, split_sqrt, thin_svd
from ..registry import register_base


@register_base("svd")
class SVDBase(Configurable):
    name = "svd"
    needs: frozenset[str] = frozenset()
    Options = NoOptions

    def decompose(self, weight: torch.Tensor, stats: dict[str, Any], max_rank: int) -> Factorization:
        w = weight.detach().to(torch.float64)
        u, s, vt = thin_svd(w)
        a, b = split_sqrt(u, s, vt, max_rank)
        return Factorization(a.float(), b.float(), s.float())
