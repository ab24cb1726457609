"""Joint rank x bit-width allocation under a byte budget (docs/design.md §11; issue 29).

Each target chooses one option: dense at b bits, or factored at rank k with b-bit factors, for b in the
allowed widths (``--quantize int2,int3,int4``). Its estimated loss increase comes from the kfac base on one
scale for both errors (``decompose/quant_loss.py``: truncation and quantization of the factors together, or
quantization of the dense weight); its price is its bytes as stored (``quantize/sizes.py``). Minimising the
summed loss with the summed bytes within the budget is a multiple-choice knapsack, solved exactly by
``scipy.optimize.milp`` (HiGHS) after each target's options are cut to their Pareto front (an option with
more bytes and no less loss than another can never be in an optimum).

Candidate ranks: multiples of ``rank_step`` (8 by default) plus the largest factored rank; each one's loss
is priced exactly for the layer it installs (decompose/quant_loss.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..budget import DENSE
from ..decompose.base import Factorization
from ..errors import RanklmError
from .knapsack import solver_output_to_stderr
from ..quantize.sizes import factored_bytes, quantized_bytes
from ..quantize.spec import QuantSpec
from ..targets import Target


RANK_STEP = 8  # candidate ranks: multiples of this (GEMM-friendly ranks, and fewer options for the MILP)


@dataclass(frozen=True)
class Option:
    rank: Any  # int, or DENSE
    bits: int
    bytes: int
    loss: float


def target_options(t: Target, f: Factorization, spec: QuantSpec, rank_step: int, min_rank: int = 1) -> list[Option]:
    """Every (rank or dense, bits) choice of ``t`` on its Pareto front (fewest bytes first)."""
    ql = f.meta.get("quant_loss")
    if ql is None:
        raise RanklmError(f"the joint allocator needs quantization-loss estimates for {t.name}; only the kfac base "
                          "provides them (kfac-global, the default recipe)")
    m, n, g, kmax = t.out_features, t.in_features, spec.group_size, f.max_rank
    ranks = sorted({k for k in range(rank_step, kmax + 1, rank_step) if k >= min_rank} | ({kmax} if kmax >= 1 else set()))
    opts = []
    for b in spec.bits:
        opts.append(Option(DENSE, b, quantized_bytes(m, n, b, g), float(ql["dense"][b])))
        curve = ql["factored"][b]
        opts += [Option(k, b, factored_bytes(m, n, k, b, g, None), float(curve[k])) for k in ranks]
    return pareto(opts)


def pareto(opts: list[Option]) -> list[Option]:
    """Options not dominated (no other has at most its bytes and strictly less loss, or fewer bytes and equal loss)."""
    front: list[Option] = []
    for o in sorted(opts, key=lambda o: (o.bytes, o.loss)):
        if not front or o.loss < front[-1].loss:
            front.append(o)
    return front


def solve_joint(options: list[list[Option]], budget: float, time_limit: float = 120.0) -> tuple[list[int], dict[str, Any]]:
    """Index of the chosen option per target: least summed loss with summed bytes <= ``budget`` (exact MILP)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    smallest = sum(min(o.bytes for o in opts) for opts in options)
    if smallest > budget:
        raise RanklmError(f"byte budget {budget:,.0f} cannot be met: the smallest choice of every target (fewest "
                          f"bits, lowest rank) needs {smallest:,} bytes; allow fewer bits (--quantize) or a larger "
                          "--budget-bytes")
    rows, cols, loss, size = [], [], [], []
    for r, opts in enumerate(options):
        base = min(o.loss for o in opts)
        for o in opts:
            rows.append(r)
            cols.append(len(loss))
            loss.append(o.loss - base)  # shifted per target: the same argmin, a better-scaled objective
            size.append(float(o.bytes))
    n = len(loss)
    scale = max(max(loss), 1e-300)
    choose = coo_matrix((np.ones(n), (rows, cols)), shape=(len(options), n))
    t0 = time.perf_counter()
    with solver_output_to_stderr():
        res = milp(c=np.asarray(loss) / scale, integrality=np.ones(n), bounds=Bounds(np.zeros(n), np.ones(n)),
                   constraints=[LinearConstraint(choose, 1.0, 1.0),
                                LinearConstraint(np.asarray(size)[None, :], -np.inf, float(budget))],
                   options={"time_limit": float(time_limit), "mip_rel_gap": 1e-9})
    info = {"status": int(res.status), "message": str(res.message), "candidates": n,
            "milp_seconds": round(time.perf_counter() - t0, 3), "proven": int(res.status) == 0}
    if res.x is None:
        raise RanklmError(f"joint allocator: the MILP found no solution ({res.message})")
    x = np.round(res.x)
    chosen, i = [], 0
    for opts in options:
        picked = [j for j in range(len(opts)) if x[i + j] > 0.5]
        chosen.append(picked[0])
        i += len(opts)
    return chosen, info


def joint_allocate(targets: list[Target], factorizations: dict[str, Factorization], spec: QuantSpec, budget: float,
                   min_rank: int = 1, rank_step: int | None = None, time_limit: float = 120.0
                   ) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    """(rank map, bits map, record) for a byte budget over the targets."""
    step = int(rank_step or RANK_STEP)
    options = [target_options(t, factorizations[t.name], spec, step, min_rank) for t in targets]
    chosen, info = solve_joint(options, budget, time_limit)
    picks = [opts[j] for opts, j in zip(options, chosen)]
    rank_map = {t.name: o.rank for t, o in zip(targets, picks)}
    bits = {t.name: o.bits for t, o in zip(targets, picks)}
    total = sum(o.bytes for o in picks)
    widths = {f"int{b}": {"dense": sum(1 for o in picks if o.bits == b and o.rank == DENSE),
                          "factored": sum(1 for o in picks if o.bits == b and o.rank != DENSE)} for b in spec.bits}
    record = {"budget_bytes": float(budget), "bytes_planned": int(total), "budget_used": total / budget,
              "loss_estimate": float(sum(o.loss for o in picks)), "rank_step": step, "widths": widths, **info}
    return rank_map, bits, record
