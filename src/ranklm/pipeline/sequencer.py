"""The one sequencer: prepare -> statistics + factorize -> allocate -> refit -> install -> block refit -> train -> record."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..allocate import AllocationContext
from ..budget import DENSE, TOLERANCE, meets_budget, model_params
from ..config import CompressConfig
from ..decompose import Factorization
from ..errors import RanklmError
from ..hf import attach as attach_to_transformers
from ..layers import LowRankLinear
from ..models import onload_offloaded
from ..targets import find_targets
from .factorize import FactorCache, numerics_records, refine_factors, refit_sequential
from .memory import out_of_memory_as_error, preflight
from .install import (
    adjusted_rank_map,
    allocate_ranks,
    check_finite_weights,
    install_factors,
    install_rank_map,
)
from .plan import Data, Plan, make_plan
from .quantization import dense_target_bytes, quantize_model, resolve_byte_budget, uniform_bits
from .record import compression_state
from .windows import calibration_source, calibration_windows, trainer_windows


def run(
    model: nn.Module,
    tokenizer=None,
    plan: Plan | CompressConfig | None = None,
    data: Data = None,
    progress: bool = True,
    base_model: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    cache: FactorCache | None = None,
    objective: Any = None,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    save_every: int = 50,
    validation: torch.Tensor | None = None,
    train_windows: torch.Tensor | None = None,
    before_training: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Compress ``model`` in place to ``plan.budget.keep`` of its targets' parameters; returns it.

    ``plan``: a resolved ``Plan`` (``make_plan(config, model)``), or a ``CompressConfig`` resolved here
    (None: the default config).

    ``data``: None for the packaged corpus's calibration part, a path, a list of strings, a
    ``TextSource`` or a ``[N, seq_len]`` tensor of token ids (``calibration`` then describes
    it). ``cache`` shares pass-1 statistics/factorizations between runs on copies of the same
    dense model (bench). ``objective`` (a ``train.Objective``) replaces the default training
    loss of learning allocators and trainers. ``state_dir`` keeps resumable training state.
    ``validation``: token windows a trainer validates on (``heal``'s early stopping).
    ``train_windows``: the windows a trainer trains on when it asks for more than the calibration windows
    (``pipeline.windows.trainer_windows``; None: the calibration windows).
    ``before_training``: called with the compressed model just before its trainer runs (bench measures the
    untrained model in the same run, so a trainer's gain is read from one allocation).
    """
    # 1. prepare
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise RanklmError("this model is already compressed by ranklm (it has LowRankLinear layers)")
    if not isinstance(plan, Plan):
        plan = make_plan(plan, model)
    targets = find_targets(model, list(plan.include), list(plan.exclude))
    plan, byte_budget = resolve_byte_budget(plan, model, targets)  # --budget-bytes: a keep ratio, or the joint's
    budget, calib = plan.budget, plan.calibration
    quantize_only = plan.quantize_only  # --keep 1 --quantize intN
    if budget.keep >= 1.0 and not quantize_only and not plan.joint:
        raise RanklmError("--keep 1.0 keeps every target dense: nothing to compress, no output written")
    onload_offloaded(model)  # accelerate CPU/disk offload: decompositions need the weights themselves
    check_finite_weights(model, targets)
    dense_bytes = dense_target_bytes(model, targets)[0]
    if plan.quant is not None:
        from ..quantize.apply import check_quantizable

        check_quantizable(model, targets, plan.quant.group_size)  # before any long work
    torch.manual_seed(calib.seed)
    dense_model = model_params(model)
    # results can depend on the thread count (reduction order), so it is recorded next to the times it gave
    timings: dict[str, float] = {"torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    windows, calib_info = None, None
    if plan.needs_windows:
        source = data if isinstance(data, torch.Tensor) else calibration_source(tokenizer, data)  # read once
        windows, calib_info = calibration_windows(tokenizer, source, calib)
        if calibration is not None:
            calib_info = calibration
        if train_windows is None and not isinstance(source, torch.Tensor):  # a trainer that trains on more text (heal)
            train_windows = trainer_windows(tokenizer, source, calib.seq_len, calib.calib_windows,
                                            int(getattr(plan.trainer, "windows", 0) or 0), calib.seed)
    context = AllocationContext(
        model=model, windows=windows, batch_size=calib.batch_size, seed=calib.seed, progress=progress,
        objective=objective, state_dir=None if state_dir is None else Path(state_dir), resume=resume, save_every=save_every,
        validation=validation, train_windows=train_windows, shared=cache.shared if cache is not None else {},
    )
    if plan.trainer is not None and hasattr(plan.trainer, "prepare"):
        plan.trainer.prepare(model, context)  # on the dense model, before any target is replaced (a teacher)
    own_cache = cache is None
    if cache is None:
        task_loss = objective if objective is not None and "labels" in getattr(objective, "examples", {}) else None
        cache = FactorCache(model, targets, windows, calib.batch_size, calib.fisher_windows, progress, loss_fn=task_loss,
                            stats_dtype=calib.stats_dtype)

    # 2. statistics + factorize (pass 1)
    factorizations: dict[str, Factorization] = {}
    memory = None if quantize_only else preflight(plan, model, targets, windows, cache)  # the mode, or one error line
    if memory is not None:
        context.artifacts["memory"] = memory.record()
    if plan.needs_pass1 and not quantize_only:
        probe = getattr(plan.base, "quant_probe", None)  # bench may have set a wider one, shared by its cells
        if plan.joint and (probe is None or probe.group_size != plan.quant.group_size
                           or not set(plan.quant.bits) <= set(probe.bits)):
            plan.base.quant_probe = plan.quant  # kfac prices quantization for the joint allocator
        with out_of_memory_as_error(memory):
            factorizations = cache.factorizations(plan.base, plan.sequential, bounded=bool(memory and memory.bounded))
        if memory is not None and memory.bounded and plan.base.name in cache.blocks:
            context.artifacts["memory"]["bounded"] = cache.blocks[plan.base.name]
    numerics = numerics_records(factorizations)  # replaced per target by the refit's, which are installed
    timings["factorize_s"] = time.perf_counter() - t0

    # 3. allocate
    t1 = time.perf_counter()
    bits = uniform_bits(plan, targets)
    if quantize_only:
        rank_map = {t.name: DENSE for t in targets}
    elif plan.joint:
        from ..allocate.joint import joint_allocate

        rank_map, bits, context.artifacts["joint"] = joint_allocate(targets, factorizations, plan.quant,
                                                                    byte_budget.bytes, budget.min_rank)
    else:
        rank_map = allocate_ranks(plan.allocator, targets, factorizations, budget, context)
        rank_map = adjusted_rank_map(targets, rank_map, budget, context, getattr(plan.allocator, "name", plan.config.allocator))
    timings["allocate_s"] = time.perf_counter() - t1

    # 4-5. refit / refine, install
    t2 = time.perf_counter()
    stash = None
    if plan.block_refit != "off":
        from .block_refit import DenseStash

        stash = DenseStash(model, targets, rank_map)  # the dense reference of stage 5b, on disk
    if context.trained_factors is not None:
        install_factors(model, targets, context.trained_factors, rank_map)
        context.trained_factors = None
    elif plan.refit:
        split: dict[str, float] = {}
        with cache.sums():
            refit_sequential(model, targets, plan.base, windows, rank_map, calib.batch_size, progress, numerics, split)
        timings.update({f"refit_{k}": v for k, v in split.items()})  # statistics / factorize+install / propagate
    else:
        facs = factorizations
        if hasattr(plan.base, "refine"):
            facs = refine_factors(model, targets, plan.base, facs, cache.stats_for_refine(plan.base), rank_map, progress)
            if getattr(plan.base, "report", None):
                context.artifacts["base_report"] = plan.base.report
        install_rank_map(model, targets, facs, rank_map)
    if own_cache:
        cache.close()  # a private cache: its spilled factors are installed, their folder goes
    del factorizations
    timings["refit_install_s"] = time.perf_counter() - t2
    if numerics:
        context.artifacts["numerics"] = numerics

    # 5b. block-level refit: accumulated-error correction against the dense outputs
    if stash is not None:
        from .block_refit import block_refit

        t5 = time.perf_counter()
        try:
            context.artifacts["block_refit"] = block_refit(model, targets, stash, windows, calib.batch_size,
                                                           plan.block_refit, plan.block_refit_damping, progress)
        finally:
            stash.close()
        timings["block_refit_s"] = time.perf_counter() - t5

    # 6. train
    if plan.trainer is not None:
        if before_training is not None:
            before_training(model)
        t3 = time.perf_counter()
        context.rank_map = dict(rank_map)
        result = plan.trainer.train(model, context)
        if result.factors:
            install_factors(model, targets, result.factors, rank_map)
        context.training.append(result.record)
        context.artifacts.update(result.artifacts)
        timings["train_s"] = time.perf_counter() - t3

    # 6b. quantize (after training: the trained factors are what gets stored)
    if plan.quant is not None:
        t4 = time.perf_counter()
        context.artifacts["quantization"] = quantize_model(model, targets, plan, bits, rank_map, byte_budget, dense_bytes)
        timings["quantize_s"] = time.perf_counter() - t4
    timings["total_s"] = time.perf_counter() - t0

    # 7. record
    model.ranklm = compression_state(  # type: ignore[assignment]
        model, plan, targets, rank_map, dense_model, calib_info,
        base_model or {"name_or_path": getattr(model.config, "name_or_path", "") or type(model).__name__},
        timings, context.artifacts, context.training,
    )
    if plan.joint:  # no keep ratio was asked for: the byte budget decided it (artifacts.joint)
        model.ranklm.keep_requested = model.ranklm.keep_achieved
    attach_to_transformers(model)  # save_pretrained / push_to_hub now write a loadable checkpoint
    if not plan.joint and not quantize_only and not meets_budget(model.ranklm.keep_achieved, budget.keep):
        # Only possible when single rank steps are large relative to the whole budget (tiny models).
        warnings.warn(f"achieved keep ratio {model.ranklm.keep_achieved:.4f} is not within {TOLERANCE:.1%} below {budget.keep}")
    return model
