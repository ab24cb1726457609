"""``CompressionState``: what a compression did, attached to the model as ``model.ranklm``.

It sits below both the pipeline (which fills it) and the checkpoint code (which
writes and reads it), so that ``io`` never imports the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .budget import RankMap
from .targets import Target


@dataclass
class CompressionState:
    """What a compression did; serialised into ranklm.json by ``save``."""

    config: dict[str, Any]
    method: str
    targets: list[Target]
    rank_map: RankMap
    keep_requested: float
    keep_achieved: float
    keep_achieved_model: float
    params: dict[str, int]
    calibration: dict[str, Any] | None
    base_model: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)  # allocator outputs (tensors -> allocator.safetensors)
    # One record per training run (a learning allocator such as ARS, then the trainer of the
    # training axis): trainer, stage, steps, options, final_loss, keep_learned, keep_after_fit, ...
    training: list[dict[str, Any]] = field(default_factory=list)

    @property
    def training_name(self) -> str:
        """``"none"``, or the trainers that ran joined by ``+`` (e.g. ``ars+finetune``)."""
        return "+".join(r.get("trainer", "?") for r in self.training) or "none"
