"""Loss-based global allocation (``--allocator global``; docs/design.md §5; issue 13).

Every candidate component i of every target t has an estimated loss increase if dropped,
``c·σ_{t,i}²``, and a parameter cost ``m+n``; the last step of a target, to dense, costs
``m·n − K(m+n)`` (K = the largest factored rank, §2's dense-threshold rule) and is worth
all of its remaining components. Keeping a top-k prefix of each target, choose the steps
that minimise the total estimated loss of what is dropped, subject to the budget
``Σ cost ≤ keep · Σ m·n``: a 0/1 knapsack with per-target prefix constraints, solved
exactly by ``scipy.optimize.milp`` (HiGHS). The greedy order (best loss per parameter
first, ``budget.fit_budget``) is solved too; both objectives are recorded in
``artifacts["global"]`` and the better map is used (greedy only if the MILP fails or
times out with a worse incumbent). ``fit_budget`` is applied last so the §2 rules
(≤ keep, within 0.5 %) hold as for every allocator.

When the exact solve was asked for but the map used is not a proven optimum (the MILP failed
and greedy was used, or it stopped at its time limit and its incumbent was used), the record
says so (``"exact_proven": False``, ``"fallback"``: why) with a lower bound on the dropped
loss (``loss_lower_bound``, from the Lagrangian bound), and ``pipeline.knapsack_warning``
turns it into one ``warning:`` line.

Which bases qualify — those whose σ² estimate loss comparably **across** targets
(declared by the base as ``loss_scale`` c, stamped in ``Factorization.meta``):

- ``kfac``: c = ½, ½σ² of ``G^{1/2} W A^{1/2}`` ≈ increase of the mean per-token loss
  (Kronecker-factored Fisher; GFWSVD / KFAC-SVD's LEMS use this estimate).
- ``whiten``: c = 1, σ² = the exact increase of ``||(W − W')X||²`` (summed squared output
  error). Comparable as output errors, not as loss: later blocks' outputs are larger
  (the residual stream grows), so it favours them — the ``loss`` allocator's greedy mode
  measured the same starving of early blocks on SmolLM2 (benchmarks/README.md).
- refused (one error line): ``svd`` (weight-space error, scale differs per matrix),
  ``asvd`` (activation scaling by an arbitrary power), ``fwsvd``/``tfwsvd`` (row-summed
  Fisher weights: a diagonal surrogate whose σ² are not a loss estimate).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..budget import DENSE, RankMap, budget_params, fit_budget, max_factored_rank, targets_cost
from ..decompose.base import Factorization
from ..errors import RanklmError
from ..options import Configurable, MethodOptions, opt
from ..targets import Target
from .base import AllocationContext
from ..registry import register_allocator

COMPARABLE_BASES = ("kfac", "whiten")


def loss_values(targets: list[Target], factorizations: dict[str, Factorization]) -> dict[str, np.ndarray]:
    """Per target the estimated loss ``c·σ_i²`` of each component (float64), or one error line."""
    out = {}
    for t in targets:
        f = factorizations[t.name]
        scale = f.meta.get("loss_scale")
        if scale is None:
            raise RanklmError(
                f"the global allocator needs a base whose spectra estimate loss comparably across targets "
                f"({', '.join(COMPARABLE_BASES)}); {t.name}'s base provides none"
            )
        out[t.name] = float(scale) * f.s.detach().double().cpu().square().numpy()  # spectra may sit on a GPU
    return out


def dropped_loss(targets: list[Target], values: dict[str, np.ndarray], rank_map: RankMap) -> float:
    """Total estimated loss of the components a rank map drops (dense targets drop none)."""
    total = 0.0
    for t in targets:
        r = rank_map[t.name]
        if r != DENSE and int(r) <= max_factored_rank(t):
            total += float(values[t.name][int(r):].sum())
    return total


def step_value(values: np.ndarray, t: Target, k: int) -> float:
    """Worth of the step that adds component k (k == K: the step to dense, all that is left)."""
    kmax = max_factored_rank(t)
    return float(values[k:].sum()) if k >= kmax else float(values[k])


@dataclass
class TargetChoices:
    """One target's choices: rank k in [floor, K] (cost k(m+n)) or dense (cost m·n), with the loss kept."""

    ranks: list  # int ranks, then DENSE
    cost: np.ndarray
    kept: np.ndarray  # estimated loss of the components kept (prefix sums; dense keeps all)


