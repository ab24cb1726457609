"""Stage 7: the CompressionState a run records, and the warning lines that read it."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..budget import (
    DENSE,
    RankMap,
    keep_ratio,
    model_keep_ratio,
    model_params,
    targets_cost,
    targets_dense_params,
)
from .plan import Plan
from ..state import CompressionState
from ..targets import Target


def _factor_records(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A target's numerics record as (side, factor record) pairs: the input side, and kfac's output side."""
    out = [("input", record)] if "method" in record else []
    return out + [(side, record[side]) for side in ("output",) if isinstance(record.get(side), dict)]


def numerics_warning(state: CompressionState) -> str | None:
    """One ``warning:`` line when any target's Gram needed jitter or the eigh fallback (else None)."""
    from ..decompose.psd import departs

    record = (state.artifacts or {}).get("numerics") or {}
    bad = [(name, side, r) for name, rec in record.items() for side, r in _factor_records(rec) if departs(r)]
    if not bad:
        return None
    eigh = [b for b in bad if b[2].get("method") == "eigh"]
    names = {b[0] for b in bad}
    if eigh:
        name, side, _ = eigh[0]
        worst = f"eigh fallback at {name} ({side}), {len(eigh)} factor(s) in all"
    else:
        name, side, r = max(bad, key=lambda b: float(b[2].get("jitter", 0.0)))
        worst = f"worst jitter {float(r['jitter']):.1e} x mean diagonal at {name} ({side})"
    return (f"warning: {len(names)} of {len(record)} targets needed jitter or eigh to factor their Gram "
            f"(their objective was changed to make it factorable); {worst}; see artifacts.numerics in ranklm.json")


def output_side_warning(state: CompressionState) -> str | None:
    """One ``warning:`` line when whiten's output side had to drop directions the allocated ranks use (else None).

    The output-side route (``output-eigh``, decompose/whiten.py) clamps negative eigenvalues of the
    output covariance to 0 and gives every direction with ``σ <= 1e-6 σ_1`` a zero ``B`` row. Both
    are recorded per target. Tiny negatives are round-off and are only recorded; what is material:
    an allocated rank above the target's ``live_rank`` (ranks spent on directions that carry no
    output energy on the calibration data: too few or too uniform calibration tokens), or a
    negative eigenvalue larger than round-off explains (``psd.MATERIAL_NEGATIVE``: the statistic
    itself is suspect).
    """
    from ..decompose.psd import MATERIAL_NEGATIVE

    record = (state.artifacts or {}).get("numerics") or {}
    rank_map = state.rank_map or {}
    wasted, negative = [], []
    for name, r in record.items():
        if r.get("method") != "output-eigh":
            continue
        k = rank_map.get(name)
        if "live_rank" in r and k not in (None, DENSE) and int(k) > int(r["live_rank"]):
            wasted.append((name, int(k) - int(r["live_rank"]), int(k)))
        if float(r.get("clamped_rel", 0.0)) > MATERIAL_NEGATIVE:
            negative.append((name, float(r["clamped_rel"])))
    if not wasted and not negative:
        return None
    parts = []
    if wasted:
        name, n, k = max(wasted, key=lambda w: w[1])
        parts.append(f"{len(wasted)} targets were allocated ranks past the directions their calibration outputs "
                     f"carry (sigma <= 1e-6 sigma_1: factors set to zero), worst {name}: {n} of {k} ranks; "
                     "use more (or more varied) calibration data")
    if negative:
        name, rel = max(negative, key=lambda w: w[1])
        parts.append(f"{len(negative)} output covariances had negative eigenvalues beyond round-off "
                     f"(worst {name}: -{rel:.1e} x the largest)")
    return "warning: whiten (output side): " + "; ".join(parts) + "; see artifacts.numerics in ranklm.json"


