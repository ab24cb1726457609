"""Kronecker-factored Fisher SVD (``kfac``): curvature on both sides of W.

GFWSVD (Chekalina et al. 2025, "Generalized Fisher-Weighted SVD: Scalable Kronecker-Factored
Fisher Approximation") and KFAC-SVD (ICML 2026) approximate the Fisher of a target W (out x in)
by ``A ⊗ G`` with ``A = E[x x^T]`` (the input Gram that whitening uses) and ``G = E[g g^T]``,
``g = dL/dy`` at the target's output per token (``calibration.output_grads``). The loss increase
of replacing W by W' is then about ``½ ||L_G^T (W − W') L_A||_F²`` with ``A = L_A L_A^T`` and
``G = L_G L_G^T``, so the truncated SVD of ``M = L_G^T W L_A`` is its optimum and each discarded
component's ``½σ_i²`` estimates its loss increase (in mean per-token loss: A and G are means),
comparable across targets (``loss_scale = ½``, read by the ``global`` allocator).
Factors for rank k: ``A_k = L_G^{-T} U_k √Σ_k``, ``B_k = √Σ_k V_k^T L_A^{-1}`` by triangular solves.

Numerics: each factor gets ``damping`` × its mean diagonal (= trace / size) before Cholesky;
jitter beyond that, or the eigh fallback, is recorded per target (``meta["numerics"]``: the
input side at the top level, the output side under ``"output"``). ``shrink`` moves both
factors toward their diagonals as for ``whiten``. Wide outputs (``out > DENSE_OUT_MAX``) carry
only the diagonal of G (recorded as ``method: "diagonal"``): the objective then weights output
rows instead of a full output metric. Defaults, measured (SmolLM2, kfac-global at keep 0.8, 32 x 512
calibration; benchmarks/README.md §1b): damping 1e-6 / shrink 0 give 28.78 on held-out speeches and
83.51 on *Hamlet*; damping 1e-2 gives 28.65 / 80.04 and shrink 0.2 29.25 / 76.04 (better out of
domain, worse in domain). The defaults stay (small gains, one keep ratio). With ``G = I`` and no
damping this base is exactly ``whiten``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RanklmError
from ..options import Configurable, MethodOptions, opt
from .base import Factorization, split_sqrt, thin_svd
from .psd import psd_factor, solve_left_transposed, solve_right
from .whiten import check_fraction
from ..registry import register_base


def diagonal_factor(sq: torch.Tensor, damping: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """``sqrt(diag(G) + damping·mean)`` for a diagonal G; zero entries get a recorded 1e-10 floor."""
    d = sq.to(torch.float64)
    scale = float(d.mean()) or 1.0
    d = d + damping * scale
    floor = 1e-10 * scale
    info: dict[str, Any] = {"method": "diagonal", "jitter": floor / scale if bool((d < floor).any()) else 0.0}
    if damping > 0:
        info["damping"] = float(damping)
    return d.clamp_min(floor).sqrt(), info


@dataclass(frozen=True)
class KFACOptions(MethodOptions):
    damping: float = opt(1e-6, "added to each factor's diagonal, relative to its mean diagonal (trace/size)",
                         bounds=(0.0, 1e6))
    shrink: float = opt(0.0, "shrink both factors toward their diagonals, (1-λ)F + λ diag(F) (provisional default)",
                        bounds=(0.0, 1.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damping >= 0.0:
            raise RanklmError(f"kfac damping must be >= 0, got {self.damping}")
        check_fraction("kfac shrink", self.shrink)


@register_base("kfac")
class KFACBase(Configurable):
    name = "kfac"
    needs: frozenset[str] = frozenset({"gram", "out_gram"})
    loss_scale: float | None = 0.5  # ½σ² ≈ increase of the mean per-token loss
    Options = KFACOptions

    def decompose(self, weight: torch.Tensor, stats: dict[str, Any], max_rank: int) -> Factorization:
        name = stats.get("name", "")
        w = weight.detach().to(torch.float64)
        # the means are taken on psd_factor's working copy: no second in x in matrix (0.5 GB at in = 8192)
        L_a, info_a = psd_factor(stats["gram"], name, shrink=self.shrink, damping=self.damping,
                                 divisor=max(int(stats.get("tokens", 1)), 1))
        out_tokens = max(int(stats.get("out_tokens", 1)), 1)
        if "out_gram" in stats:
            L_g, info_g = psd_factor(stats["out_gram"], name, shrink=self.shrink, damping=self.damping, divisor=out_tokens)
            m = L_g.mT @ w @ L_a
        else:
            d_g, info_g = diagonal_factor(stats["out_sq"] / out_tokens, self.damping)
            m = d_g[:, None] * (w @ L_a)
        u, s, vt = thin_svd(m)
        a, y = split_sqrt(u, s, vt, max_rank)  # M ~= a @ y  =>  W ~= (L_G^{-T} a) @ (y L_A^{-1})
        a = solve_left_transposed(L_g, a, info_g["method"]) if "out_gram" in stats else a / d_g[:, None]
        b = solve_right(L_a, y, info_a["method"])
        meta = {"numerics": {**info_a, "output": info_g}, "loss_scale": self.loss_scale}
        probe = getattr(self, "quant_probe", None)  # set by the pipeline for --quantize with --budget-bytes
        if probe is not None:
            from .quant_loss import quantization_losses

            out_metric = (lambda x: L_g.mT @ x) if "out_gram" in stats else (lambda x: d_g[:, None] * x)
            meta["quant_loss"] = quantization_losses(w, m, a, b, out_metric, lambda y: y @ L_a, probe.bits,
                                                     probe.group_size, float(self.loss_scale))
        return Factorization(a.float(), b.float(), s.float(), meta=meta)
