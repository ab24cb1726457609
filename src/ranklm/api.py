"""The public entry points: ``compress(model, tokenizer, config, data) -> model``, ``save``, ``load``.

``compress`` drives the one pipeline (``ranklm.pipeline``); this module only gives it
the stable, documented name. The result is the same model object, modified in place,
with ``model.ranklm`` holding the ``CompressionState`` that ``save`` writes into
``ranklm.json``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import CompressConfig
from .io import load, save
from .pipeline import (  # noqa: F401 - re-exported for library users
    Data,
    allocate_ranks,
    calibration_info,
    calibration_windows,
    compression_state,
    decompose_targets,
    install_rank_map,
    refine_factors,
)
from .pipeline import run as _run
from .state import CompressionState


def compress(
    model: nn.Module,
    tokenizer=None,
    config: CompressConfig | None = None,
    data: Data = None,
    progress: bool = True,
    base_model: dict[str, Any] | None = None,
    **pipeline_options: Any,
) -> nn.Module:
    """Compress ``model`` in place to ``config.keep`` of its targets' parameters; returns it.

    ``data`` (read when the base needs statistics or something trains): None for the packaged
    corpus's calibration part, a path, a list of strings, a ``TextSource`` or a
    ``[N, seq_len]`` tensor of token ids. ``pipeline_options`` go to ``pipeline.run``
    (``objective``, ``state_dir``, ``resume``, ``save_every``, ``cache``, ``calibration``).
    """
    return _run(model, tokenizer, config, data, progress=progress, base_model=base_model, **pipeline_options)


__all__ = ["CompressionState", "compress", "load", "save"]
