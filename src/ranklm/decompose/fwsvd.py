"""Fisher-weighted SVD (FWSVD, Hsu et al. 2022).

Minimises ``||D (W - W_k)||_F`` with ``D = diag(sqrt(sum_j F_ij))`` (rows, the
paper's choice, ``side="out"``) or ``||(W - W_k) C||_F`` with
``C = diag(sqrt(sum_i F_ij))`` (columns, ``side="in"``). Either is an exact
truncated SVD in the weighted space; zero-Fisher rows/columns get a small floor
weight (1e-6 of the mean) so the transform stays invertible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RanklmError
from ..options import Configurable, MethodOptions, opt
from .base import Factorization, split_sqrt, thin_svd
from ..registry import register_base

SIDES = ("out", "in")


def fisher_weights(fisher: torch.Tensor, side: str) -> torch.Tensor:
    f = fisher.to(torch.float64)
    d = f.sum(dim=1 if side == "out" else 0).clamp_min(0).sqrt()
    floor = float(d.mean()) * 1e-6 or 1e-12
    return d.clamp_min(floor)


@dataclass(frozen=True)
class FWSVDOptions(MethodOptions):
    side: str = opt("out", "Fisher-weight the rows (out, the paper's) or the columns (in)", choices=SIDES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.side not in SIDES:
            raise RanklmError(f"unknown Fisher side {self.side!r}; valid: {', '.join(SIDES)}")


@register_base("fwsvd")
class FWSVDBase(Configurable):
    name = "fwsvd"
    needs: frozenset[str] = frozenset({"fisher"})
    Options = FWSVDOptions

    def decompose(self, weight: torch.Tensor, stats: dict[str, Any], max_rank: int) -> Factorization:
        w = weight.detach().to(torch.float64)
        d = fisher_weights(stats["fisher"], self.side)
        if self.side == "out":
            u, s, vt = thin_svd(d[:, None] * w)
            a, b = split_sqrt(u, s, vt, max_rank)
            a = a / d[:, None]
        else:
            u, s, vt = thin_svd(w * d[None, :])
            a, b = split_sqrt(u, s, vt, max_rank)
            b = b / d[None, :]
        return Factorization(a.float(), b.float(), s.float())
