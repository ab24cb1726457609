"""Checkpoints: safetensors + ranklm.json, written atomically, loaded strictly (docs/design.md §3).

A checkpoint directory holds the Hugging Face ``config.json`` (+ generation
config and tokenizer files), ``model.safetensors`` with the factor weights under
their module names (``...q_proj.A.weight``, ``...q_proj.B.weight``) and
``ranklm.json`` (rank map, recipe, ratios, versions, calibration, sha256).
It is written to ``DIR.tmp-XXXX`` next to its destination, fsynced, and renamed
into place, so an interrupted save never leaves a half directory under the final
name. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import safetensors
import safetensors.torch
import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from .architectures import model_class_for
from .budget import DENSE
from .errors import RanklmError
from .layers import LowRankLinear, merge_low_rank, replace_module
from .state import CompressionState
from .targets import Target, is_linear_like, weight_matrix

FORMAT_VERSION = 1
META_FILE = "ranklm.json"
WEIGHTS_FILE = "model.safetensors"
ARTIFACTS_FILE = "allocator.safetensors"  # tensors an allocator left in CompressionState.artifacts


def _version() -> str:
    from ._version import __version__

    return __version__


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing destination unless ``overwrite``; call before any long work."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise RanklmError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise RanklmError(f"output {out} exists and is not a directory")
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (else set and restore at once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_dir_mode(folder: Path) -> None:
    """Give a ``tempfile.mkdtemp`` folder (0700) the mode ``mkdir`` would: 0777 less the umask (0755 usually)."""
    os.chmod(folder, 0o777 & ~_umask())


def public_tree_modes(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask (0755/0644 usually), as ``save_pretrained`` leaves them:
    ``mkdtemp`` makes 0700 folders and safetensors writes 0600 files."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``path``; on success rename it to ``path``, on any failure remove it."""
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        public_dir_mode(tmp)  # mkdtemp makes it 0700; the checkpoint is a folder like save_pretrained's
        yield tmp
        public_tree_modes(tmp)
        _fsync_tree(tmp)
        if out.exists():
            if _exchange(tmp, out):  # atomic swap: the old checkpoint now sits in tmp
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # no renameat2: two renames (a crash between them leaves the old one in *.old-*)
                trash = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
                os.replace(out, trash / out.name)
                os.replace(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# Files a tokenizer is loaded from (any one present means the folder has a tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json", "vocab.model", "tokenizer.tiktoken")


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    p = Path(folder)
    return any((p / name).is_file() for name in TOKENIZER_FILES) or any(p.glob("*.tiktoken"))


def load_tokenizer(path: str | os.PathLike, local: bool = True, **kwargs: Any):
    """The tokenizer of a model folder; None when it has no tokenizer files at all.

    Files present but unloadable (corrupt ``tokenizer.json``, a tokenizer class this transformers
    lacks, a missing ``sentencepiece``) is an error naming the folder and the cause, not a later
    "tokenizer missing". ``local=False`` (a hub id): a repository without tokenizer files (an
    ``OSError`` from transformers) gives None, any other failure is an error.
    """
    if local and not has_tokenizer_files(path) and "gguf_file" not in kwargs:
        return None
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - one line naming the folder and the cause
        if not local and isinstance(e, OSError):
            return None
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RanklmError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {cause}") from None


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
    if meta.get("format_version") != FORMAT_VERSION:
        raise RanklmError(
            f"{meta_path} has format version {meta.get('format_version')!r}; this ranklm reads version {FORMAT_VERSION}"
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


def export_dense(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Multiply the factors back and write a plain Hugging Face folder (no ranklm needed to load it)."""
    check_output_dir(out, overwrite)
    model, tokenizer = load(checkpoint)
    merge_low_rank(model)
    del model.ranklm
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def metadata_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The parts of ranklm.json people look at first."""
    return {k: meta.get(k) for k in ("recipe", "keep_requested", "keep_achieved", "keep_achieved_model", "params", "base_model")}


__all__ = ["save", "load", "export_dense", "read_metadata", "validate_metadata", "check_checkpoint", "atomic_dir",
           "check_output_dir"]