def target_options(t: Target, values: np.ndarray, floor: int) -> TargetChoices:
    kmax, step = max_factored_rank(t), t.out_features + t.in_features
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    ks = np.arange(floor, kmax + 1)
    return TargetChoices(
        ranks=[int(k) for k in ks] + [DENSE],
        cost=np.append(ks * step, t.dense_params).astype(np.float64),
        kept=np.append(prefix[np.minimum(ks, len(values))], prefix[-1]),
    )


def lagrangian_bound(opts: list[TargetChoices], budget: float, iters: int = 200) -> tuple[float, float]:
    """``min_λ λB + Σ_t max_j (kept − λ cost)``: an upper bound on the kept loss of any feasible map.

    L(λ) is convex and piecewise linear; bisection on its subgradient ``B − Σ cost(argmax)``
    (in log λ) finds the minimum to float precision. Returns (bound, λ at the bound).
    """
    def evaluate(lam: float) -> tuple[float, float]:
        total, cost = lam * budget, 0.0
        for o in opts:
            score = o.kept - lam * o.cost
            j = int(np.argmax(score))
            total += float(score[j])
            cost += float(o.cost[j])
        return total, cost

    hi = max(float(np.max(np.diff(o.kept) / np.maximum(np.diff(o.cost), 1e-300))) if len(o.cost) > 1 else 0.0 for o in opts)
    hi = max(hi, 1e-300) * 2.0
    lo = hi * 1e-40
    best = min((evaluate(x)[0], x) for x in (lo, hi))
    for _ in range(iters):
        mid = float(np.sqrt(lo * hi))
        value, cost = evaluate(mid)
        best = min(best, (value, mid))
        if cost > budget:
            lo = mid  # too generous: raise the price
        else:
            hi = mid
    return best


