"""``training_only`` moved to the core module ``ranklm.modules`` (calibration needs it and sits below train/); kept here for train/'s own imports."""

from __future__ import annotations

from ..modules import training_only

__all__ = ["training_only"]
