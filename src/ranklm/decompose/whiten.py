"""Whitened SVD (SVD-LLM, Wang et al. 2024): minimises ||(W - W_k) X||_F exactly.

With the calibration Gram ``G = X X^T = L L^T``, ``||(W - W') X||_F = ||(W - W') L||_F``,
so the optimum is the truncated SVD of ``W L`` mapped back by ``L^{-1}``. ``L`` comes from
``psd.psd_factor``: Cholesky of ``G + eps*I`` with eps grown x10 from 0 until it succeeds,
else an eigendecomposition with clamped eigenvalues; what it needed is recorded per target
(``Factorization.meta["numerics"]`` -> ranklm.json ``artifacts["numerics"]``). ``L^{-1}`` is
never formed: B is obtained by a triangular solve.

``shrink=λ`` factors ``(1-λ) G + λ diag(G)`` instead (robust calibration: cross-channel
correlations measured on one domain may not transfer to another). λ = 0 (the default) is
SVD-LLM; λ = 1 is column-norm-weighted SVD. The default is provisional: it is to be chosen
from measurements in domain and on *Hamlet* (issue 13), not yet made.

Loss estimates: each discarded σ_i² is exactly its contribution to ``||(W - W_k) X||_F²``
(squared output error summed over calibration tokens), so ``loss_scale = 1``; comparable
across targets as output errors, not as LM loss (the ``global`` allocator accepts it).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RanklmError
from ..options import Opt
from .base import Factorization, split_sqrt, thin_svd
from .psd import psd_factor, solve_right


def whitening_factor(gram: torch.Tensor, name: str = "", shrink: float = 0.0) -> tuple[torch.Tensor, str]:
    """``L`` with ``L L^T ~= G``; returns (L, "cholesky") or (Q sqrt(lam), "eigh")."""
    L, info = psd_factor(gram, name, shrink=shrink)
    return L, info["method"]


def check_fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise RanklmError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


class WhitenBase:
    name = "whiten"
    needs: frozenset[str] = frozenset({"gram"})
    loss_scale: float | None = 1.0  # discarded sigma^2 = its exact output-error contribution
    OPTIONS: tuple[Opt, ...] = (
        Opt("shrink", float, 0.0, "shrink the Gram toward its diagonal, (1-λ)G + λ diag(G) "
            "(0 = SVD-LLM, 1 = column-norm-weighted SVD; provisional default, not yet measured)", bounds=(0.0, 1.0)),
    )

    def __init__(self, shrink: float = 0.0) -> None:
        self.shrink = check_fraction("whiten shrink", shrink)

    def decompose(self, weight: torch.Tensor, stats: dict[str, Any], max_rank: int) -> Factorization:
        w = weight.detach().to(torch.float64)
        L, info = psd_factor(stats["gram"], stats.get("name", ""), shrink=self.shrink)
        u, s, vt = thin_svd(w @ L)
        a, y = split_sqrt(u, s, vt, max_rank)  # W L ~= a @ y  =>  W ~= a @ (y L^{-1})
        b = solve_right(L, y, info["method"])
        return Factorization(a.float(), b.float(), s.float(), meta={"numerics": info, "loss_scale": self.loss_scale})
