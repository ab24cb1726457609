"""The checkpoint format: its file names and what ``ranklm.json`` must hold.

A checkpoint directory (format version 2, docs/checkpoint-format.md) holds the Hugging Face
``config.json`` with a ``quantization_config`` (``quant_method: "ranklm"``, every target's rank
and shape; ``ranklm.hf``), generation config and tokenizer files, ``model.safetensors`` (or
shards + ``model.safetensors.index.json``) with the factors under their module names
(``...q_proj.A.weight``, ``...q_proj.B.weight``) and a rank marker ``...q_proj.weight``,
``modeling_ranklm.py`` (for ``trust_remote_code=True``), a model card ``README.md``, optionally
``allocator.safetensors`` (tensors an allocator left in ``CompressionState.artifacts``) and
``ranklm.json`` (rank map, recipe, ratios, versions, calibration, sha256 of every weight file).
Quantized targets (``--quantize``) store integer codes, scales and zero points instead of float
factors and make the quantization_config's ``format_version`` 3 (ranklm.json keeps version 2).
Version 1 (no quantization_config, no marker, one weight file) is still read. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..budget import DENSE
from ..errors import RanklmError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "ranklm.json"
WEIGHTS_FILE = "model.safetensors"
ARTIFACTS_FILE = "allocator.safetensors"  # tensors an allocator left in CompressionState.artifacts


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_dir():
        raise RanklmError(f"checkpoint {p} does not exist or is not a folder")
    meta_path = p / META_FILE
    if not meta_path.is_file():
        raise RanklmError(f"{p} is not a ranklm checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RanklmError(f"{meta_path} is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "ranklm":
        raise RanklmError(f"{meta_path} is not a ranklm metadata file")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise RanklmError(
            f"{meta_path} has format version {meta.get('format_version')!r}; this ranklm reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    validate_metadata(meta, meta_path)
    return meta


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_metadata(meta: dict[str, Any], meta_path: str | os.PathLike = META_FILE) -> None:
    """Check ``ranklm.json``'s own consistency (types, shapes, rank map vs ``modules``); RanklmError if not.

    Whether the rank map fits the model itself is checked against the model's structure by
    ``_install_empty`` (``load`` and ``check_checkpoint``).
    """
    for key in ("rank_map", "modules", "files"):
        if not isinstance(meta.get(key), dict):
            raise RanklmError(f"{meta_path} is missing its {key!r} entry")
    for name, info in meta["modules"].items():
        if not (isinstance(info, dict) and _is_int(info.get("out")) and _is_int(info.get("in"))
                and info["out"] > 0 and info["in"] > 0 and isinstance(info.get("kind"), str)
                and _is_int(info.get("block", -1))):
            raise RanklmError(f"{meta_path} is corrupt: bad shape entry for {name}: {info!r}")
    for name, rank in meta["rank_map"].items():
        info = meta["modules"].get(name)
        if info is None:
            raise RanklmError(f"rank map does not fit the model: {name} has no shape entry in {META_FILE}")
        if rank != DENSE and not (_is_int(rank) and 0 < rank <= min(info["out"], info["in"])):
            raise RanklmError(f"rank map does not fit the model: bad rank {rank!r} for {name}")
    for name, digest in meta["files"].items():
        if not isinstance(digest, str):
            raise RanklmError(f"{meta_path} is corrupt: bad hash entry for {name}")
    if not isinstance(meta.get("recipe", {}), dict) or not isinstance(meta.get("base_model", {}), dict):
        raise RanklmError(f"{meta_path} is corrupt: its 'recipe' and 'base_model' entries must be objects")
    for key in ("keep_requested", "keep_achieved", "keep_achieved_model"):
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise RanklmError(f"{meta_path} is corrupt: {key} is {v!r}, not a number")


def metadata_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The parts of ranklm.json people look at first."""
    return {k: meta.get(k) for k in ("recipe", "keep_requested", "keep_achieved", "keep_achieved_model", "params", "base_model")}


__all__ = ["ARTIFACTS_FILE", "FORMAT_VERSION", "META_FILE", "READABLE_VERSIONS", "WEIGHTS_FILE", "metadata_summary", "read_metadata",
           "validate_metadata"]
