"""Data-parallel statistics: each process takes a contiguous share of the batches, the sums are all-reduced.

Why contiguous and batch-aligned: every batch then holds the same windows as in a one-process run, so its
float32 product is bit for bit the one-process product, and the only difference is the order of the
float64 running sums (relative 1e-16). After the all-reduce every process holds the same statistics, so
the factorizations, the knapsack and the rank map agree everywhere (``pipeline`` then lets rank 0 write).
The all-reduce is followed by a broadcast from rank 0, so the processes agree bit for bit whatever the
backend's reduction order. Nothing here initialises a process group: under ``torchrun`` or ``accelerate
launch`` the driver does (``apps.compress``); without one these are no-ops.
"""

from __future__ import annotations

from typing import Iterable

import torch


def world() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(total: int, batch_size: int) -> range:
    """The batch start indices of this process: a contiguous, batch-aligned share of ``range(0, total, batch_size)``."""
    starts = range(0, total, batch_size)
    rank, size = world()
    if size == 1:
        return starts
    n = len(starts)
    if n < size:
        from ..errors import RanklmError

        raise RanklmError(f"{n} calibration batch(es) cannot be shared by {size} processes: give at least {size} "
                          f"windows per statistic pass (--calib-windows, --fisher-windows) or fewer processes")
    lo, hi = rank * n // size, (rank + 1) * n // size
    return starts[lo:hi]


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> None:
    """In place: each tensor becomes the sum over processes (identical bits on every process)."""
    rank, size = world()
    if size == 1:
        return
    import torch.distributed as dist

    nccl = dist.get_backend() == "nccl"  # NCCL reduces device tensors only: CPU sums travel through the GPU
    for t in tensors:
        work = t.to(torch.device("cuda", torch.cuda.current_device())) if nccl and t.device.type == "cpu" else t
        work = work.contiguous()  # collectives send the storage as laid out
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        dist.broadcast(work, src=0)
        if work is not t:
            t.copy_(work)


def all_reduce_counts(counts: dict) -> dict:
    """``{key: int}`` summed over processes; every process must hold the same keys (in any order)."""
    rank, size = world()
    if size == 1 or not counts:
        return counts
    keys = sorted(counts, key=repr)
    t = torch.tensor([int(counts[k]) for k in keys], dtype=torch.int64)
    all_reduce_sum([t])
    return dict(zip(keys, (int(v) for v in t.tolist())))


__all__ = ["all_reduce_counts", "all_reduce_sum", "shard", "world"]
