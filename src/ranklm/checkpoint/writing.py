"""Writing a checkpoint: ``save`` puts a compressed model and its tokenizer in a folder, atomically.

The folder is written to ``DIR.tmp-XXXX`` next to its destination, fsynced, and renamed into
place (``ranklm.atomic.atomic_dir``), so an interrupted save never leaves a half directory under
the final name and an overwrite keeps the previous checkpoint until the new one is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import transformers
from torch import nn

from ..atomic import atomic_dir, sha256_file
from ..errors import RanklmError
from .metadata import ARTIFACTS_FILE, FORMAT_VERSION, META_FILE

DEFAULT_SHARD_SIZE = "5GB"  # transformers' own default


def _version() -> str:
    from .._version import __version__

    return __version__


def _json_artifacts(artifacts: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of an allocator's/base's artifacts (tensors are stored separately)."""
    return {k: v for k, v in artifacts.items() if not isinstance(v, torch.Tensor)}


def _json_default(obj: Any) -> Any:
    """Options that are not JSON (a loss_fn callable, a tensor) are recorded by description."""
    if isinstance(obj, torch.Tensor):
        return f"<tensor {tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}>"
    if isinstance(obj, Path):
        return str(obj)
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _tensor_artifacts(artifacts: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor part of the artifacts, written to ``allocator.safetensors``."""
    return {k: v.detach().cpu().contiguous() for k, v in artifacts.items() if isinstance(v, torch.Tensor)}


def build_metadata(model: nn.Module) -> dict[str, Any]:
    state = getattr(model, "ranklm", None)
    if state is None:
        raise RanklmError("this model was not compressed by ranklm (no compression state to save)")
    from ..provenance import command

    return {
        "format": "ranklm",
        "format_version": FORMAT_VERSION,
        "command": command(),
        "ranklm_version": _version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": (state.timings or {}).get("torch_threads", torch.get_num_threads()),
        "base_model": state.base_model,
        "recipe": {
            "name": state.method,
            "base": state.config.get("base"),
            "allocator": state.config.get("allocator"),
            "training": state.training_name,
            "seed": state.config.get("seed"),
            "config": state.config,
        },
        "keep_requested": state.keep_requested,
        "keep_achieved": state.keep_achieved,
        "keep_achieved_model": state.keep_achieved_model,
        "params": state.params,
        "calibration": state.calibration,
        "timings": state.timings,
        "evaluation": state.evaluation,
        "artifacts": _json_artifacts(getattr(state, "artifacts", {}) or {}),
        "training": list(getattr(state, "training", []) or []),
        "rank_map": state.rank_map,
        "modules": {t.name: {"out": t.out_features, "in": t.in_features, "kind": t.kind, "block": t.block} for t in state.targets},
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def _weights_files(folder: Path) -> list[str]:
    """The weight files ``save_pretrained`` wrote: one ``model.safetensors`` or the shards and their index."""
    return sorted(f.name for f in folder.iterdir() if f.name.startswith("model") and
                  (f.name.endswith(".safetensors") or f.name.endswith(".safetensors.index.json")))


def save(model: nn.Module, tokenizer, path: str | os.PathLike, overwrite: bool = False,
         max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> Path:
    """Write a compressed model (and its tokenizer) as a ranklm checkpoint, atomically.

    The weights go through transformers' ``save_pretrained`` (sharded above ``max_shard_size``,
    with ``model.safetensors.index.json``) with the ranklm quantizer attached, so ``config.json``
    carries the ``quantization_config`` that lets ``from_pretrained`` rebuild the factored layers;
    the folder also gets ``modeling_ranklm.py`` (+ ``auto_map``) for processes without ranklm,
    a model card, and ``ranklm.json`` with the full record and the sha256 of every weight file.
    """
    from ..hf import REMOTE_FILE, attach, remote_code
    from .card import CARD_FILE, model_card

    meta = build_metadata(model)
    attach(model)
    source, auto_map = remote_code(model)
    model.config.architectures = [type(model).__name__]
    had_auto_map = getattr(model.config, "auto_map", None)
    with atomic_dir(path, overwrite) as tmp:
        model.config.auto_map = {**(had_auto_map or {}), **auto_map}
        try:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        finally:
            if had_auto_map is None:
                del model.config.auto_map
            else:
                model.config.auto_map = had_auto_map
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REMOTE_FILE).write_text(source)
        meta["files"] = {name: sha256_file(tmp / name) for name in _weights_files(tmp)}
        tensors = _tensor_artifacts(getattr(model.ranklm, "artifacts", {}) or {})
        if tensors:  # allocator/base tensors (e.g. ARS hypernetwork state and masks)
            safetensors.torch.save_file(tensors, str(tmp / ARTIFACTS_FILE), metadata={"format": "pt"})
            meta["files"][ARTIFACTS_FILE] = sha256_file(tmp / ARTIFACTS_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
        task = "text-generation" if next(iter(auto_map)) == "AutoModelForCausalLM" else None
        (tmp / CARD_FILE).write_text(model_card(json.loads((tmp / META_FILE).read_text()), next(iter(auto_map)), task,
                                                model.config.quantization_config.modules))
    return Path(path)


__all__ = ["build_metadata", "save"]
