"""The one entry point: ``compress(model, tokenizer, config, data) -> model``.

Data flows one way: model -> targets -> calibration statistics -> factorizations
-> rank map -> installed LowRankLinear layers. The base and the allocator are
looked up by name, so any base combines with any allocator. The result is the
same model object, modified in place, with ``model.ranklm`` holding the
``CompressionState`` that ``save`` writes into ``ranklm.json``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocate import AllocationContext, get_allocator
from .budget import (
    DENSE,
    TOLERANCE,
    RankMap,
    keep_ratio,
    max_factored_rank,
    meets_budget,
    model_keep_ratio,
    model_params,
    targets_cost,
    targets_dense_params,
)
from .calibration import TextSource, collect_stats, default_corpus, read_text_source, token_windows
from .config import CompressConfig
from .decompose import Base, Factorization, get_base
from .errors import RanklmError
from .layers import LowRankLinear, replace_module
from .models import onload_offloaded
from .targets import Target, find_targets, weight_matrix

Data = Union[None, str, os.PathLike, TextSource, list, torch.Tensor]


@dataclass
class CompressionState:
    """What a compression did; serialised into ranklm.json by ``save``."""

    config: dict[str, Any]
    method: str
    targets: list[Target]
    rank_map: RankMap
    keep_requested: float
    keep_achieved: float
    keep_achieved_model: float
    params: dict[str, int]
    calibration: dict[str, Any] | None
    base_model: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)  # allocator outputs (tensors -> allocator.safetensors)


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
    windows = token_windows(tokenizer, source, config.seq_len, config.calib_windows, seed=config.seed)
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


def _on_device(stats: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One target's statistics (kept in CPU memory) moved next to its weight for the factorization."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in stats.items()}


def refine_factors(
    model: nn.Module,
    targets: list[Target],
    base: Base,
    factorizations: dict[str, Factorization],
    stats: dict[str, dict],
    rank_map: RankMap,
    progress: bool = True,
) -> dict[str, Factorization]:
    """Let a base re-solve each factored target at exactly its allocated rank."""
    todo = [t for t in targets if rank_map[t.name] != DENSE]
    for t in tqdm(todo, desc=f"refine ({base.name})", disable=not progress, unit="matrix"):
        w = weight_matrix(model.get_submodule(t.name))
        k = int(rank_map[t.name])
        a, b = base.refine(w, _on_device(stats.get(t.name, {}), w.device), factorizations[t.name], k)  # type: ignore[attr-defined]
        factorizations[t.name] = Factorization(a, b, factorizations[t.name].s)
    return factorizations


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


def allocate_ranks(allocator, targets, factorizations, config: CompressConfig, context: AllocationContext) -> RankMap:
    """``allocator.allocate`` with an unreachable budget reported as a user error."""
    try:
        return allocator.allocate(targets, factorizations, config.keep, config.min_rank, context)
    except ValueError as e:
        raise RanklmError(f"keep ratio {config.keep} cannot be met: {e}") from None


def compression_state(
    model: nn.Module, config: CompressConfig, targets: list[Target], rank_map: RankMap, dense_model: int,
    calibration: dict[str, Any] | None, base_model: dict[str, Any], timings: dict[str, float], artifacts: dict[str, Any],
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
    )


def use_sequential(config: CompressConfig, base: Base, allocator) -> bool:
    """Explicit choice, or automatic: activation-statistics base with the uniform allocator."""
    if not base.needs:
        return False  # nothing to calibrate
    if config.sequential is not None:
        return bool(config.sequential)
    return base.needs <= {"gram", "abs_mean"} and allocator.name == "uniform"


def _compress_sequential(
    model: nn.Module, targets: list[Target], base: Base, allocator, windows: torch.Tensor,
    config: CompressConfig, context: AllocationContext, progress: bool,
) -> tuple[RankMap, dict[str, Factorization]]:
    """Layer-by-layer: with ``propagate="compressed"`` each block is allocated (meeting the keep ratio
    within the block) and installed before the next block's statistics are taken, so later blocks
    calibrate on the compressed model's activations (SVD-LLM's update); with ``"dense"`` the
    factorizations are kept and the allocation is global at the end."""
    from .calibration.sequential import run_sequential

    if "fisher" in base.needs or getattr(allocator, "needs_context", False):
        raise RanklmError(
            f"--sequential works with activation-statistics bases (whiten, asvd) and spectrum allocators; "
            f"{base.name}+{allocator.name} needs end-to-end gradients or measurements: drop --sequential"
        )
    rank_map: RankMap = {}
    factorizations: dict[str, Factorization] = {}

    def on_block(b: int, block_targets: list[Target], stats: dict[str, dict]) -> None:
        facs = decompose_targets(model, block_targets, base, stats, progress=False)
        if config.propagate == "compressed":
            block_map = allocate_ranks(allocator, block_targets, facs, config, context)
            install_rank_map(model, block_targets, facs, block_map)
            rank_map.update(block_map)
        else:
            factorizations.update(facs)

    run_sequential(model, targets, windows, base.needs, on_block, config.batch_size, progress)
    if config.propagate == "dense":
        rank_map = allocate_ranks(allocator, targets, factorizations, config, context)
    return rank_map, factorizations


def compress(
    model: nn.Module,
    tokenizer=None,
    config: CompressConfig | None = None,
    data: Data = None,
    progress: bool = True,
    base_model: dict[str, Any] | None = None,
) -> nn.Module:
    """Compress ``model`` in place to ``config.keep`` of its targets' parameters; returns it.

    ``data`` (only read when the base needs statistics): None for the packaged
    corpus's calibration part, a path, a list of strings, a ``TextSource`` or a
    ``[N, seq_len]`` tensor of token ids.
    """
    config = config or CompressConfig()
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise RanklmError("this model is already compressed by ranklm (it has LowRankLinear layers)")
    targets = find_targets(model, config.include, config.exclude)
    if config.keep >= 1.0:
        raise RanklmError("--keep 1.0 keeps every target dense: nothing to compress, no output written")
    onload_offloaded(model)  # accelerate CPU/disk offload: decompositions need the weights themselves
    check_finite_weights(model, targets)
    torch.manual_seed(config.seed)
    dense_model = model_params(model)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    base = get_base(config.base, **config.base_options)
    allocator = get_allocator(config.allocator, **config.allocator_options)
    stats: dict[str, dict] = {}
    calib_info = None
    windows = None
    if base.needs or getattr(allocator, "needs_context", False):
        windows, calib_info = calibration_windows(tokenizer, data, config)
    context = AllocationContext(
        model=model, windows=windows, batch_size=config.batch_size, seed=config.seed, progress=progress
    )
    sequential = use_sequential(config, base, allocator)
    if sequential:
        rank_map, factorizations = _compress_sequential(model, targets, base, allocator, windows, config, context, progress)
        timings["calibration_s"] = time.perf_counter() - t0
    else:
        if base.needs:
            stats = collect_stats(
                model, targets, windows, base.needs, config.batch_size, progress, fisher_windows=config.fisher_windows
            )
        timings["calibration_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        refine_stats = {n: st for n, st in stats.items()} if hasattr(base, "refine") else {}
        factorizations = decompose_targets(model, targets, base, stats, progress)
        timings["decompose_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        rank_map = allocate_ranks(allocator, targets, factorizations, config, context)
        timings["allocate_s"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        if hasattr(base, "refine"):  # bases whose best rank-k solution is not nested (TFWSVD)
            factorizations = refine_factors(model, targets, base, factorizations, refine_stats, rank_map, progress)
            timings["refine_s"] = time.perf_counter() - t3
            if getattr(base, "report", None):
                context.artifacts["base_report"] = base.report
        del refine_stats
    if not (sequential and config.propagate == "compressed"):
        install_rank_map(model, targets, factorizations, rank_map)
    del factorizations
    timings["total_s"] = time.perf_counter() - t0

    model.ranklm = compression_state(  # type: ignore[assignment]
        model, config, targets, rank_map, dense_model, calib_info,
        base_model or {"name_or_path": getattr(model.config, "name_or_path", "") or type(model).__name__},
        timings, context.artifacts,
    )
    if not meets_budget(model.ranklm.keep_achieved, config.keep):
        # Only possible when single rank steps are large relative to the whole budget (tiny models).
        import warnings

        warnings.warn(f"achieved keep ratio {model.ranklm.keep_achieved:.4f} is not within {TOLERANCE:.1%} below {config.keep}")
    return model
