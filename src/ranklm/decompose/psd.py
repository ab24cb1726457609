"""Square-root factors of second-moment matrices (Grams), with an honest record of how.

Whitening (``whiten``) and both Kronecker factors of ``kfac`` need ``L`` with ``L L^T ~= M``
for a symmetric PSD ``M`` that is often rank-deficient (dead channels, duplicated units, fewer
tokens than dimensions). ``psd_factor`` optionally shrinks ``M`` toward its diagonal and adds a
damping relative to its mean diagonal, then tries Cholesky with a jitter grown x10 from 0;
if that never succeeds it falls back to an eigendecomposition with clamped eigenvalues.
Either changes the objective being minimised, so the returned record says what happened
(``method``, ``jitter`` and ``damping`` relative to the mean diagonal, ``shrink``) and the
pipeline writes it to ranklm.json: a silent fallback would hide a changed objective.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RanklmError

EIGH_FLOOR = 1e-6  # eigenvalues clamped to this fraction of the mean diagonal in the eigh fallback
# A negative eigenvalue of a streamed second-moment matrix larger than this fraction of its largest one is
# not round-off (float32 per-batch products lose ~1e-6 relative, stats.py) but a suspect statistic.
MATERIAL_NEGATIVE = 1e-4


def shrink_toward_diagonal(m: torch.Tensor, shrink: float) -> None:
    """In place: ``M <- (1 - shrink) M + shrink diag(M)`` (off-diagonal scaled, diagonal kept).

    Why: a Gram estimated on one domain over-trusts its correlations; shrinking toward the
    diagonal (Ledoit-Wolf style) keeps the per-channel scales and damps cross-channel structure
    that may not transfer out of domain. ``shrink=1`` is column-norm-weighted SVD.
    """
    if shrink <= 0.0:
        return
    d = m.diagonal().clone()
    m.mul_(1.0 - shrink)
    m.diagonal().copy_(d)


def psd_factor(
    mat: torch.Tensor, name: str = "", shrink: float = 0.0, damping: float = 0.0, divisor: float = 1.0
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``L`` with ``L L^T ~= M'`` (M' = M / divisor, shrunk and damped) and a record of the numerics.

    ``divisor`` (a token count: a summed Gram to its mean) is applied to the working copy, so the caller
    never holds a second n x n matrix for the mean (the same values as ``psd_factor(M / divisor)``).

    Returns ``(L, info)``; ``info["method"]`` is ``"cholesky"`` (L lower triangular) or
    ``"eigh"`` (``L = Q sqrt(lam)``, orthogonal times diagonal); ``info["jitter"]`` is the
    diagonal added beyond ``damping`` for Cholesky to succeed, relative to the mean diagonal.
    """
    # One working copy (the caller's Gram may be shared by q/k/v); jitter goes on its diagonal in
    # place, so peak memory is two n x n matrices (copy + factor), not five.
    g = mat.to(torch.float64, copy=True)
    if divisor != 1.0:
        g.div_(divisor)
    if not torch.isfinite(g).all():
        raise RanklmError(f"non-finite calibration statistics (NaN/Inf in the Gram matrix) for {name or 'a target'}")
    shrink_toward_diagonal(g, shrink)
    diag = g.diagonal()
    scale = float(diag.abs().mean()) or 1.0
    info: dict[str, Any] = {"method": "cholesky", "jitter": 0.0}
    if damping > 0.0:
        diag.add_(damping * scale)
        info["damping"] = float(damping)
    if shrink > 0.0:
        info["shrink"] = float(shrink)
    added = 0.0
    for eps in [0.0] + [scale * 10.0**e for e in range(-10, 0)]:
        diag.add_(eps - added)
        added = eps
        chol, status = torch.linalg.cholesky_ex(g)  # reads the lower triangle only
        if int(status) == 0 and bool(torch.isfinite(chol).all()) and float(chol.diagonal().min()) > 0:
            info["jitter"] = added / scale
            return chol, info
        del chol
    diag.sub_(added)
    lam, q = torch.linalg.eigh(g)
    floor = scale * EIGH_FLOOR
    info.update(method="eigh", jitter=0.0, clamped=int((lam < floor).sum()), eigh_floor=EIGH_FLOOR)
    return q * lam.clamp_min(floor).sqrt(), info


def solve_right(L: torch.Tensor, y: torch.Tensor, method: str) -> torch.Tensor:
    """``y L^{-1}`` without forming the inverse (triangular solve for Cholesky factors)."""
    if method == "cholesky":
        return torch.linalg.solve_triangular(L, y, upper=False, left=False)
    return torch.linalg.solve(L, y, left=False)


def solve_left(L: torch.Tensor, x: torch.Tensor, method: str) -> torch.Tensor:
    """``L^{-1} x`` without forming the inverse (triangular solve for Cholesky factors)."""
    if method == "cholesky":
        return torch.linalg.solve_triangular(L, x, upper=False)
    return torch.linalg.solve(L, x)


def solve_left_transposed(L: torch.Tensor, a: torch.Tensor, method: str) -> torch.Tensor:
    """``L^{-T} a`` without forming the inverse."""
    if method == "cholesky":
        return torch.linalg.solve_triangular(L.mT, a, upper=True)
    return torch.linalg.solve(L.mT, a)


def departs(info: dict[str, Any]) -> bool:
    """Whether a factor record departs from plain Cholesky (jitter added, or the eigh fallback).

    kfac's ``"diagonal"`` output factor is a documented approximation chosen by size, not a
    numerical fallback: it departs only if it needed its floor. whiten's ``"output-eigh"`` (output
    side) factors no Gram at all, so it has nothing to regularize; what it clamps and drops is judged
    against the allocated ranks by ``pipeline.output_side_warning``.
    """
    return info.get("method") not in ("cholesky", "diagonal", "output-eigh") or float(info.get("jitter", 0.0)) > 0.0
