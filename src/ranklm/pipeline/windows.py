"""Stage 1: calibration windows from any supported data form, and what ranklm.json records about them."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..calibration import TextSource, default_corpus, read_text_source, token_windows
from ..errors import RanklmError
from .plan import CalibrationPlan, Data


def calibration_windows(tokenizer, data: Data, config: CalibrationPlan) -> tuple[torch.Tensor, dict[str, Any]]:
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


def calibration_info(description: str, windows: torch.Tensor, config: CalibrationPlan | Any) -> dict[str, Any]:
    """What ranklm.json records about the calibration data (``config``: a CalibrationPlan or a CompressConfig,
    both have ``calib_windows`` and ``seed``)."""
    return {
        "source": description,
        "windows": int(len(windows)),
        "seq_len": int(windows.shape[1]),
        "tokens": int(windows.numel()),
        "requested_windows": config.calib_windows,
        "selection": f"seeded random choice (seed {config.seed}) of non-overlapping windows",
    }


def windows_sha256(windows: torch.Tensor | None) -> str | None:
    return None if windows is None else hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()
