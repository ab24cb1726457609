"""The compression pipeline, written once (docs/design.md §1 "One pipeline").

``run(model, tokenizer, config, data)`` is the only place that sequences the stages;
``ranklm compress``, ``ranklm bench``, ``ranklm.compress`` and every script in
``benchmarks/`` drive it:

1. **prepare** — targets, input checks, calibration windows and their description;
2. **statistics + factorize** (pass 1) — every target's ordered components from its
   base. Whole-model statistics, or block by block with dense propagation (the same
   factorizations, memory ~ one block's statistics). Skipped when the allocator reads
   only shapes (``uniform``) and the refit pass factors anyway;
3. **allocate** — the rank map, by any allocator; learning allocators (ARS) train here
   on the shared loop and may hand back trained factors;
4. **refit** — block by block with *compressed* propagation: each block is factored
   again on the activations of the already-compressed blocks before it, at the
   allocated ranks (SVD-LLM's update; measured best way to build the factors), then
   installed. Without it: the base's ``refine`` at the allocated ranks (TFWSVD), then
   install. Trained factors from stage 3 are installed as they are (neither refit nor
   refine touches them);
5. **install** — ``LowRankLinear`` for every factored target;
6. **train** — the trainer of the training axis (``--trainer finetune``), on the loop;
7. **record** — the ``CompressionState`` saved in ranklm.json (incl. the training records).

Which statistics mode runs is a driver choice (``config.sequential``/``propagate``),
not a separate code path per caller: ``bench`` runs each cell through ``run`` with a
``FactorCache`` that shares pass-1 results between cells, so a bench cell is exactly
what ``compress`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocate import AllocationContext, get_allocator
from .budget import DENSE, TOLERANCE, RankMap, keep_ratio, max_factored_rank, meets_budget, model_keep_ratio, model_params
from .budget import latency_dense_rule, round_ranks, targets_cost, targets_dense_params
from .calibration import TextSource, collect_stats, default_corpus, read_text_source, token_windows
from .config import CompressConfig
from .decompose import Base, Factorization, get_base
from .errors import RanklmError
from .layers import LowRankLinear, replace_module
from .models import onload_offloaded
from .state import CompressionState
from .targets import Target, find_targets, weight_matrix

Data = Union[None, str, os.PathLike, TextSource, list, torch.Tensor]
ACTIVATION_NEEDS = frozenset({"gram", "abs_mean"})


# --------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """The three axes built from a config, and how statistics are gathered."""

    base: Base
    allocator: Any
    trainer: Any | None
    sequential: bool  # statistics block by block (dense propagation for pass 1)
    refit: bool  # re-factor block by block on compressed activations at the allocated ranks

    @property
    def needs_windows(self) -> bool:
        return bool(self.base.needs) or bool(getattr(self.allocator, "needs_context", False)) or self.trainer is not None

    @property
    def needs_pass1(self) -> bool:
        return not self.refit or bool(getattr(self.allocator, "needs_spectra", True))


def make_plan(config: CompressConfig) -> Plan:
    """Build base, allocator and trainer (options validated) and choose the statistics mode.

    Activation-statistics bases (whiten, asvd) calibrate block by block by default, with
    compressed propagation (measured: SmolLM2 keep 0.6, 117.8 vs 152.5 perplexity);
    Fisher bases need end-to-end gradients and run whole-model; ``--whole-model`` opts out.
    """
    from .train import get_trainer

    base = get_base(config.base, **config.base_options)
    allocator = get_allocator(config.allocator, **config.allocator_options)
    trainer = None if config.trainer in (None, "none") else get_trainer(config.trainer, **config.trainer_options)
    activation_only = bool(base.needs) and set(base.needs) <= ACTIVATION_NEEDS
    if config.sequential and base.needs and not activation_only:
        raise RanklmError(
            f"--sequential works with activation-statistics bases (whiten, asvd); {base.name} needs end-to-end "
            "gradients (Fisher): drop --sequential"
        )
    sequential = activation_only and (config.sequential is None or bool(config.sequential))
    return Plan(base, allocator, trainer, sequential, sequential and config.propagate == "compressed")


# --------------------------------------------------------------------------- stage 1: data


def calibration_windows(tokenizer, data: Data, config: CompressConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token windows for calibration from any supported data form, plus a description."""
    if isinstance(data, torch.Tensor):
        windows = data[: config.calib_windows]
        return windows, {"source": "token ids given by the caller", "windows": len(windows), "seq_len": int(windows.shape[1])}
    if tokenizer is None:
        raise RanklmError("tokenizer missing: calibration text cannot be tokenized without one")
    if data is None or (isinstance(data, str) and data == "default"):
        source = default_corpus()[0]
    elif isinstance(data, TextSource):
        source = data
    elif isinstance(data, list):
        source = TextSource(f"{len(data)} in-memory documents", [str(d) for d in data])
    else:
        source = read_text_source(data)
    windows = token_windows(tokenizer, source, config.seq_len, config.calib_windows, seed=config.seed, strict=False)
    return windows, calibration_info(source.description, windows, config)


