"""TFWSVD (Hua et al. 2022, "Numerical Optimizations for Weighted Low-rank Estimation").

Minimises the per-element Fisher-weighted error ``sum_ij F_ij (W - A B)_ij^2``, which
has no closed form, numerically: start from FWSVD's factors, run Adam for
``adam_steps`` then plain SGD with momentum for ``sgd_steps`` (the paper's hybrid),
full batch, float32, and return the best iterate seen, so the result is never
worse than its FWSVD start.

Ranks: the optimum at rank k is not a prefix of the optimum at rank k+1, so the
decomposition step returns FWSVD's ordered components (their spectrum drives the
allocator), and ``refine`` then solves once per target at exactly the rank the
allocator chose. Solving at every candidate rank would multiply the cost by the
number of ranks; solving once at the largest rank and truncating would lose the
optimality the method exists for.

Step sizes are scale-free: Adam's lr is multiplied by the RMS of the starting
factors; SGD's step is ``sgd_lr / L`` with L an upper bound of the gradient's
Lipschitz constant for the normalised objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RanklmError
from ..options import opt
from .base import Factorization, thin_svd
from .fwsvd import FWSVDBase, FWSVDOptions
from ..registry import register_base


def weighted_error(fisher: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``sum F (W - approx)^2`` in float64."""
    return float((fisher.double() * (weight.double() - approx.double()).square()).sum())


@dataclass(frozen=True)
class TFWSVDOptions(FWSVDOptions):
    adam_steps: int = opt(100, "Adam steps of the per-target refinement (first phase)")
    sgd_steps: int = opt(50, "SGD-with-momentum steps after Adam (second phase)")
    adam_lr: float = opt(1e-3, "Adam learning rate, relative to the RMS of the starting factors")
    sgd_lr: float = opt(0.5, "SGD step as a fraction of 1/L (L: Lipschitz bound of the gradient)")
    device: str | None = opt(None, "torch device for the refinement, e.g. cuda [default: the weight's device]")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adam_steps < 0 or self.sgd_steps < 0:
            raise RanklmError("tfwsvd adam_steps and sgd_steps must be >= 0")


@register_base("tfwsvd")
class TFWSVDBase(FWSVDBase):
    name = "tfwsvd"
    Options = TFWSVDOptions

    def __init__(self, options: TFWSVDOptions | None = None, /, **given: Any) -> None:
        super().__init__(options, **given)
        self.report: dict[str, dict[str, float]] = {}

    def refine(
        self, weight: torch.Tensor, stats: dict[str, Any], start: Factorization, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(self.device) if self.device else weight.device
        w = weight.detach().to(device=device, dtype=torch.float32)
        f = stats["fisher"].to(device=device, dtype=torch.float32)
        fn = f / f.mean().clamp_min(1e-30)  # normalised weights: same optimum, sane scale
        a0, b0 = (t.to(device=device, dtype=torch.float32) for t in start.factors(k))
        a = a0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True)
        numel = w.numel()

        def objective() -> torch.Tensor:
            return (fn * (w - a @ b).square()).sum() / numel

        with torch.no_grad():
            start_loss = float(objective())
        best_loss, best = start_loss, (a0.clone(), b0.clone())

        def run(opt: torch.optim.Optimizer, steps: int) -> None:
            nonlocal best_loss, best
            for step in range(steps + 1):
                opt.zero_grad(set_to_none=True)
                loss = objective()
                value = loss.item()
                if value < best_loss:
                    best_loss, best = value, (a.detach().clone(), b.detach().clone())
                if step == steps:
                    break
                loss.backward()
                opt.step()

        rms = float(torch.cat([a0.flatten(), b0.flatten()]).square().mean().sqrt()) or 1.0
        run(torch.optim.Adam([a, b], lr=self.adam_lr * rms), self.adam_steps)
        with torch.no_grad():  # SGD continues from the best Adam iterate
            a.copy_(best[0])
            b.copy_(best[1])
            lip = 2.0 * float(fn.max()) * float(
                torch.linalg.matrix_norm(a, 2) ** 2 + torch.linalg.matrix_norm(b, 2) ** 2
            ) / numel
        run(torch.optim.SGD([a, b], lr=self.sgd_lr / max(lip, 1e-30), momentum=0.9), self.sgd_steps)
        with torch.no_grad():
            a_best, b_best = best
            final = best_loss
            svd_u, svd_s, svd_vt = thin_svd(w.double())
            svd_k = (svd_u[:, :k] * svd_s[:k]) @ svd_vt[:k]
            scale = float(f.mean())
            self.report[stats.get("name", f"#{len(self.report)}")] = {
                "rank": k,
                "weighted_error_svd": weighted_error(f, w, svd_k),
                "weighted_error_fwsvd": start_loss * numel * scale,
                "weighted_error_tfwsvd": final * numel * scale,
            }
        return a_best.detach().cpu().float(), b_best.detach().cpu().float()
