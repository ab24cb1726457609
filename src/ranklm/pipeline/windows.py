"""Stage 1: calibration windows from any supported data form, and what ranklm.json records about them."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

from ..calibration import TextSource, default_corpus, read_text_source, token_stream, token_windows
from ..calibration.data import seeded_extension, stream_windows
from ..errors import RanklmError
from .plan import CalibrationPlan, Data

logger = logging.getLogger(__name__)


def calibration_source(tokenizer, data: Data) -> TextSource:
    """The calibration text of any supported data form but token ids (a path, documents, a TextSource, None)."""
    if tokenizer is None:
        raise RanklmError("tokenizer missing: calibration text cannot be tokenized without one")
    if data is None or (isinstance(data, str) and data == "default"):
        return default_corpus()[0]
    if isinstance(data, TextSource):
        return data
    if isinstance(data, list):
        return TextSource(f"{len(data)} in-memory documents", [str(d) for d in data])
    return read_text_source(data)


def calibration_windows(tokenizer, data: Data, config: CalibrationPlan) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token windows for calibration from any supported data form, plus a description."""
    if isinstance(data, torch.Tensor):
        windows = data[: config.calib_windows]
        return windows, {"source": "token ids given by the caller", "windows": len(windows), "seq_len": int(windows.shape[1])}
    source = calibration_source(tokenizer, data)
    windows = token_windows(tokenizer, source, config.seq_len, config.calib_windows, seed=config.seed, strict=False)
    return windows, calibration_info(source.description, windows, config)


def trainer_windows(tokenizer, source: TextSource, seq_len: int, calib_windows: int, total: int, seed: int,
                    skip: int = 0) -> torch.Tensor | None:
    """The windows a trainer that asks for ``total`` (``heal``'s ``windows``) trains on: the calibration
    windows, then more of the calibration text from the same seeded choice (``seeded_extension``), or None
    when it asks for no more than the calibration windows. A text too short gives all it has, with a log line."""
    if total <= calib_windows:
        return None
    windows = stream_windows(token_stream(tokenizer, source.documents), seq_len, source.description)
    out = seeded_extension(windows, calib_windows, total, seed, skip)
    if len(out) <= calib_windows:
        logger.info("training windows: %d asked for, the calibration text gives no window beyond the %d calibration "
                    "windows (%s)", total, calib_windows, source.description)
        return None
    if len(out) < total:
        logger.info("training windows: %d asked for, the calibration text gives %d of %d tokens (%s)",
                    total, len(out), seq_len, source.description)
    return out


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
