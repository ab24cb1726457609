"""Sensitivity allocation (ASVD, Yuan et al. 2023).

For every target alone, truncate it to each keep ratio of a grid (0.1 ... 0.9 of
its parameters) and measure the calibration perplexity of the whole model; then
find, by binary search, the smallest perplexity threshold such that giving every
target the smallest ratio whose perplexity stays under the threshold fits the
budget. The greedy fitter then lands the budget exactly, adding or dropping
single ranks by the interpolated log-perplexity gain per parameter.

The sensitivity table (perplexity per target and ratio) is the expensive part:
``n_targets x len(grid)`` perplexity passes over ``windows`` calibration
windows. It is kept in ``context.artifacts["sensitivity"]`` (saved in the
checkpoint) and in a JSON cache file keyed by model, base, windows and grid, so
a second budget on the same model reuses it. Pass ``table=PATH`` (a cache file
or a checkpoint's ``ranklm.json``) to reuse one explicitly.

A measurement that is not finite (NaN/Inf perplexity) is allocated as log-perplexity 700,
recorded in ``artifacts["sensitivity"]["non_finite"]`` (target, ratio) and warned about.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..budget import DENSE, RankMap, fit_budget, max_factored_rank, target_cost
from ..decompose.base import Factorization
from ..errors import RanklmError
from ..eval.perplexity import perplexity
from ..options import Configurable, MethodOptions, opt
from ..targets import Conv1D, Target
from .base import AllocationContext, require_context
from ..registry import register_allocator

DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
NON_FINITE_LOGPPL = 700.0  # log-perplexity given to a non-finite measurement (exp(709) is float64's largest)


def rank_for_ratio(t: Target, ratio: float) -> int:
    return max(1, min(max_factored_rank(t), int(ratio * t.dense_params // (t.out_features + t.in_features))))


def _table_key(context: AllocationContext, factorizations: dict[str, Factorization], windows: torch.Tensor, grid) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(list(grid)).encode())
    h.update(windows.numpy().tobytes())
    for name in sorted(factorizations):  # the factors identify model + base + statistics
        f = factorizations[name]
        h.update(name.encode())
        h.update(f.A[:, :4].contiguous().numpy().tobytes())
        h.update(f.s[:16].contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _default_cache() -> Path:
    from ..models import cache_dir

    return cache_dir() / "sensitivity"


@dataclass(frozen=True)
class SensitivityOptions(MethodOptions):
    grid: Sequence[float] = opt(DEFAULT_GRID, "keep ratios in (0, 1) at which each target's perplexity is measured")
    windows: int = opt(4, "calibration windows per perplexity measurement")
    seq_len: int | None = opt(None, "measure on the first seq_len tokens of each window [default: all]")
    table: str | None = opt(None, "reuse a sensitivity table: a cache file or a checkpoint's ranklm.json")
    cache: bool = opt(True, "read and write the sensitivity cache (keyed by model, base, windows, grid)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.grid or not all(0 < g < 1 for g in self.grid):
            raise RanklmError("sensitivity grid ratios must lie in (0, 1)")
        if self.windows < 1 or (self.seq_len is not None and self.seq_len < 1):
            raise RanklmError("sensitivity windows and seq_len must be positive integers")


@register_allocator("sensitivity")
class SensitivityAllocator(Configurable):
    name = "sensitivity"
    needs_context = True
    Options = SensitivityOptions

    def __init__(self, options: SensitivityOptions | None = None, /, **given: Any) -> None:
        super().__init__(options, **given)
        self.grid = tuple(sorted(float(g) for g in self.config.grid))
        self.table_path = self.config.table  # self.table is the method that reads or measures it

    def _windows(self, context: AllocationContext) -> torch.Tensor:
        return context.windows[: self.windows, : self.seq_len].contiguous()

    # -- measuring ---------------------------------------------------------------
    @torch.no_grad()
    def measure(
        self, targets: list[Target], factorizations: dict[str, Factorization], context: AllocationContext
    ) -> dict[str, Any]:
        model, windows = context.model, self._windows(context)
        base = perplexity(model, windows, context.batch_size, progress=False)
        table: dict[str, list[float]] = {}
        bar = tqdm(total=len(targets) * len(self.grid), desc="sensitivity", disable=not context.progress, unit="ppl")
        for t in targets:
            module = model.get_submodule(t.name)
            original = module.weight.detach().clone()
            row = []
            for ratio in self.grid:
                w = factorizations[t.name].approx(rank_for_ratio(t, ratio)).to(original.dtype)
                module.weight.copy_(w.T if Conv1D and isinstance(module, Conv1D) else w)
                row.append(perplexity(model, windows, context.batch_size, progress=False).ppl)
                bar.update(1)
            module.weight.copy_(original)
            table[t.name] = row
        bar.close()
        return {"grid": list(self.grid), "dense_ppl": base.ppl, "windows": int(len(windows)),
                "seq_len": int(windows.shape[1]), "ppl": table}

    def load_table(self, path: str | os.PathLike) -> dict[str, Any]:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RanklmError(f"cannot read sensitivity table {path}: {e}") from None
        data = data.get("artifacts", {}).get("sensitivity", data)  # a checkpoint's ranklm.json works too
        if "ppl" not in data or "grid" not in data:
            raise RanklmError(f"{path} holds no sensitivity table")
        return data

    def table(
        self, targets: list[Target], factorizations: dict[str, Factorization], context: AllocationContext
    ) -> dict[str, Any]:
        if self.table_path:
            data = self.load_table(self.table_path)
        else:
            key = _table_key(context, factorizations, self._windows(context), self.grid)
            cache_file = (context.cache_dir or _default_cache()) / f"{key}.json"
            if self.cache and cache_file.is_file():
                data = self.load_table(cache_file)
            else:
                data = self.measure(targets, factorizations, context)
                if self.cache:
                    cache_file.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cache_file.with_suffix(".tmp")
                    tmp.write_text(json.dumps(data))
                    os.replace(tmp, cache_file)
            data["cache_key"] = key
        missing = [t.name for t in targets if t.name not in data["ppl"]]
        if missing:
            raise RanklmError(f"sensitivity table has no entry for {missing[0]} (measured on another model?)")
        return data

    # -- allocating --------------------------------------------------------------
    def allocate(
        self,
        targets: list[Target],
        factorizations: dict[str, Factorization],
        keep: float,
        min_rank: int = 1,
        context: AllocationContext | None = None,
    ) -> RankMap:
        context = require_context(context, self.name)
        data = self.table(targets, factorizations, context)
        grid = [float(g) for g in data["grid"]]
        # A non-finite perplexity (the truncation broke the model, or overflowed) counts as the worst value any
        # finite float64 perplexity can have; which ones are recorded, and the CLI warns (pipeline.sensitivity_warning).
        data["non_finite"] = [{"target": n, "ratio": g, "ppl": str(p)} for n, row in data["ppl"].items()
                              for g, p in zip(grid, row) if not math.isfinite(float(p))]
        data["non_finite_logppl"] = NON_FINITE_LOGPPL
        context.artifacts["sensitivity"] = data
        logp = {n: [math.log(max(p, 1.0)) if math.isfinite(p) else NON_FINITE_LOGPPL for p in row]
                for n, row in data["ppl"].items()}

        def choose(threshold: float) -> RankMap:
            out: RankMap = {}
            for t in targets:
                row = logp[t.name]
                ratio = next((g for g, lp in zip(grid, row) if lp <= threshold), None)
                out[t.name] = DENSE if ratio is None else rank_for_ratio(t, ratio)
            return out

        budget = keep * sum(t.dense_params for t in targets)
        candidates = sorted({lp for row in logp.values() for lp in row})
        # cost(choose(thr)) falls as thr rises: binary search the smallest threshold within budget.
        lo = 0
        hi = len(candidates) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(target_cost(t, r) for t, r in zip(targets, choose(candidates[mid]).values())) <= budget:
                hi = mid
            else:
                lo = mid + 1
        start = choose(candidates[lo])

        def priority(t: Target, k: int) -> float:
            # log-perplexity saved by one more rank, interpolated on the grid of ratios.
            row = logp[t.name]
            r0 = k * (t.out_features + t.in_features) / t.dense_params
            r1 = (k + 1) * (t.out_features + t.in_features) / t.dense_params

            def at(r: float) -> float:
                if r <= grid[0]:
                    return row[0] + (grid[0] - r) / grid[0] * max(row[0] - row[-1], 0.0)
                if r >= grid[-1]:
                    return row[-1] * max(0.0, (1 - r) / (1 - grid[-1])) + logp_dense * (1 - max(0.0, (1 - r) / (1 - grid[-1])))
                i = bisect.bisect_right(grid, r) - 1
                frac = (r - grid[i]) / (grid[i + 1] - grid[i])
                return row[i] * (1 - frac) + row[i + 1] * frac

            return max(at(r0) - at(min(r1, 1.0)), 0.0) + 1e-12 * (k + 1) ** -1

        logp_dense = math.log(max(float(data["dense_ppl"]), 1.0))
        return fit_budget(targets, start, keep, priority, min_rank)
