"""Loading models: the packaged default, any Hugging Face folder or hub id, or a ranklm checkpoint.

``load_model`` (decoders, and any model a ranklm checkpoint holds) and ``load_classifier``
(sequence classifiers) are here; the parts they are built from live in ``ranklm.loading``
(dtypes, packaged defaults, paths and the hub, strict weight checks, device maps, tokenizers)
and are importable from here as well.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from .architectures import is_causal_lm_config, model_class_for
from .errors import RanklmError
from .loading.dtypes import DTYPE_ALIASES, DTYPES, dtype_name, parse_dtype
from .loading.folders import WEIGHT_PATTERNS, is_checkpoint, weights_sha256
from .loading.offload import offload_folder, onload_offloaded, parse_device_map
from .loading.packaged import (
    DEFAULT_ENCODER_NAME,
    DEFAULT_MODEL_NAME,
    GGUF_FILE,
    cache_dir,
    default_encoder_dir,
    default_model_dir,
)
from .loading.paths import (
    HUB_ID,
    HUB_PROBE_TIMEOUT,
    cached_hub_snapshot,
    hub_offline,
    resolve_model_path,
)
from .loading.strict import (
    FACTOR_SUFFIXES,
    check_loading_info,
    first_line,
    new_head_keys,
    ranklm_factor_names,
    refuse_factored_folder,
)
from .loading.tokenizer import load_tokenizer, require_tokenizer

logger = logging.getLogger(__name__)


def config_is_encoder(model: str | None) -> bool:
    """True for a model without a causal LM head (BERT-like encoders, sequence classifiers, masked LMs).

    Reads only the config (a ranklm checkpoint's or the resolved folder's). A path that does not
    resolve raises ``resolve_model_path``'s RanklmError; a config that cannot be read gives False so
    that ``load_model`` reports it with its own message; anything else (a bug) propagates.
    """
    if model is None or model == "default":
        return False
    path = str(model) if is_checkpoint(model) else resolve_model_path(model)[0]
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:  # unreadable / unknown config: load_model says so
        logger.debug("cannot read the config of %s (%s): load_model reports it", path, e)
        return False
    return not is_causal_lm_config(config)


def config_json(model: nn.Module) -> dict:
    return json.loads(model.config.to_json_string())


def load_model(
    model: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer or None, source info) for a folder, hub id, ranklm checkpoint or the default.

    ``device_map`` (e.g. ``"auto"``) spreads a model that does not fit one device over the
    available devices through accelerate (statistics accumulate in float64 in CPU memory).
    Weights it offloads to CPU or disk stay offloaded until ``compress`` onloads them
    (``onload_offloaded``). ``dtype`` is a torch dtype or ``"auto"`` (the folder's own dtype; a
    ranklm checkpoint always loads in the dtype it was saved in unless a torch dtype is given).
    """
    dtype = parse_dtype(dtype)
    ckpt = model if model is not None and is_checkpoint(model) else None
    if ckpt is None:
        path, local = resolve_model_path(model)
        if local and model not in (None, "default") and is_checkpoint(path):
            ckpt = path  # a ranklm checkpoint from the Hugging Face cache
    if ckpt is not None:
        from .checkpoint.reading import load

        m, tok = load(ckpt, device=device, dtype=dtype if isinstance(dtype, torch.dtype) else None,
                      device_map=device_map)
        return m, tok, {"name_or_path": str(model), "checkpoint": True, "dtype": dtype_name(m)}
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - report the problem, not transformers' stack
        raise RanklmError(f"cannot read the model config at {path}: {e}") from None
    cls = model_class_for(config)
    if local:
        refuse_factored_folder(path)
    try:
        kwargs = {}
        if device_map is not None:
            kwargs = {"device_map": parse_device_map(device_map), "offload_folder": offload_folder()}
        m, loading = cls.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise RanklmError(f"cannot load the model weights from {path}: {first_line(e)}") from None
    check_loading_info(path, m, loading)
    if device_map is None:
        m.to(device)
    m.eval()
    tok = load_tokenizer(path, local=local)  # None without tokenizer files; an error if they do not load
    info: dict = {"name_or_path": DEFAULT_MODEL_NAME if model in (None, "default") else str(model), "path": path,
                  "dtype": dtype_name(m)}
    if local:
        info["weights_sha256"] = weights_sha256(Path(path))
    return m, tok, info


def load_classifier(model: str | None, label_names: list[str], seed: int = 0, dtype: torch.dtype = torch.float32
                    ) -> tuple[nn.Module, object, dict]:
    """An ``AutoModelForSequenceClassification`` for a task with ``label_names`` (docs/design.md §5).

    ``model``: None for the packaged all-MiniLM-L6-v2, any folder ``AutoModelForSequenceClassification``
    loads (an encoder gets a new head, initialised from ``seed``; a classifier with other labels gets
    a new head too), or a ranklm checkpoint of a classifier (evaluation). The head is never a target.
    """
    from transformers import AutoModelForSequenceClassification

    if model in (None, "default"):
        path, local = default_encoder_dir(), True
    elif is_checkpoint(model):
        path, local = Path(model), True
    else:
        resolved, local = resolve_model_path(model)
        path = Path(resolved) if local else resolved
    if local and is_checkpoint(path):
        m, tok, info = load_model(str(path))
        info["name_or_path"] = str(model)
        if not hasattr(m, "classifier") and "SequenceClassification" not in type(m).__name__:
            raise RanklmError(f"{model} is not a sequence classifier ({type(m).__name__})")
        return m, tok, info
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise RanklmError(f"cannot read the model config at {path}: {e}") from None
    n = len(label_names)
    id2label = {i: name for i, name in enumerate(label_names)}
    same = int(getattr(config, "num_labels", 0)) == n and dict(getattr(config, "id2label", {}) or {}) == id2label
    kwargs = {} if same else {"num_labels": n, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()},
                               "ignore_mismatched_sizes": True}
    if local:
        refuse_factored_folder(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new head's initialisation: the same in every process of a data-parallel run
        try:
            m, loading = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                                            **kwargs)
        except Exception as e:  # noqa: BLE001
            raise RanklmError(f"cannot load {path} as a sequence classifier: {first_line(e)}") from None
    check_loading_info(path, m, loading, new=new_head_keys(m, loading, new_head=not same))
    m.eval()
    tok = load_tokenizer(path, local=local)
    info: dict = {"name_or_path": DEFAULT_ENCODER_NAME if model in (None, "default") else str(model), "path": str(path)}
    if local:
        info["weights_sha256"] = weights_sha256(Path(path))
    return m, tok, info


# defined here and in ranklm.loading (re-exported: every name importable from here as before)
__all__ = [
    "DEFAULT_ENCODER_NAME",
    "DEFAULT_MODEL_NAME",
    "DTYPES",
    "DTYPE_ALIASES",
    "FACTOR_SUFFIXES",
    "GGUF_FILE",
    "HUB_ID",
    "HUB_PROBE_TIMEOUT",
    "WEIGHT_PATTERNS",
    "cache_dir",
    "cached_hub_snapshot",
    "check_loading_info",
    "config_is_encoder",
    "config_json",
    "default_model_dir",
    "hub_offline",
    "is_checkpoint",
    "load_classifier",
    "load_model",
    "offload_folder",
    "onload_offloaded",
    "parse_device_map",
    "parse_dtype",
    "ranklm_factor_names",
    "refuse_factored_folder",
    "require_tokenizer",
    "resolve_model_path",
    "weights_sha256",
]
