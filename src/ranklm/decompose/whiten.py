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

Targets with ``out <= in`` (a down projection, GQA k/v, square q/o) are factored from the
*output* side when their statistics hold ``"out_cov"`` (``C = W G W^T``, the covariance of
``W x``; the sequential pipeline collects it for them, see ``factors_from_output``): the best
rank-k approximation of ``W X`` is ``U_k U_k^T W X`` with ``U_k`` the top eigenvectors of ``C``
(Eckart-Young; its row space lies in that of ``X``), so ``W_k = U_k U_k^T W`` is the same optimum
as the whitened SVD, and ``eig(C) = σ²(W L)`` gives the same spectrum, from an ``out x out``
eigendecomposition instead of an ``in x in`` Gram, its Cholesky, the SVD of ``W L`` and a
triangular solve. Negative eigenvalues (round-off) are clamped to 0 and directions with
``σ <= 1e-6 σ_1`` get a zero ``B`` row; both are counted in the numerics record
(``output_side_record``), and the CLI warns when the allocated rank reaches such directions.

Loss estimates: each discarded σ_i² is exactly its contribution to ``||(W - W_k) X||_F²``
(squared output error summed over calibration tokens), so ``loss_scale = 1``; comparable
across targets as output errors, not as LM loss (the ``global`` allocator accepts it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RanklmError
from ..options import Configurable, MethodOptions, opt
from ..targets import Target
from .base import Factorization, split_sqrt, thin_svd
from .psd import psd_factor, solve_right
from ..registry import register_base


DEAD_SIGMA = 1e-6  # output-side directions with σ <= DEAD_SIGMA·σ_1 get B = 0 (no output energy to fit)


def output_side_record(lam: torch.Tensor, s: torch.Tensor) -> dict[str, Any]:
    """What the output-side route did to a target's output covariance (eigenvalues ``lam``, ``s = sqrt(max(lam, 0))``).

    - ``clamped``: eigenvalues below 0 set to 0, ``clamped_rel`` the largest of them in magnitude
      relative to the largest eigenvalue (σ² scale; round-off of the float32 per-batch products is
      ~1e-6, so only values past ``psd.MATERIAL_NEGATIVE`` are warned about);
    - ``dropped``: directions with ``σ <= DEAD_SIGMA·σ_1`` (clamped ones included), which get a zero
      ``B`` row; ``live_rank = out − dropped`` is the largest rank whose every direction carries
      output energy. An allocated rank above it is warned about (``pipeline.output_side_warning``).
    """
    top = float(lam.abs().max()) if lam.numel() else 0.0  # the largest eigenvalue, unless none is positive
    negative = lam[lam < 0]
    dead = int((s <= s[:1] * DEAD_SIGMA).sum()) if s.numel() else 0
    return {
        "method": "output-eigh", "jitter": 0.0,
        "clamped": int(negative.numel()),
        "clamped_rel": float(-negative.min()) / top if negative.numel() and top > 0 else 0.0,
        "dropped": dead, "live_rank": int(s.numel()) - dead,
    }


def whitening_factor(gram: torch.Tensor, name: str = "", shrink: float = 0.0) -> tuple[torch.Tensor, str]:
    """``L`` with ``L L^T ~= G``; returns (L, "cholesky") or (Q sqrt(lam), "eigh")."""
    L, info = psd_factor(gram, name, shrink=shrink)
    return L, info["method"]


def check_fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise RanklmError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


@dataclass(frozen=True)
class WhitenOptions(MethodOptions):
    shrink: float = opt(0.0, "shrink the Gram toward its diagonal, (1-λ)G + λ diag(G) "
                        "(0 = SVD-LLM, 1 = column-norm-weighted SVD; provisional default, not yet measured)",
                        bounds=(0.0, 1.0))
    output_side: bool = opt(True, "factor targets with out <= in from their output covariance: the same "
                            "optimum from an out x out eigendecomposition (sequential calibration; not with shrink)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("whiten shrink", self.shrink)


@register_base("whiten")
class WhitenBase(Configurable):
    name = "whiten"
    needs: frozenset[str] = frozenset({"gram"})
    loss_scale: float | None = 1.0  # discarded sigma^2 = its exact output-error contribution
    Options = WhitenOptions

    def factors_from_output(self, target: Target) -> bool:
        """Whether calibration should give ``target`` its output covariance instead of its input Gram."""
        return self.output_side and self.shrink == 0.0 and target.out_features <= target.in_features

    def decompose(self, weight: torch.Tensor, stats: dict[str, Any], max_rank: int) -> Factorization:
        if "out_cov" in stats:
            return self._decompose_from_output(weight, stats["out_cov"], max_rank)
        w = weight.detach().to(torch.float64)
        L, info = psd_factor(stats["gram"], stats.get("name", ""), shrink=self.shrink)
        u, s, vt = thin_svd(w @ L)
        a, y = split_sqrt(u, s, vt, max_rank)  # W L ~= a @ y  =>  W ~= a @ (y L^{-1})
        b = solve_right(L, y, info["method"])
        return Factorization(a.float(), b.float(), s.float(), meta={"numerics": info, "loss_scale": self.loss_scale})

    def _decompose_from_output(self, weight: torch.Tensor, cov: torch.Tensor, max_rank: int) -> Factorization:
        """``W_k = U_k U_k^T W`` with ``U`` the eigenvectors of the output covariance (module docstring)."""
        w = weight.detach().to(torch.float64)
        lam, u = torch.linalg.eigh(cov.to(device=w.device, dtype=torch.float64))
        lam, u = lam.flip(0), u.flip(1)  # descending, like singular values
        s = lam.clamp_min(0).sqrt()
        k = min(max_rank, u.shape[1])
        root = s[:k].sqrt()
        # balanced factors U_k sqrt(S) and sqrt(S)^-1 U_k^T W (= sqrt(S) V_k^T L^-1 of the whitened SVD), so
        # A / sqrt(s) stays U (SoftLMs reparametrises that way). A direction without output energy on the
        # calibration data (σ <= 1e-6 σ_1, below what float32 products resolve) gets B = 0: it changes
        # nothing the data can see, and dividing by its root would blow B up.
        live = s[:k] > s[:1] * DEAD_SIGMA
        a = u[:, :k] * root
        b = torch.where(live[:, None], (u[:, :k].mT @ w) / torch.where(live, root, 1.0)[:, None], 0.0)
        info = output_side_record(lam, s)
        return Factorization(a.float(), b.float(), s.float(), meta={"numerics": info, "loss_scale": self.loss_scale})
