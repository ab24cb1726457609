"""Reading a checkpoint strictly: hashes, the compression config against the weights and the model, then transformers' loader.

``load`` resolves a local folder or a cached hub id, checks the sha256 of every weight file
listed in ``ranklm.json``, and loads through ``from_pretrained`` with the ranklm quantizer
(``ranklm.hf``): the factored layers are built before any weight is read, shards stream one by
one, and ``dtype``/``device_map`` work as for any transformers model. The logits equal the saved
model's bit for bit. A folder written by ``save_pretrained`` (config.json carries the
``quantization_config``, no ``ranklm.json``) loads the same way, without hashes to check.
``check_checkpoint`` runs the same checks without reading the weights into memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig

from ..architectures import model_class_for
from ..atomic import sha256_file
from ..errors import RanklmError
from ..hf import (
    MARKER_SUFFIX,
    QUANT_METHOD,
    RanklmQuantizationConfig,
    check_tensors,
    checkpoint_shapes,
    install_layers,
)
from ..layers import LowRankLinear
from ..loading.dtypes import parse_dtype
from ..loading.offload import offload_folder, parse_device_map
from ..loading.strict import check_loading_info, first_line
from ..loading.tokenizer import load_tokenizer
from ..state import CompressionState
from ..targets import Target
from .metadata import ARTIFACTS_FILE, META_FILE, read_metadata

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def verify_files(path: Path, meta: dict[str, Any]) -> None:
    for name, digest in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise RanklmError(f"checkpoint file {f} is missing")
        if sha256_file(f) != digest:
            raise RanklmError(f"hash mismatch for {f}: the file was modified or truncated after it was saved")


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """A local checkpoint folder, or the snapshot of a hub id in the Hugging Face cache."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    from ..loading.paths import HUB_ID, cached_hub_snapshot

    if not p.exists() and HUB_ID.match(str(path)):
        snapshot = cached_hub_snapshot(str(path))
        if snapshot is not None:
            return snapshot
        raise RanklmError(f"checkpoint {path} is not a local folder and not in the Hugging Face cache "
                          f"(download it first, e.g. huggingface-cli download {path})")
    raise RanklmError(f"checkpoint {p} does not exist or is not a folder")


def weight_files(p: Path) -> list[Path]:
    """The checkpoint's weight files: the shards its index lists, or its single model.safetensors."""
    index = p / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise RanklmError(f"{index} is corrupt: {e}") from None
        return [p / n for n in names]
    if (p / SINGLE_FILE).is_file():
        return [p / SINGLE_FILE]
    raise RanklmError(f"checkpoint {p} has no weights ({SINGLE_FILE} or {INDEX_FILE})")


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    for f in files:
        if not f.is_file():
            raise RanklmError(f"checkpoint file {f} is missing")
    try:
        return checkpoint_shapes([str(f) for f in files])
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged header
        raise RanklmError(f"{files[0].parent} holds a corrupt or truncated weights file: {first_line(e)}") from None


