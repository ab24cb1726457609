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
from .metadata import ARTIFACTS_FILE, FORMAT_VERSION, META_FILE, WEIGHTS_FILE


def _version() -> str:
    from .._version import __version__

    return __version__


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied/shared tensors stored once (the loader re-ties them)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


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
    return {
        "format": "ranklm",
        "format_version": FORMAT_VERSION,
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


def save(model: nn.Module, tokenizer, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a compressed model (and its tokenizer) as a ranklm checkpoint, atomically."""
    meta = build_metadata(model)
    model.config.architectures = [type(model).__name__]
    with atomic_dir(path, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        safetensors.torch.save_file(_unique_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        meta["files"] = {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE)}
        tensors = _tensor_artifacts(getattr(model.ranklm, "artifacts", {}) or {})
        if tensors:  # allocator/base tensors (e.g. ARS hypernetwork state and masks)
            safetensors.torch.save_file(tensors, str(tmp / ARTIFACTS_FILE), metadata={"format": "pt"})
            meta["files"][ARTIFACTS_FILE] = sha256_file(tmp / ARTIFACTS_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
    return Path(path)


__all__ = ["build_metadata", "save"]
