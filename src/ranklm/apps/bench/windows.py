"""Calibration and evaluation windows cut exactly as ``ranklm compress``/``evaluate`` cut them."""

from __future__ import annotations

import torch

from ...calibration import TextSource, token_stream
from ...calibration.data import seeded_split, stream_windows
from ...errors import RanklmError


def calibration_split(
    tokenizer, source: TextSource, seq_len: int, n: int, holdout: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, held-out calibration windows) of one source.

    The first are exactly ``token_windows(tokenizer, source, seq_len, n, seed=seed)`` (what
    ``ranklm compress`` uses); the held-out ones come next in the same seeded permutation, so
    they never overlap the calibration windows."""
    windows = stream_windows(token_stream(tokenizer, source.documents), seq_len, source.description)
    total = len(windows)
    calib, held = seeded_split(windows, n, seed, holdout)
    if holdout and len(held) == 0:
        raise RanklmError(
            f"--auto needs held-out calibration windows, but all {total} windows of {seq_len} tokens of the "
            f"calibration text are used for calibration: lower --calib-windows (at most {total - 1})"
        )
    return calib, held


def eval_windows_of(tokenizer, source: TextSource, seq_len: int, max_windows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluation windows as ``ranklm compress``/``evaluate`` cut them, the whole token stream)."""
    stream = token_stream(tokenizer, source.documents)
    w = stream_windows(stream, seq_len, source.description, purpose="evaluation")
    if max_windows is not None:
        w = w[:max_windows]
    return w.contiguous(), stream
