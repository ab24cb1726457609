"""Resumable training runs: the state folder's fingerprint of the command that owns it."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .plan import Plan
from .windows import windows_sha256


def open_run_state(state_dir: str | os.PathLike, resume: bool, plan: Plan, model_info: dict[str, Any],
                   windows: torch.Tensor) -> bool:
    """Create (or, with ``resume``, check) a run's state folder; True when the run trains something.

    ``run.json`` records what the run is (model, configuration, calibration hash); resuming a
    folder written by another run is refused naming the fields that differ. Everything before
    training (statistics, factorization) is deterministic and recomputed on resume; each
    training loop keeps its own state file in the folder.
    """
    from ..train.state import open_state_dir

    fingerprint = {
        "model": str(model_info.get("path") or model_info.get("name_or_path")),
        "config": json.loads(json.dumps(plan.config.to_dict(), default=str)),
        "calibration_sha256": windows_sha256(windows),
    }
    open_state_dir(state_dir, fingerprint, resume)
    return plan.trains
