"""Stage 2 and the refit: statistics and factorizations, whole-model or block by block, shared between bench cells."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..budget import DENSE, RankMap
from ..calibration import collect_stats, collection_passes
from ..decompose import Base, Factorization
from ..targets import Target, weight_matrix
from .decomposition import decompose_targets, on_device
from .install import install_rank_map


def _sequential_pass(
    model: nn.Module, targets: list[Target], base: Base, windows: torch.Tensor, batch_size: int, progress: bool,
    on_block: Callable[[list[Target], dict[str, Factorization], dict[str, dict]], None], desc: str,
    seconds: dict[str, float] | None = None,
) -> None:
    from ..calibration.sequential import run_sequential

    def block(b: int, block_targets: list[Target], stats: dict[str, dict]) -> None:
        keep = {n: dict(s) for n, s in stats.items()} if hasattr(base, "refine") else {}
        on_block(block_targets, decompose_targets(model, block_targets, base, stats, progress=False), keep)

    run_sequential(model, targets, windows, base.needs, block, batch_size, progress, desc=desc,
                   by_output=getattr(base, "factors_from_output", None), seconds=seconds)


class FactorCache:
    """Pass-1 results shared by several runs on the same dense model and windows (``bench``).

    Whole-model statistics are collected once per statistic (each pass only for what is missing); each base's
    factorizations once per statistics mode. ``compress`` uses a private one.
    """

    def __init__(self, model: nn.Module, targets: list[Target], windows: torch.Tensor | None, batch_size: int,
                 fisher_windows: int, progress: bool = True, loss_fn: Any = None, stats_dtype: str = "auto") -> None:
        self.model, self.targets, self.windows = model, targets, windows
        self.stats_dtype = stats_dtype  # running sums: float64 on the CPU, float32 on the device, auto
        self.loss_fn = loss_fn  # Fisher's loss: a task Objective for encoders (None: the LM loss)
        self.batch_size, self.fisher_windows, self.progress = batch_size, fisher_windows, progress
        self.stats: dict[str, dict] = {t.name: {"name": t.name} for t in targets}
        self.collected: set[str] = set()
        self.seconds: dict[str, float] = {}  # "act"/"fisher"/"<base>:<mode>" -> seconds
        self._facs: dict[tuple[str, Any], dict[str, Factorization]] = {}
        self._stores: dict[str, Any] = {}  # base -> spill.FactorStore of its bounded factorizations
        self.memory: dict[str, Any] = {}  # base -> the memory preflight's choice (pipeline.memory.preflight)
        self.blocks: dict[str, dict[str, Any]] = {}  # base -> the bounded pass's timing split and per-block costs
        self.shared: dict[Any, Any] = {}  # what the runs share besides statistics (AllocationContext.shared)

    def sums(self) -> Any:
        """The running-sum context of this cache's statistics (``--stats-dtype``; auto: float32 on a GPU)."""
        from ..calibration.accumulate import running_sums

        on_gpu = next(self.model.parameters()).device.type != "cpu"
        f32 = self.stats_dtype == "float32" or (self.stats_dtype == "auto" and on_gpu)
        return running_sums(torch.float32, on_device=True) if f32 else running_sums(torch.float64)

    def grad_batch_size(self, needs: frozenset[str]) -> int:
        """Windows per backward pass of gradient statistics, split to an estimated memory budget
        (``memory.gradient_batch_size``; the same for every memory mode of the same needs)."""
        if self.windows is None:
            return self.batch_size
        from .memory import gradient_batch_size, gradient_pass_held

        return gradient_batch_size(self.model, self.batch_size, int(self.windows.shape[1]),
                                   held=gradient_pass_held(self.model, self.targets, needs))

    def _collect(self, needs: frozenset[str]) -> None:
        kinds = collection_passes(needs)  # ("act", activation statistics), then (name, {name}) per gradient one
        for kind, want in kinds:
            want = set(want) - self.collected  # by statistic, not by pass: whiten then asvd still collects abs_mean
            if not want:
                continue
            t0 = time.perf_counter()
            with self.sums():
                st = collect_stats(self.model, self.targets, self.windows, frozenset(want), self.batch_size,
                                   self.progress, fisher_windows=self.fisher_windows, loss_fn=self.loss_fn,
                                   grad_batch_size=self.grad_batch_size(needs))
            for name, entry in st.items():
                self.stats[name].update(entry)
            self.collected |= want
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - t0

    def factorizations(self, base: Base, sequential: bool, bounded: bool = False) -> dict[str, Factorization]:
        """Every target's factorization: whole-model statistics, block by block (``sequential``: activation
        bases), or ``bounded`` (``pipeline.bounded``: the whole-model result with its factors spilled to disk)."""
        key = ((base.name, sequential) if not bounded else (base.name, "bounded")) + (getattr(base, "quant_probe", None),)
        if key not in self._facs:
            t0 = time.perf_counter()
            if bounded:
                from .bounded import bounded_factorizations
                from .spill import FactorStore

                store = FactorStore()
                self._stores[base.name] = store
                split: dict[str, Any] = {}
                with self.sums():
                    facs = bounded_factorizations(self.model, self.targets, base, self.windows, self.batch_size,
                                                  self.fisher_windows, store, self.progress, self.loss_fn, split,
                                                  grad_batch_size=self.grad_batch_size(base.needs))
                self.blocks[base.name] = split
            elif sequential:
                facs: dict[str, Factorization] = {}
                with self.sums():
                    _sequential_pass(self.model, self.targets, base, self.windows, self.batch_size, self.progress,
                                     lambda bt, f, _s: facs.update(f), desc="statistics (block by block)")
            else:
                if base.needs:
                    self._collect(base.needs)
                facs = decompose_targets(self.model, self.targets, base, {n: dict(s) for n, s in self.stats.items()}, self.progress)
            self._facs[key] = facs
            mode = "bounded" if bounded else "sequential" if sequential else "whole"
            self.seconds[f"{base.name}:{mode}"] = time.perf_counter() - t0
        return self._facs[key]

    def stats_for_refine(self, base: Base) -> dict[str, dict]:
        if base.needs:
            self._collect(base.needs)
        return self.stats

    def release(self, base_name: str) -> None:
        for key in [k for k in self._facs if k[0] == base_name]:
            del self._facs[key]
        store = self._stores.pop(base_name, None)
        if store is not None:
            store.close()

    def close(self) -> None:
        """Drop every factorization and remove the spilled factors' folders."""
        for name in {k[0] for k in self._facs} | set(self._stores):
            self.release(name)


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
        a, b = base.refine(w, on_device(stats.get(t.name, {}), w.device), out[t.name], k)  # type: ignore[attr-defined]
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


def numerics_records(factorizations: dict[str, Factorization]) -> dict[str, Any]:
    """``{target: meta["numerics"]}`` of the bases that factor a Gram (whiten, kfac)."""
    return {n: f.meta["numerics"] for n, f in factorizations.items() if "numerics" in f.meta}