@contextmanager
def solver_output_to_stderr() -> Iterator[None]:
    """HiGHS (scipy's MILP solver) can print from C++ to file descriptor 1 even with ``disp`` off (measured: a
    line per new incumbent on a Qwen2.5-0.5B shape), which would corrupt ``--json`` on stdout: send fd 1 to
    stderr while it runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def solve_exact(
    targets: list[Target], values: dict[str, np.ndarray], budget: int, floors: dict[str, int],
    incumbent: RankMap, time_limit: float,
) -> tuple[RankMap | None, dict[str, Any]]:
    """The exact knapsack: one option per target, total cost within the budget, most loss kept.

    Lagrangian reduction first (exact): with bound ``UB = L(λ)`` and the incumbent's kept loss
    ``LB``, an option whose score ``kept − λ cost`` is more than ``UB − LB`` below its target's
    best cannot belong to a map better than the incumbent, so it is removed. The few options
    left (near each target's margin, and its dense step) go to ``scipy.optimize.milp``
    (multiple-choice knapsack, one binary per option), objective rescaled by the gap.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    opts = [target_options(t, values[t.name], floors[t.name]) for t in targets]
    upper, lam = lagrangian_bound(opts, float(budget))
    lower = sum(float(o.kept[o.ranks.index(_as_option(t, incumbent[t.name]))]) for t, o in zip(targets, opts))
    gap = max(upper - lower, 0.0)
    tol = 1e-12 * max(abs(upper), 1e-300)
    kept_idx: list[list[int]] = []
    for t, o in zip(targets, opts):
        score = o.kept - lam * o.cost
        keep = set(np.flatnonzero(score >= score.max() - gap - tol).tolist())
        keep.add(o.ranks.index(_as_option(t, incumbent[t.name])))
        kept_idx.append(sorted(keep))
    n = sum(len(k) for k in kept_idx)
    info: dict[str, Any] = {"lagrangian_bound": upper, "lagrangian_lambda": lam, "candidates": n,
                            "candidates_all": int(sum(len(o.ranks) for o in opts))}
    gains, costs, rows, cols = [], [], [], []
    for r, (o, idx) in enumerate(zip(opts, kept_idx)):
        base = float(o.kept[idx[0]])
        for j in idx:
            rows.append(r)
            cols.append(len(gains))
            gains.append((float(o.kept[j]) - base) / max(gap, tol, 1e-300))
            costs.append(float(o.cost[j]))
    choose = coo_matrix((np.ones(n), (rows, cols)), shape=(len(opts), n))
    with solver_output_to_stderr():
        res = milp(
            c=-np.asarray(gains), integrality=np.ones(n), bounds=Bounds(np.zeros(n), np.ones(n)),
            constraints=[LinearConstraint(choose, 1.0, 1.0),
                         LinearConstraint(np.asarray(costs)[None, :], -np.inf, float(budget))],
            options={"time_limit": float(time_limit), "mip_rel_gap": 1e-9},
        )
    info.update(status=int(res.status), message=str(res.message))
    if getattr(res, "mip_gap", None) is not None and np.isfinite(res.mip_gap):
        info["gap"] = float(res.mip_gap)  # HiGHS's relative gap (of the rescaled objective) when it stopped
    if res.x is None:
        return None, info
    x = np.round(res.x)
    rank_map: RankMap = {}
    flat = [(t, o, j) for t, o, idx in zip(targets, opts, kept_idx) for j in idx]
    for (t, o, j), xi in zip(flat, x):
        if xi > 0.5:
            rank_map[t.name] = o.ranks[j]
    return rank_map, info


def _as_option(t: Target, rank) -> Any:
    """A rank map value as an option label: ranks past the break-even point are dense."""
    return DENSE if rank == DENSE or int(rank) > max_factored_rank(t) else int(rank)


@dataclass(frozen=True)
class GlobalOptions(MethodOptions):
    solver: str = opt("milp", "milp: exact knapsack (scipy HiGHS); greedy: best loss per parameter first",
                      choices=("milp", "greedy"))
    time_limit: float = opt(120.0, "seconds the MILP may take; its best solution then, or greedy if better",
                            bounds=(0.1, 1e6))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in ("milp", "greedy"):
            raise RanklmError(f"unknown global-allocator solver {self.solver!r}; valid: milp, greedy")


@register_allocator("global")
class GlobalAllocator(Configurable):
    name = "global"
    needs_context = False
    needs_loss_estimates = True  # refused with bases that declare no loss_scale (CompressConfig)
    Options = GlobalOptions

    def allocate(
        self,
        targets: list[Target],
        factorizations: dict[str, Factorization],
        keep: float,
        min_rank: int = 1,
        context: AllocationContext | None = None,
    ) -> RankMap:
        values = loss_values(targets, factorizations)
        floors = {t.name: min(min_rank, max_factored_rank(t)) for t in targets}

        def priority(t: Target, k: int) -> float:
            return step_value(values[t.name], t, k)

        greedy = fit_budget(targets, dict(floors), keep, priority, min_rank)
        record: dict[str, Any] = {"solver": self.solver, "loss_greedy": dropped_loss(targets, values, greedy),
                                  "loss_scale": float(next(iter(factorizations.values())).meta["loss_scale"])}
        chosen, rank_map = "greedy", greedy
        if self.solver == "milp":
            t0 = time.perf_counter()
            exact, info = solve_exact(targets, values, budget_params(targets, keep), floors, greedy, self.time_limit)
            record.update(milp_seconds=round(time.perf_counter() - t0, 3), time_limit=self.time_limit,
                          **{f"milp_{k}": v for k, v in info.items()})
            total = float(sum(v.sum() for v in values.values()))
            record["loss_lower_bound"] = max(total - float(info["lagrangian_bound"]), 0.0)
            if exact is not None:
                # Same rules as every allocator; a no-op on an optimum (any step that still fits would add value).
                exact = fit_budget(targets, exact, keep, priority, min_rank)
                record["loss_exact"] = dropped_loss(targets, values, exact)
                if record["loss_exact"] <= record["loss_greedy"]:
                    chosen, rank_map = "exact", exact
            # status 0 = optimal (scipy.optimize.milp); anything else is at best an unproven incumbent
            record["exact_proven"] = chosen == "exact" and info["status"] == 0
            if not record["exact_proven"]:
                if exact is None:
                    record["fallback"] = f"the MILP returned no solution ({info['message']}): greedy map used"
                elif chosen == "greedy":
                    record["fallback"] = (f"the MILP's solution was worse than greedy ({info['message']}): "
                                          "greedy map used")
                else:
                    record["fallback"] = f"the MILP stopped before proving optimality ({info['message']}): its incumbent used"
        record.update(chosen=chosen, params=targets_cost(targets, rank_map))
        if context is not None:
            context.artifacts["global"] = record
        self.record = record
        return rank_map
