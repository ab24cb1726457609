"""Pass 1 in bounded memory: gradient statistics for the whole model, activation statistics block by block.

Why this shape (kfac-global, docs/design.md §6 "Bounded memory"): kfac's output-gradient Grams ``G`` need
end-to-end backward passes, so they are collected for every target at once (``out x out`` float64, or the
diagonal past ``DENSE_OUT_MAX``: 1.6 GB for a 1 B model). Its input Grams ``A`` (the big ones: ``8192²``
float64 is 0.5 GB per down projection), the factorizations and the factors are not needed all at once:
the blocks are run one after another on cached inputs with **dense** propagation (``run_sequential`` with
nothing installed), so every block sees exactly the inputs of the whole-model forward pass, the same
batches in the same order, and its Grams, factorizations and spectra are the whole-model run's. Each
block's factors go to disk (``spill.FactorStore``) and each target's output Gram is dropped as soon as it
is factored; the global knapsack then reads the spectra only, and installation reads each allocated
prefix back. Peak ≈ model + output Grams + calibration activations at one layer + one block's input Grams,
factorizations and factors, instead of every target's.

Targets outside the repeated blocks (none by default) get their activation statistics from one
whole-model forward pass, as before.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..calibration import ACTIVATION, GRADIENT, StatisticNames, collect_stats
from ..decompose import Base, Factorization
from ..targets import Target
from .decomposition import decompose_targets
from .spill import FactorStore

GRADIENT_NEEDS = StatisticNames(GRADIENT)
ACTIVATION_NEEDS = StatisticNames(ACTIVATION)


def can_bound(base: Base, allocator: Any) -> bool:
    """Whether the bounded pass applies: the base needs activation statistics (collectable block by block)
    and re-solves nothing at install (no ``refine``), and the allocator reads only the spectra."""
    needs = set(base.needs)
    return (bool(needs & ACTIVATION_NEEDS) and not hasattr(base, "refine")
            and not getattr(allocator, "needs_context", False) and not getattr(allocator, "needs_training", False))


def decompose_shared(model: nn.Module, block_targets: list[Target], base: Base,
                     stats: dict[str, dict[str, Any]]) -> dict[str, Factorization]:
    """``decompose_targets`` of one block, its targets dealt round-robin over the processes of a data-parallel run
    and each factorization broadcast from the process that computed it (every process holds the same
    statistics, so any of them computes the same factors: the SVDs, the dominant cost, are shared too)."""
    from ..calibration.distributed import world

    rank, size = world()
    if size == 1:
        return decompose_targets(model, block_targets, base, stats, progress=False)
    import torch.distributed as dist

    mine = [t for i, t in enumerate(block_targets) if i % size == rank]
    facs = decompose_targets(model, mine, base, stats, progress=False)
    out: dict[str, Factorization] = {}
    for i, t in enumerate(block_targets):
        owner, f = i % size, facs.get(t.name)
        header = [None if f is None else (tuple(f.A.shape), tuple(f.B.shape), tuple(f.s.shape), str(f.A.dtype)
                                          .replace("torch.", ""), f.meta, str(f.A.device))]
        dist.broadcast_object_list(header, src=owner)
        a_shape, b_shape, s_shape, dtype, meta, device = header[0]  # type: ignore[misc]
        dev = torch.device(device) if rank == owner else next(model.parameters()).device
        if f is None:
            f = Factorization(*(torch.empty(sh, dtype=getattr(torch, dtype), device=dev)
                                for sh in (a_shape, b_shape, s_shape)), meta=meta)
        else:  # collectives send the storage as laid out: a transposed view would arrive scrambled
            f = Factorization(f.A.contiguous(), f.B.contiguous(), f.s.contiguous(), meta=f.meta)
        for tensor in (f.A, f.B, f.s):
            dist.broadcast(tensor, src=owner)
        out[t.name] = f
    return out


def bounded_factorizations(
    model: nn.Module, targets: list[Target], base: Base, windows: torch.Tensor, batch_size: int,
    fisher_windows: int, store: FactorStore, progress: bool = True, loss_fn: Any = None,
    seconds: dict[str, float] | None = None, grad_batch_size: int | None = None,
) -> dict[str, Any]:
    """``{target: SpilledFactorization}``: the whole-model run's factorizations, one block in memory at a time.

    ``seconds`` (if given) gets ``gradient_s`` (the end-to-end backward passes), ``statistics_s`` (block
    statistics), ``on_block_s`` (factorize + spill), ``propagate_s`` and ``per_block`` (a list of dicts:
    block, statistics_s (its statistics and the previous block's propagation; block 0: the input capture),
    factorize_s, spill_s, spill_mib, rss_mib after it).
    """
    from ..calibration.sequential import run_sequential
    from ..resources import release_freed_memory, rss_bytes

    seconds = {} if seconds is None else seconds
    needs = set(base.needs)
    grad_needs, act_needs = needs & GRADIENT_NEEDS, needs & ACTIVATION_NEEDS
    grad: dict[str, dict[str, Any]] = {t.name: {} for t in targets}
    t0 = time.perf_counter()
    if grad_needs:
        grad = collect_stats(model, targets, windows, frozenset(grad_needs), batch_size, progress,
                             fisher_windows=fisher_windows, loss_fn=loss_fn, grad_batch_size=grad_batch_size)
    seconds["gradient_s"] = time.perf_counter() - t0
    release_freed_memory()  # the backward's activations, freed in small pieces, leave the resident set
    out: dict[str, Any] = {}
    last = [time.perf_counter()]  # end of the previous block's callback: what lies between is its statistics
    per_block: list[dict[str, Any]] = seconds.setdefault("per_block", [])  # type: ignore[assignment]

    def factor(block_targets: list[Target], stats: dict[str, dict[str, Any]], block: int) -> None:
        t1 = time.perf_counter()
        for t in block_targets:
            stats[t.name].update(grad.pop(t.name, {}))  # the output Gram is released with the block's stats
        facs: dict[str, Factorization] = decompose_shared(model, block_targets, base, stats)
        t2 = time.perf_counter()
        before = store.bytes
        out.update(store.put(facs))
        del facs
        release_freed_memory()
        per_block.append({"block": block, "statistics_s": round(t1 - last[0], 3), "factorize_s": round(t2 - t1, 3),
                          "spill_s": round(time.perf_counter() - t2, 3),
                          "spill_mib": round((store.bytes - before) / 2**20, 1), "rss_mib": round(rss_bytes() / 2**20, 1)})
        last[0] = time.perf_counter()

    outside = [t for t in targets if t.block < 0]
    if outside:
        got = collect_stats(model, outside, windows, frozenset(act_needs), batch_size, progress)
        factor(outside, got, -1)
    inside = [t for t in targets if t.block >= 0]
    if inside:
        run_sequential(model, inside, windows, frozenset(act_needs), lambda b, bt, st: factor(bt, st, b), batch_size,
                       progress, desc="statistics + decompose (block by block, bounded memory)", seconds=seconds)
    return {t.name: out[t.name] for t in targets}


__all__ = ["bounded_factorizations", "can_bound"]