def _config_from_v1(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The quantization_config a version-1 checkpoint (rank map in ranklm.json only) implies."""
    modules = {}
    for name, rank in meta["rank_map"].items():
        info = meta["modules"][name]
        modules[name] = {"rank": rank, "out": info["out"], "in": info["in"], "kind": info["kind"],
                         "bias": f"{name}.A.bias" in shapes, "block": info.get("block", -1)}
    return {"quant_method": QUANT_METHOD, "format_version": 2, "modules": modules}


def _open(p: Path, verify: bool) -> tuple[dict[str, Any] | None, Any, RanklmQuantizationConfig, list[Path], dict]:
    """(ranklm.json or None, config with its quantization_config, that config parsed, weight files, tensor shapes)."""
    meta = read_metadata(p) if (p / META_FILE).is_file() else None
    if meta is not None and verify:
        verify_files(p, meta)
    try:
        config = AutoConfig.from_pretrained(p)
    except Exception as e:  # noqa: BLE001
        raise RanklmError(f"cannot read {p / 'config.json'}: {first_line(e)}") from None
    files = weight_files(p)
    shapes = _shapes(files)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        if meta is None:
            raise RanklmError(f"{p} is not a ranklm checkpoint: it has no {META_FILE} and its config.json no "
                              f"quantization_config")
        qc = _config_from_v1(meta, shapes)
        config.quantization_config = qc
    if isinstance(qc, dict) and qc.get("quant_method") != QUANT_METHOD:
        raise RanklmError(f"{p} is not a ranklm checkpoint: its quantization_config is {qc.get('quant_method')!r}")
    try:
        parsed = qc if isinstance(qc, RanklmQuantizationConfig) else RanklmQuantizationConfig.from_dict(dict(qc))
        if meta is not None:
            _check_meta_agrees(meta, parsed)
    except ValueError as e:
        raise RanklmError(f"{p}: {e}") from None
    return meta, config, parsed, files, shapes


def _checked_empty_model(p: Path, verify: bool) -> tuple[dict[str, Any] | None, Any, RanklmQuantizationConfig, nn.Module,
                                                          dict[str, tuple[int, ...]]]:
    """``_open``, then the compression config against the model's structure and the weights' shapes
    (the checks ``load`` and ``check_checkpoint`` share, so both give the same error line)."""
    meta, config, qc, _, shapes = _open(p, verify)
    model = _empty_model(config, qc, _saved_dtype(meta, config))
    try:
        check_tensors(qc, shapes)
    except ValueError as e:
        raise RanklmError(str(e)) from None
    return meta, config, qc, model, shapes


def _check_meta_agrees(meta: dict[str, Any], qc: RanklmQuantizationConfig) -> None:
    """ranklm.json's rank map and config.json's quantization_config describe the same compression."""
    for name, rank in meta["rank_map"].items():
        if name not in qc.modules:
            raise ValueError(f"{META_FILE} names {name}, which config.json's quantization_config does not list")
        if qc.modules[name].get("rank") != rank:
            raise ValueError(f"{META_FILE} gives {name} rank {rank}, config.json's quantization_config "
                             f"{qc.modules[name].get('rank')}")


def _targets(qc: RanklmQuantizationConfig) -> list[Target]:
    return [Target(n, i["out"], i["in"], i.get("kind", "linear"), i.get("block", -1)) for n, i in qc.modules.items()]


def _state(meta: dict[str, Any] | None, qc: RanklmQuantizationConfig) -> CompressionState:
    rank_map = {n: i["rank"] for n, i in qc.modules.items()}
    meta = meta or {"recipe": {}}
    return CompressionState(
        config=meta["recipe"].get("config", {}),
        method=meta["recipe"].get("name", ""),
        targets=_targets(qc),
        rank_map=rank_map,
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


def _empty_model(config: Any, qc: RanklmQuantizationConfig, dtype: torch.dtype) -> nn.Module:
    cls = model_class_for(config)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype) if hasattr(cls, "from_config") else cls._from_config(config, dtype=dtype)
    try:
        install_layers(model, qc, LowRankLinear)
    except ValueError as e:
        raise RanklmError(str(e)) from None
    return model


def _saved_dtype(meta: dict[str, Any] | None, config: Any) -> torch.dtype:
    name = (meta or {}).get("dtype") or str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise RanklmError(f"checkpoint dtype {name!r} is not a torch dtype")
    return dtype


def check_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Validate a checkpoint as ``load`` does, without reading the weights into memory; returns its metadata.

    Checks ranklm.json, the file hashes (``verify``), that the compression config fits the weights
    (every factor's shape, and the quantized codes', scales' and zero points', read from the safetensors headers) and the model rebuilt from
    ``config.json`` (names, layer types, shapes), and that no saved tensor is foreign to that model.
    """
    p = checkpoint_folder(path)
    meta, config, qc, model, shapes = _checked_empty_model(p, verify)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    markers = {f"{n}{MARKER_SUFFIX}" for n in qc.installed()}
    for k, shape in shapes.items():
        if k in markers:
            continue
        if k not in expected:
            raise RanklmError(f"checkpoint weights do not fit the model: unexpected tensor {k}")
        if tuple(shape) != expected[k]:
            raise RanklmError(f"checkpoint weights do not fit the model: {k} is {tuple(shape)}, expected {expected[k]}")
    return meta if meta is not None else {"rank_map": {n: i["rank"] for n, i in qc.modules.items()}}


def load(path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True,
         dtype: torch.dtype | str | None = None, device_map: str | dict | None = None) -> tuple[nn.Module, Any]:
    """Rebuild a compressed model from a checkpoint: ``(model, tokenizer)``; logits match the saved model bit for bit.

    ``path``: a local folder or a hub id in the Hugging Face cache. ``dtype``: the saved one unless
    given. ``device_map`` (e.g. ``"auto"``): spread over devices / offload through accelerate.
    """
    p = checkpoint_folder(path)
    meta, config, qc, _, _ = _checked_empty_model(p, verify)  # importing ranklm.hf registered the quantizer
    kwargs: dict[str, Any] = {}
    if device_map is not None:
        kwargs = {"device_map": parse_device_map(device_map), "offload_folder": offload_folder()}
    if dtype is not None:
        dtype = parse_dtype(dtype)  # "auto", a torch dtype, or one error line naming the bad value
    cls = model_class_for(config)
    try:
        model, loading = cls.from_pretrained(p, config=config, dtype=dtype or _saved_dtype(meta, config),
                                             output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers and safetensors raise many types; say what it was
        raise RanklmError(f"cannot load checkpoint {p}: {first_line(e)}") from None
    check_loading_info(p, model, loading)
    if device_map is None:
        model.to(device)
    model.eval()
    model.ranklm = _state(meta, qc)  # type: ignore[assignment]
    if (p / ARTIFACTS_FILE).is_file():
        import safetensors.torch

        model.ranklm.artifacts.update(safetensors.torch.load_file(str(p / ARTIFACTS_FILE)))
    return model, load_tokenizer(p)


__all__ = ["check_checkpoint", "checkpoint_folder", "load", "verify_files", "weight_files"]