def knapsack_warning(state: CompressionState) -> str | None:
    """One ``warning:`` line when the global allocator's exact knapsack did not give a proven optimum (else None)."""
    rec = (state.artifacts or {}).get("global") or {}
    if rec.get("solver") != "milp" or rec.get("exact_proven", True):
        return None
    used = rec.get("loss_exact") if rec.get("chosen") == "exact" else rec.get("loss_greedy")
    bound = rec.get("loss_lower_bound")
    numbers = ""
    if used is not None and bound is not None:
        numbers = f"; estimated dropped loss {used:.4g} (lower bound {bound:.4g})"
    hint = " (raise --alloc-opt time_limit=SECONDS)" if int(rec.get("milp_status", -1)) == 1 else ""
    return (f"warning: global allocator: {rec.get('fallback', 'no proven optimum')}{hint}{numbers}; "
            "see artifacts.global in ranklm.json")


def sensitivity_warning(state: CompressionState) -> str | None:
    """One ``warning:`` line when the sensitivity table held non-finite perplexities (else None)."""
    rec = (state.artifacts or {}).get("sensitivity") or {}
    bad = rec.get("non_finite") or []
    if not bad:
        return None
    first = bad[0]
    return (f"warning: sensitivity: {len(bad)} perplexity measurement(s) were not finite and counted as "
            f"log-perplexity {rec.get('non_finite_logppl', 700.0):g}, first {first['target']} at ratio {first['ratio']:g}; "
            "see artifacts.sensitivity.non_finite in ranklm.json")


def run_warnings(state: CompressionState) -> list[str]:
    """Every ``warning:`` line about how a run's numerics or solvers departed from the plan, in a fixed order."""
    lines = [f(state) for f in (numerics_warning, output_side_warning, knapsack_warning, sensitivity_warning)]
    return [ln for ln in lines if ln]


def compression_state(
    model: nn.Module, plan: Plan, targets: list[Target], rank_map: RankMap, dense_model: int,
    calibration: dict[str, Any] | None, base_model: dict[str, Any], timings: dict[str, float], artifacts: dict[str, Any],
    training: list[dict[str, Any]] | None = None,
) -> CompressionState:
    """What ``model`` (rank map installed) records about its compression: ratios, parameter counts, provenance."""
    return CompressionState(
        config=plan.record(),  # to_dict() plus each axis's typed options (config.config_from_recipe reads it back)
        method=plan.method,
        targets=targets,
        rank_map=rank_map,
        keep_requested=plan.budget.keep,
        keep_achieved=keep_ratio(targets, rank_map),
        keep_achieved_model=model_keep_ratio(dense_model, targets, rank_map),
        params={
            "targets_dense": targets_dense_params(targets),
            "targets_compressed": targets_cost(targets, rank_map),
            "model_dense": dense_model,
            "model_compressed": model_params(model),
        },
        calibration=calibration,
        base_model=base_model,
        timings=timings,
        artifacts=artifacts,
        training=list(training or []),
    )


def learning_summary(state: CompressionState) -> list[str]:
    """One line per training run: what it reached on its own, and a warning when it missed the budget."""
    lines = []
    for r in state.training:
        if "keep_learned" in r:
            line = (f"{r['trainer']}: learned keep {r['keep_learned']:.4f} (target {r.get('keep_requested', state.keep_requested):.4f}), "
                    f"after the exact fit {r.get('keep_after_fit', state.keep_achieved):.4f}")
            if "prefix_fraction" in r:
                line += f"; top-k prefix masks {r['prefix_fraction']:.0%}"
            lines.append(line)
            if not r.get("reached_budget", True):
                lines.append(f"warning: {r['trainer']} did not learn the budget on its own (learned keep {r['keep_learned']:.4f} "
                             f"vs {r.get('keep_requested', state.keep_requested):.4f}); the final exact fit moved the ranks")
        elif r.get("final_loss") is not None:
            line = (f"{r['trainer']}: {r.get('steps_run', r.get('steps'))} steps, "
                    f"loss {r.get('first_loss', float('nan')):.4f} -> {r['final_loss']:.4f}")
            val = r.get("validation")
            if isinstance(val, dict) and val.get("start"):  # a trainer that validated (heal)
                line += (f"; validation {val['monitor']} {val['start'][val['monitor']]:.4f} -> best {val['best']:.4f} "
                         f"at step {val['best_step']}" + (", stopped early" if r.get("stopped_early") else ""))
            lines.append(line)
    return lines
