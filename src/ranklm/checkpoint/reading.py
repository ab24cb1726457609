"""Reading a checkpoint strictly: hashes, the rank map against the model rebuilt from config.json, tensor shapes.

``load`` gives back the compressed model (logits bit for bit those of the saved one) with its
tokenizer and ``CompressionState``; ``check_checkpoint`` runs the same checks without reading
the weights into memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig

from ..architectures import model_class_for
from ..atomic import sha256_file
from ..budget import DENSE
from ..errors import RanklmError
from ..layers import LowRankLinear, replace_module
from ..loading.tokenizer import load_tokenizer
from ..state import CompressionState
from ..targets import Target, is_linear_like, weight_matrix
from .metadata import ARTIFACTS_FILE, META_FILE, WEIGHTS_FILE, read_metadata


def verify_files(path: Path, meta: dict[str, Any]) -> None:
    for name, digest in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise RanklmError(f"checkpoint file {f} is missing")
        if sha256_file(f) != digest:
            raise RanklmError(f"hash mismatch for {f}: the file was modified or truncated after it was saved")


def _install_empty(model: nn.Module, meta: dict[str, Any]) -> list[Target]:
    """Put meta-device LowRankLinear modules where the rank map says; check it fits the model."""
    targets = []
    for name, rank in meta["rank_map"].items():
        info = meta["modules"].get(name)
        if info is None:
            raise RanklmError(f"rank map does not fit the model: {name} has no shape entry in {META_FILE}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise RanklmError(f"rank map does not fit the model: it names {name}, which the model does not have") from None
        if not is_linear_like(module):
            raise RanklmError(f"rank map does not fit the model: {name} is a {type(module).__name__}, not a linear layer")
        w = weight_matrix(module)
        if (int(w.shape[0]), int(w.shape[1])) != (info["out"], info["in"]):
            raise RanklmError(
                f"rank map does not fit the model: {name} is {tuple(w.shape)} in the model but "
                f"{(info['out'], info['in'])} in {META_FILE}"
            )
        targets.append(Target(name, info["out"], info["in"], info["kind"], info.get("block", -1)))
        if rank == DENSE:
            continue
        if not isinstance(rank, int) or not 0 < rank < min(info["out"], info["in"]) + 1:
            raise RanklmError(f"rank map does not fit the model: bad rank {rank!r} for {name}")
        layer = LowRankLinear(
            info["in"], info["out"], rank, getattr(module, "bias", None) is not None, info["kind"], device="meta", dtype=w.dtype
        )
        replace_module(model, name, layer)
    return targets


def _empty_model(p: Path, meta: dict[str, Any]) -> tuple[nn.Module, list[Target]]:
    """The checkpoint's model on the meta device with empty LowRankLinear layers installed (rank map checked)."""
    try:
        config = AutoConfig.from_pretrained(p)
    except Exception as e:  # noqa: BLE001
        raise RanklmError(f"cannot read {p / 'config.json'}: {e}") from None
    cls = model_class_for(config)
    dtype = getattr(torch, str(meta.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise RanklmError(f"{p / META_FILE} is corrupt: unknown dtype {meta.get('dtype')!r}")
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "from_config"):  # Auto classes
            model = cls.from_config(config, dtype=dtype)
        else:
            model = cls._from_config(config, dtype=dtype)
    return model, _install_empty(model, meta)


def _check_weight_shapes(shapes: dict[str, tuple[int, ...]], model: nn.Module) -> None:
    """The saved tensors (name -> shape) fit the rebuilt model: no unexpected name, no other shape."""
    expected = dict(model.state_dict())
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise RanklmError(f"checkpoint weights do not fit the model: unexpected tensors {unexpected[:3]}")
    for k, shape in shapes.items():
        if tuple(shape) != tuple(expected[k].shape):
            raise RanklmError(f"checkpoint weights do not fit the model: {k} is {tuple(shape)}, expected {tuple(expected[k].shape)}")


def _open_checkpoint(p: Path, verify: bool) -> tuple[dict[str, Any], nn.Module, Any]:
    """The shared prologue of ``check_checkpoint`` and ``load``: metadata, file hashes, the empty model."""
    meta = read_metadata(p)
    if verify:
        verify_files(p, meta)
    model, targets = _empty_model(p, meta)
    return meta, model, targets


def check_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Validate a checkpoint as ``load`` does, without reading the weights into memory; returns its metadata.

    Checks ranklm.json, the file hashes (``verify``), that the rank map fits the model rebuilt
    from ``config.json`` (names, layer types, shapes, ranks) and that the saved tensors' names and
    shapes (read from the safetensors header) fit it.
    """
    p = Path(path)
    meta, model, _ = _open_checkpoint(p, verify)
    try:
        with safetensors.safe_open(str(p / WEIGHTS_FILE), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RanklmError(f"{p / WEIGHTS_FILE} is corrupt or truncated: {e}") from None
    _check_weight_shapes(shapes, model)
    return meta


def load(path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> tuple[nn.Module, Any]:
    """Rebuild a compressed model from a checkpoint: ``(model, tokenizer)``; logits match the saved model bit for bit."""

    p = Path(path)
    meta, model, targets = _open_checkpoint(p, verify)
    try:
        state = safetensors.torch.load_file(str(p / WEIGHTS_FILE), device=str(device))
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RanklmError(f"{p / WEIGHTS_FILE} is corrupt or truncated: {e}") from None
    _check_weight_shapes({k: tuple(v.shape) for k, v in state.items()}, model)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise RanklmError(f"checkpoint is incomplete: no weights for {missing[:3]}")
    model.to(device).eval()
    tokenizer = load_tokenizer(p)
    model.ranklm = CompressionState(  # type: ignore[assignment]
        config=meta["recipe"].get("config", {}),
        method=meta["recipe"].get("name", ""),
        targets=targets,
        rank_map=meta["rank_map"],
        keep_requested=meta.get("keep_requested"),
        keep_achieved=meta.get("keep_achieved"),
        keep_achieved_model=meta.get("keep_achieved_model"),
        params=meta.get("params", {}),
        calibration=meta.get("calibration"),
        base_model=meta.get("base_model", {}),
        timings=meta.get("timings", {}),
        evaluation=meta.get("evaluation", {}),
        artifacts=dict(meta.get("artifacts", {})),
        training=list(meta.get("training", []) or []),
    )
    if (p / ARTIFACTS_FILE).is_file():
        model.ranklm.artifacts.update(safetensors.torch.load_file(str(p / ARTIFACTS_FILE)))
    return model, tokenizer


__all__ = ["check_checkpoint", "load", "verify_files"]
