"""accelerate device maps: parsing ``--device-map``, the offload folder, and onloading offloaded weights."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import RanklmError

logger = logging.getLogger(__name__)


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
    from accelerate.hooks import (
        AlignDevicesHook,
        SequentialHook,
        add_hook_to_module,
        remove_hook_from_module,
    )
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


__all__ = ["offload_folder", "onload_offloaded", "parse_device_map"]
