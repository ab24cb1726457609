"""Strict weight loading: weights a load left missing, unexpected or of another shape are an error naming a few.

Also refused before any weights are read: a folder without ``ranklm.json`` whose weights are
ranklm factors (``X.A.weight`` with ``X.B.weight``, or quantized: ``X.A.qweight`` with ``X.B.qweight``)
or quantized dense weights (``X.qweight`` with ``X.scale`` and ``X.zero``), which loaded as a dense model
would leave those layers random.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import RanklmError
from .folders import is_checkpoint

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
    """The ``X.A.weight`` names that come with an ``X.B.weight`` (LowRankLinear factors; ``X.A.qweight`` with
    ``X.B.qweight`` when quantized), then the ``X.qweight`` names that come with ``X.scale`` and ``X.zero``
    outside a factor (a quantized dense layer)."""
    names = set(names)
    factors = sorted(n for suffix in (".weight", ".qweight") for n in names
                     if n.endswith(".A" + suffix) and n[: -len(".A" + suffix)] + ".B" + suffix in names)
    dense = sorted(n for n in names if n.endswith(".qweight") and not n.endswith((".A.qweight", ".B.qweight"))
                   and {n[: -len("qweight")] + s for s in ("scale", "zero")} <= names)
    return factors + dense


def _refuse_factors(path: str | Path, factors: list[str]) -> None:
    what = "factors" if factors[0].endswith((".A.weight", ".A.qweight")) else "quantized codes"
    raise RanklmError(
        f"{path} holds ranklm-compressed weights ({what} such as {factors[0]}) but neither a ranklm.json nor a "
        "ranklm quantization_config in config.json: it is a ranklm checkpoint missing its ranklm.json (e.g. "
        "saved with save_pretrained by a ranklm before format 2, or uploaded without it); loaded as a dense model "
        "its compressed layers would be random: put its ranklm.json back next to config.json"
    )


def refuse_factored_folder(path: str | Path) -> None:
    """RanklmError for a local folder that is not a ranklm checkpoint (no ranklm.json, no ranklm
    quantization_config) but whose weights are ranklm factors; checked before any weights are read."""
    p = Path(path)
    if not p.is_dir() or is_checkpoint(p):
        return
    factors = ranklm_factor_names(_weight_names(p))
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


def new_head_keys(model: nn.Module, loading: dict[str, Any], new_head: bool) -> Callable[[str], bool] | None:
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


def first_line(e: BaseException) -> str:
    """An exception's first line (its type name when it has no text): the cause in a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


__all__ = ["FACTOR_SUFFIXES", "check_loading_info", "first_line", "new_head_keys", "ranklm_factor_names",
           "refuse_factored_folder"]
