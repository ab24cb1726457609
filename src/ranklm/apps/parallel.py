"""Data-parallel compression: join the process group a launcher (torchrun, accelerate launch) describes.

Why in the driver: statistics collection (``calibration.distributed``) only shares batches and all-reduces
sums when a process group exists; creating it is the job of whoever owns the run. Under ``torchrun`` the
environment names the world (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``); gloo on the
CPU, NCCL with ``--device cuda`` (each process on ``cuda:LOCAL_RANK``). Without those variables nothing
happens and the run is one process.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import RanklmError


def launched_world() -> int:
    """The world size a launcher set in the environment (1 when none did)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def join(device: Any) -> tuple[int, int, Any]:
    """``(rank, world size, device)``: the process group initialised when launched with several processes."""
    import torch.distributed as dist

    size = launched_world()
    if size <= 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
            import logging

            # measured with accelerate 1.16: `accelerate launch --cpu --num_processes 2` starts one process and
            # passes no world size (several CPU processes only through mpirun), so say it rather than run alone
            logging.getLogger("ranklm").warning(
                "warning: accelerate launch --cpu started one process (accelerate starts several CPU processes only "
                "through mpirun); for data-parallel statistics on CPUs use torchrun --nproc-per-node N -m ranklm.cli compress ...")
        return 0, 1, device
    if not dist.is_available():
        raise RanklmError(f"launched with WORLD_SIZE={size} but this torch has no torch.distributed")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        except (ValueError, RuntimeError) as e:
            raise RanklmError(f"cannot join the process group of {size} processes: {e}") from None
    return dist.get_rank(), dist.get_world_size(), dev


def leave() -> None:
    """Wait for every process, then destroy the process group this module created."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["join", "launched_world", "leave"]
