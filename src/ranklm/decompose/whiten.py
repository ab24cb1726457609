"""Whitened SVD (SVD-LLM, Wang et al. 2024): minimises ||(W - W_k) X||_F exactly.

With the calibration Gram ``G = X X^T = L L^T``, ``||(W - W') X||_F = ||(W - W') L||_F``,
so the optimum is the truncated SVD of ``W L`` mapped back by ``L^{-1}``. ``L`` is the
Cholesky factor of ``G + eps*I`` with eps grown x10 from 0 until it succeeds; if it
never does, an eigendecomposition with clamped eigenvalues stands in. ``L^{-1}`` is
never formed: B is obtained by a triangular solve.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RanklmError
from ..options import Opt
from .base import Factorization, split_sqrt, thin_svd


def whitening_factor(gram: torch.Tensor, name: str = "") -> tuple[torch.Tensor, str]:
    """``L`` with ``L L^T ~= G``; returns (L, "cholesky") or (Q sqrt(lam), "eigh")."""
    # One working copy (the caller's Gram may be shared by q/k/v); jitter goes on its diagonal in
    # place, so peak memory is two n x n matrices (copy + factor), not five.
    g = gram.to(torch.float64, copy=True)
    if not torch.isfinite(g).all():
        raise RanklmError(f"non-finite calibration statistics (NaN/Inf in the Gram matrix) for {name or 'a target'}")
    diag = g.diagonal()
    scale = float(diag.abs().mean()) or 1.0
    added = 0.0
    for eps in [0.0] + [scale * 10.0**e for e in range(-10, 0)]:
        diag.add_(eps - added)
        added = eps
        chol, info = torch.linalg.cholesky_ex(g)  # reads the lower triangle only
        if int(info) == 0 and bool(torch.isfinite(chol).all()) and float(chol.diagonal().min()) > 0:
            return chol, "cholesky"
        del chol
    diag.sub_(added)
    lam, q = torch.linalg.eigh(g)
    lam = lam.clamp_min(scale * 1e-6)
    return q * lam.sqrt(), "eigh"


class WhitenBase:
    name = "whiten"
    needs: frozenset[str] = frozenset({"gram"})
    OPTIONS: tuple[Opt, ...] = ()

    def decompose(self, weight: torch.Tensor, stats: dict[str, Any], max_rank: int) -> Factorization:
        w = weight.detach().to(torch.float64)
        L, how = whitening_factor(stats["gram"], stats.get("name", ""))
        u, s, vt = thin_svd(w @ L)
        a, y = split_sqrt(u, s, vt, max_rank)  # W L ~= a @ y  =>  W ~= a @ (y L^{-1})
        if how == "cholesky":
            b = torch.linalg.solve_triangular(L, y, upper=False, left=False)
        else:  # L = Q sqrt(lam) is orthogonal times diagonal: L^{-1} = diag(1/sqrt(lam)) Q^T
            b = torch.linalg.solve(L, y, left=False)
        return Factorization(a.float(), b.float(), s.float())
