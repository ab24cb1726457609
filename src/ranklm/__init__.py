"""ranklm: low-rank compression of transformer LMs with adaptive rank selection.

``method = base decomposition x rank allocation x optional training``::

    import ranklm
    model = ranklm.compress(model, tokenizer, ranklm.CompressConfig(keep=0.8, recipe="svd-llm"))
    ranklm.save(model, tokenizer, "out/ckpt")
    model, tokenizer = ranklm.load("out/ckpt")

The names below are imported on first use (PEP 562), so ``import ranklm.cli`` and ``ranklm --help``
do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from ._version import __version__

_EXPORTS = {
    "CompressionState": ".api",
    "compress": ".api",
    "RECIPES": ".config",
    "CompressConfig": ".config",
    "RanklmError": ".errors",
    "export_dense": ".io",
    "load": ".io",
    "save": ".io",
    "LowRankLinear": ".layers",
    "merge_and_unload": ".hf",
}

__all__ = sorted([*_EXPORTS, "__version__"])


class _DropImportNoise(logging.Filter):
    """torchao (the ``quantize`` extra) logs, on every import (transformers imports it when installed), that its
    CUDA-only kernels do not load on a CPU and that torch.compile now handles its enums: lines about torchao's
    build, not about the run. Dropped; every other torchao or torch record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Failed to load") or "is an Enum subclass and is now natively supported" in msg)


def _quiet_import_noise() -> None:
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addFilter(_DropImportNoise())


_quiet_import_noise()


def _install_transformers_hook() -> None:
    """``quant_method: "ranklm"`` becomes known to transformers when it is imported (ranklm.transformers_hook)."""
    from .transformers_hook import install

    install()


_install_transformers_hook()


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ranklm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
