"""Resumable training state: one safetensors file per loop, written atomically.

Long loops (ARS mask learning, factor fine-tuning) save their trainable tensors,
optimizer moments and a JSON header (step, seed, options, history) every few steps.
Every loop draws its batch and noise of step t from generators seeded by (seed, t)
only, so restoring the tensors and continuing from the saved step reproduces an
uninterrupted run bit for bit on CPU. The file is written to ``<name>.tmp``, fsynced and
renamed (``ranklm.atomic.atomic_file``), so a kill mid-write leaves the previous state intact
and a full disk is one line naming the file; no pickle is involved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_file
from ..errors import RanklmError


def write_state_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any], key: str) -> None:
    """Atomically write ``tensors`` with ``meta`` (JSON) under the metadata key ``key``."""
    import safetensors.torch

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={key: json.dumps(meta)})


def read_state_file(path: str | os.PathLike, key: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a file written by ``write_state_file``; clear errors for anything else."""
    import safetensors
    import safetensors.torch

    p = Path(path)
    if not p.is_file():
        raise RanklmError(f"{what} resume: {p} does not exist")
    try:
        with safetensors.safe_open(str(p), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(key, "null"))
        tensors = safetensors.torch.load_file(str(p))
    except (safetensors.SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise RanklmError(f"{what} resume: {p} is not a readable {what} state file: {e}") from None
    if not isinstance(meta, dict):
        raise RanklmError(f"{what} resume: {p} has no {what} metadata")
    return tensors, meta


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat tensors ``<prefix><param index>.<name>``."""
    out: dict[str, torch.Tensor] = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{prefix}{i}.{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Inverse of ``optimizer_tensors`` (hyper-parameters come from the live optimizer)."""
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            i, name = k[len(prefix):].split(".", 1)
            state.setdefault(int(i), {})[name] = v.clone()
    sd["state"] = state
    opt.load_state_dict(sd)


def open_state_dir(state_dir: str | os.PathLike, fingerprint: dict[str, Any], resume: bool) -> Path:
    """Create (or, with ``resume``, check) a run's state folder.

    ``run.json`` records what the run is (model, configuration, calibration hash); resuming
    from a folder written by a different run would silently mix two runs, so it is refused
    naming the fields that differ. A fresh run refuses a non-empty folder for the same reason.
    """
    d = Path(state_dir)
    run = d / "run.json"
    if resume:
        if not run.is_file():
            raise RanklmError(f"--resume: {d} holds no run state (no run.json); start the run without --resume")
        try:
            saved = json.loads(run.read_text())
        except (OSError, ValueError) as e:
            raise RanklmError(f"--resume: {run} is unreadable: {e}") from None
        fresh = json.loads(json.dumps(fingerprint))  # the JSON form, as it was saved
        diff = sorted(k for k in set(saved) | set(fresh) if saved.get(k) != fresh.get(k))
        if diff:
            raise RanklmError(f"--resume: {d} belongs to a different run ({', '.join(diff)} differ)")
        return d
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise RanklmError(f"--state-dir {d} is not an empty folder; add --resume to continue its run, or choose another")
    with atomic_file(run) as tmp:
        tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    return d
