"""What a local model folder holds: its weights files, and whether it is a ranklm checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import sha256_file
from ..errors import RanklmError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A ranklm checkpoint: a folder with ``ranklm.json``, or whose ``config.json`` says
    ``quantization_config.quant_method: "ranklm"`` (written by ``save_pretrained``)."""
    p = Path(path)
    if (p / "ranklm.json").is_file():
        return True
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "ranklm"


def has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pat)) for pat in WEIGHT_PATTERNS)


def check_model_folder(p: Path, shown: str | None = None) -> None:
    """RanklmError unless ``p`` is a folder with a config.json and weights."""
    shown = shown or str(p)
    if not p.is_dir():
        raise RanklmError(f"model path {shown} is not a folder (expected a Hugging Face model folder or a ranklm checkpoint)")
    if not (p / "config.json").is_file():
        raise RanklmError(f"{shown} is not a model: it has no config.json")
    if not has_weights(p):
        raise RanklmError(f"model folder {shown} has no weights (no *.safetensors or *.bin files)")


def weights_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every weights file in a local model folder."""
    digests = {}
    for pattern in WEIGHT_PATTERNS:
        for f in sorted(folder.glob(pattern)):
            digests[f.name] = sha256_file(f)
    return digests


__all__ = ["WEIGHT_PATTERNS", "check_model_folder", "has_weights", "is_checkpoint", "weights_sha256"]
