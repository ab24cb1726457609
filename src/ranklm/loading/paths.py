"""Where a model comes from: the packaged default, a local folder, a Hugging Face cache snapshot or a hub id.

A name that is neither a folder nor a cached model fails at once naming it, unless it looks like
a hub id and one quick request says the hub has it (``models/nope``, a typo in a relative path,
must not spend half a minute in transformers' download retries).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import RanklmError
from .folders import check_model_folder, has_weights
from .packaged import default_model_dir

# A Hugging Face hub id: "name" or "org/name" (letters, digits, - _ .), nothing path-like
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
HUB_PROBE_TIMEOUT = 5.0  # seconds for the one request that asks the hub whether an uncached id exists
_HUB_PROBES: dict[str, str | None] = {}


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
    return folder if has_weights(folder) else None


def _hub_probe(repo_id: str) -> str | None:
    """None when the hub answers that ``repo_id`` exists; else why not, as a short clause.

    One request, no retries, ``HUB_PROBE_TIMEOUT`` seconds (transformers' own download path retries
    for half a minute before it fails). Remembered for the process.
    """
    if repo_id in _HUB_PROBES:
        return _HUB_PROBES[repo_id]
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

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
        check_model_folder(p)
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


__all__ = ["HUB_ID", "HUB_PROBE_TIMEOUT", "cached_hub_snapshot", "hub_offline", "resolve_model_path"]