def calibration_info(description: str, windows: torch.Tensor, config: CompressConfig) -> dict[str, Any]:
    """What ranklm.json records about the calibration data."""
    return {
        "source": description,
        "windows": int(len(windows)),
        "seq_len": int(windows.shape[1]),
        "tokens": int(windows.numel()),
        "requested_windows": config.calib_windows,
        "selection": f"seeded random choice (seed {config.seed}) of non-overlapping windows",
    }


def check_finite_weights(model: nn.Module, targets: list[Target]) -> None:
    for t in targets:
        if not torch.isfinite(weight_matrix(model.get_submodule(t.name))).all():
            raise RanklmError(f"non-finite weights (NaN/Inf) in {t.name}")


def windows_sha256(windows: torch.Tensor | None) -> str | None:
    return None if windows is None else hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------- stage 2: statistics + factorize


def _on_device(stats: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One target's statistics (kept in CPU memory) moved next to its weight for the factorization."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in stats.items()}


def decompose_targets(
    model: nn.Module, targets: list[Target], base: Base, stats: dict[str, dict], progress: bool = True
) -> dict[str, Factorization]:
    """Factorize every target; each target's statistics are released as soon as it is done."""
    out: dict[str, Factorization] = {}
    for t in tqdm(targets, desc=f"decompose ({base.name})", disable=not progress, unit="matrix"):
        w = weight_matrix(model.get_submodule(t.name))
        st = _on_device(stats.pop(t.name, {"name": t.name}), w.device)
        out[t.name] = base.decompose(w, st, max_factored_rank(t))
    return out


def _sequential_pass(
    model: nn.Module, targets: list[Target], base: Base, windows: torch.Tensor, batch_size: int, progress: bool,
    on_block: Callable[[list[Target], dict[str, Factorization], dict[str, dict]], None], desc: str,
    seconds: dict[str, float] | None = None,
) -> None:
    from .calibration.sequential import run_sequential

    def block(b: int, block_targets: list[Target], stats: dict[str, dict]) -> None:
        keep = {n: dict(s) for n, s in stats.items()} if hasattr(base, "refine") else {}
        on_block(block_targets, decompose_targets(model, block_targets, base, stats, progress=False), keep)

    run_sequential(model, targets, windows, base.needs, block, batch_size, progress, desc=desc,
                   by_output=getattr(base, "factors_from_output", None), seconds=seconds)


class FactorCache:
    """Pass-1 results shared by several runs on the same dense model and windows (``bench``).

    Whole-model statistics are collected once per kind (activation, Fisher); each base's
    factorizations once per statistics mode. ``compress`` uses a private one.
    """

    def __init__(self, model: nn.Module, targets: list[Target], windows: torch.Tensor | None, batch_size: int,
                 fisher_windows: int, progress: bool = True, loss_fn: Any = None) -> None:
        self.model, self.targets, self.windows = model, targets, windows
        self.loss_fn = loss_fn  # Fisher's loss: a task Objective for encoders (None: the LM loss)
        self.batch_size, self.fisher_windows, self.progress = batch_size, fisher_windows, progress
        self.stats: dict[str, dict] = {t.name: {"name": t.name} for t in targets}
        self.collected: set[str] = set()
        self.seconds: dict[str, float] = {}  # "act"/"fisher"/"<base>:<mode>" -> seconds
        self._facs: dict[tuple[str, bool], dict[str, Factorization]] = {}

    def _collect(self, needs: frozenset[str]) -> None:
        kinds = (("act", set(needs) & ACTIVATION_NEEDS), ("fisher", set(needs) & {"fisher"}),
                 ("out_gram", set(needs) & {"out_gram"}))
        for kind, want in kinds:
            if not want or kind in self.collected:
                continue
            t0 = time.perf_counter()
            st = collect_stats(self.model, self.targets, self.windows, want,
                               self.batch_size, self.progress, fisher_windows=self.fisher_windows, loss_fn=self.loss_fn)
            for name, entry in st.items():
                self.stats[name].update(entry)
            self.collected.add(kind)
            self.seconds[kind] = time.perf_counter() - t0

    def factorizations(self, base: Base, sequential: bool) -> dict[str, Factorization]:
        key = (base.name, sequential)
        if key not in self._facs:
            t0 = time.perf_counter()
            if sequential:
                facs: dict[str, Factorization] = {}
                _sequential_pass(self.model, self.targets, base, self.windows, self.batch_size, self.progress,
                                 lambda bt, f, _s: facs.update(f), desc="statistics (block by block)")
            else:
                if base.needs:
                    self._collect(base.needs)
                facs = decompose_targets(self.model, self.targets, base, {n: dict(s) for n, s in self.stats.items()}, self.progress)
            self._facs[key] = facs
            self.seconds[f"{base.name}:{'sequential' if sequential else 'whole'}"] = time.perf_counter() - t0
        return self._facs[key]

    def stats_for_refine(self, base: Base) -> dict[str, dict]:
        if base.needs:
            self._collect(base.needs)
        return self.stats

    def release(self, base_name: str) -> None:
        for key in [k for k in self._facs if k[0] == base_name]:
            del self._facs[key]


# --------------------------------------------------------------------------- stages 3-5: allocate, refit, install


def allocate_ranks(allocator, targets, factorizations, config: CompressConfig, context: AllocationContext) -> RankMap:
    """``allocator.allocate`` with an unreachable budget reported as a user error."""
    try:
        return allocator.allocate(targets, factorizations, config.keep, config.min_rank, context)
    except ValueError as e:
        raise RanklmError(f"keep ratio {config.keep} cannot be met: {e}") from None


def adjusted_rank_map(targets: list[Target], rank_map: RankMap, config: CompressConfig,
                      context: AllocationContext) -> RankMap:
    """The allocated rank map after ``config.max_flop_ratio`` (budget.latency_dense_rule), then ``config.round_to``
    (budget.round_ranks, under the rule's ceilings); either failure is one error line naming its option."""
    steps = [("--max-flop-ratio", config.max_flop_ratio, config.max_flop_ratio < 1.0,
              lambda m: latency_dense_rule(targets, m, config.keep, config.max_flop_ratio, config.round_to)),
             ("--round-to", config.round_to, config.round_to > 1,
              lambda m: round_ranks(targets, m, config.keep, config.round_to, config.max_flop_ratio))]
    for flag, value, active, adjust in steps:
        if not active:
            continue
        if context.trained_factors is not None:
            raise RanklmError(f"{flag} does not apply to the {config.allocator} allocator: it trains factors at its own ranks")
        try:
            rank_map = adjust(rank_map)
        except ValueError as e:
            raise RanklmError(f"keep ratio {config.keep} with {flag} {value}: {e}") from None
    return rank_map


def install_rank_map(
    model: nn.Module, targets: list[Target], factorizations: dict[str, Factorization], rank_map: RankMap
) -> None:
    """Swap every factored target for a LowRankLinear of its rank; dense ones stay as they are."""
    for t in targets:
        rank = rank_map[t.name]
        if rank == DENSE:
            continue
        a, b = factorizations[t.name].factors(int(rank))
        replace_module(model, t.name, LowRankLinear.from_factors(model.get_submodule(t.name), a, b))


def install_factors(model: nn.Module, targets: list[Target], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    rank_map: RankMap) -> None:
    """Install trained ``(A, B)`` pairs as they are (their rank must be the rank map's)."""
    for t in targets:
        rank = rank_map[t.name]
        if rank == DENSE:
            continue
        a, b = factors[t.name]
        if a.shape[1] != int(rank) or b.shape[0] != int(rank):
            raise RanklmError(f"trained factors of {t.name} have rank {a.shape[1]}, the rank map says {rank}")
        replace_module(model, t.name, LowRankLinear.from_factors(model.get_submodule(t.name), a, b))


def refine_factors(
    model: nn.Module, targets: list[Target], base: Base, factorizations: dict[str, Factorization],
    stats: dict[str, dict], rank_map: RankMap, progress: bool = True,
) -> dict[str, Factorization]:
    """Let a base re-solve each factored target at exactly its allocated rank (non-nested optima: TFWSVD)."""
    out = dict(factorizations)
    todo = [t for t in targets if rank_map[t.name] != DENSE]
    for t in tqdm(todo, desc=f"refine ({base.name})", disable=not progress, unit="matrix"):
        w = weight_matrix(model.get_submodule(t.name))
        k = int(rank_map[t.name])
        a, b = base.refine(w, _on_device(stats.get(t.name, {}), w.device), out[t.name], k)  # type: ignore[attr-defined]
        out[t.name] = Factorization(a, b, out[t.name].s, meta=out[t.name].meta)
    return out


def refit_sequential(model: nn.Module, targets: list[Target], base: Base, windows: torch.Tensor, rank_map: RankMap,
                     batch_size: int, progress: bool, numerics: dict[str, Any] | None = None,
                     seconds: dict[str, float] | None = None) -> None:
    """Stage 4: block by block on compressed activations, factor again at the allocated ranks and install.

    ``numerics`` (if given) is updated with the refit factorizations' records: those are the installed ones.
    ``seconds`` (if given) gets the pass's split (``run_sequential``).
    """

    def on_block(block_targets: list[Target], facs: dict[str, Factorization], stats: dict[str, dict]) -> None:
        block_map = {t.name: rank_map[t.name] for t in block_targets}
        if numerics is not None:
            numerics.update(numerics_records(facs))
        if hasattr(base, "refine"):
            facs = refine_factors(model, block_targets, base, facs, stats, block_map, progress=False)
        install_rank_map(model, block_targets, facs, block_map)

    _sequential_pass(model, targets, base, windows, batch_size, progress, on_block, desc="refit (block by block)",
                     seconds=seconds)


# --------------------------------------------------------------------------- stage 7: record


def numerics_records(factorizations: dict[str, Factorization]) -> dict[str, Any]:
    """``{target: meta["numerics"]}`` of the bases that factor a Gram (whiten, kfac)."""
    return {n: f.meta["numerics"] for n, f in factorizations.items() if "numerics" in f.meta}


def _factor_records(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A target's numerics record as (side, factor record) pairs: the input side, and kfac's output side."""
    out = [("input", record)] if "method" in record else []
    return out + [(side, record[side]) for side in ("output",) if isinstance(record.get(side), dict)]


def numerics_warning(state: CompressionState) -> str | None:
    """One ``warning:`` line when any target's Gram needed jitter or the eigh fallback (else None)."""
    from .decompose.psd import departs

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
    from .decompose.psd import MATERIAL_NEGATIVE

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
    model: nn.Module, config: CompressConfig, targets: list[Target], rank_map: RankMap, dense_model: int,
    calibration: dict[str, Any] | None, base_model: dict[str, Any], timings: dict[str, float], artifacts: dict[str, Any],
    training: list[dict[str, Any]] | None = None,
) -> CompressionState:
    """What ``model`` (rank map installed) records about its compression: ratios, parameter counts, provenance."""
    return CompressionState(
        config=config.to_dict(),
        method=config.method,
        targets=targets,
        rank_map=rank_map,
        keep_requested=config.keep,
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


# --------------------------------------------------------------------------- the pipeline


def run(
    model: nn.Module,
    tokenizer=None,
    config: CompressConfig | None = None,
    data: Data = None,
    progress: bool = True,
    base_model: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    cache: FactorCache | None = None,
    objective: Any = None,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    save_every: int = 50,
) -> nn.Module:
    """Compress ``model`` in place to ``config.keep`` of its targets' parameters; returns it.

    ``data``: None for the packaged corpus's calibration part, a path, a list of strings, a
    ``TextSource`` or a ``[N, seq_len]`` tensor of token ids (``calibration`` then describes
    it). ``cache`` shares pass-1 statistics/factorizations between runs on copies of the same
    dense model (bench). ``objective`` (a ``train.Objective``) replaces the default training
    loss of learning allocators and trainers. ``state_dir`` keeps resumable training state.
    """
    config = (config or CompressConfig()).for_model(model)
    # 1. prepare
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise RanklmError("this model is already compressed by ranklm (it has LowRankLinear layers)")
    targets = find_targets(model, config.include, config.exclude)
    if config.keep >= 1.0:
        raise RanklmError("--keep 1.0 keeps every target dense: nothing to compress, no output written")
    onload_offloaded(model)  # accelerate CPU/disk offload: decompositions need the weights themselves
    check_finite_weights(model, targets)
    torch.manual_seed(config.seed)
    dense_model = model_params(model)
    plan = make_plan(config)
    # results can depend on the thread count (reduction order), so it is recorded next to the times it gave
    timings: dict[str, float] = {"torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    windows, calib_info = None, None
    if plan.needs_windows:
        windows, calib_info = calibration_windows(tokenizer, data, config)
        if calibration is not None:
            calib_info = calibration
    context = AllocationContext(
        model=model, windows=windows, batch_size=config.batch_size, seed=config.seed, progress=progress,
        objective=objective, state_dir=None if state_dir is None else Path(state_dir), resume=resume, save_every=save_every,
    )
    if cache is None:
        task_loss = objective if objective is not None and "labels" in getattr(objective, "examples", {}) else None
        cache = FactorCache(model, targets, windows, config.batch_size, config.fisher_windows, progress, loss_fn=task_loss)

    # 2. statistics + factorize (pass 1)
    factorizations: dict[str, Factorization] = {}
    if plan.needs_pass1:
        factorizations = cache.factorizations(plan.base, plan.sequential)
    numerics = numerics_records(factorizations)  # replaced per target by the refit's, which are installed
    timings["factorize_s"] = time.perf_counter() - t0

    # 3. allocate
    t1 = time.perf_counter()
    rank_map = allocate_ranks(plan.allocator, targets, factorizations, config, context)
    rank_map = adjusted_rank_map(targets, rank_map, config, context)
    timings["allocate_s"] = time.perf_counter() - t1

    # 4-5. refit / refine, install
    t2 = time.perf_counter()
    if context.trained_factors is not None:
        install_factors(model, targets, context.trained_factors, rank_map)
        context.trained_factors = None
    elif plan.refit:
        split: dict[str, float] = {}
        refit_sequential(model, targets, plan.base, windows, rank_map, config.batch_size, progress, numerics, split)
        timings.update({f"refit_{k}": v for k, v in split.items()})  # statistics / factorize+install / propagate
    else:
        facs = factorizations
        if hasattr(plan.base, "refine"):
            facs = refine_factors(model, targets, plan.base, facs, cache.stats_for_refine(plan.base), rank_map, progress)
            if getattr(plan.base, "report", None):
                context.artifacts["base_report"] = plan.base.report
        install_rank_map(model, targets, facs, rank_map)
    timings["refit_install_s"] = time.perf_counter() - t2
    if numerics:
        context.artifacts["numerics"] = numerics

    # 6. train
    if plan.trainer is not None:
        t3 = time.perf_counter()
        result = plan.trainer.train(model, context)
        if result.factors:
            install_factors(model, targets, result.factors, rank_map)
        context.training.append(result.record)
        context.artifacts.update(result.artifacts)
        timings["train_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0

    # 7. record
    model.ranklm = compression_state(  # type: ignore[assignment]
        model, config, targets, rank_map, dense_model, calib_info,
        base_model or {"name_or_path": getattr(model.config, "name_or_path", "") or type(model).__name__},
        timings, context.artifacts, context.training,
    )
    if not meets_budget(model.ranklm.keep_achieved, config.keep):
        # Only possible when single rank steps are large relative to the whole budget (tiny models).
        warnings.warn(f"achieved keep ratio {model.ranklm.keep_achieved:.4f} is not within {TOLERANCE:.1%} below {config.keep}")
    return model


def open_run_state(state_dir: str | os.PathLike, resume: bool, config: CompressConfig, model_info: dict[str, Any],
                   windows: torch.Tensor) -> bool:
    """Create (or, with ``resume``, check) a run's state folder; True when the run trains something.

    ``run.json`` records what the run is (model, configuration, calibration hash); resuming a
    folder written by another run is refused naming the fields that differ. Everything before
    training (statistics, factorization) is deterministic and recomputed on resume; each
    training loop keeps its own state file in the folder.
    """
    from .train.state import open_state_dir

    fingerprint = {
        "model": str(model_info.get("path") or model_info.get("name_or_path")),
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
        "calibration_sha256": windows_sha256(windows),
    }
    open_state_dir(state_dir, fingerprint, resume)
    return bool(getattr(get_allocator(config.allocator, **config.allocator_options), "needs_training", False)) or (
        config.trainer not in (None, "none"))


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
            lines.append(f"{r['trainer']}: {r.get('steps')} steps, loss {r.get('first_loss', float('nan')):.4f} -> {r['final_loss']:.4f}")
    return lines


__all__ = [
    "FactorCache", "Plan", "allocate_ranks", "open_run_state", "calibration_info", "calibration_windows", "compression_state",
    "decompose_targets", "install_factors", "install_rank_map", "learning_summary", "make_plan", "numerics_records",
    "knapsack_warning", "numerics_warning", "output_side_warning", "refine_factors", "run_warnings", "sensitivity_warning",
    "refit_sequential", "run", "windows_sha256",
]
