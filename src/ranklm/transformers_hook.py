"""Register ranklm with transformers as soon as both are imported, in either order, without importing either early.

``import ranklm`` must stay light (``ranklm --help`` never imports torch), yet
``import ranklm; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(ckpt)``
must find the ``ranklm`` quantization method. So: if transformers is already imported, register
now; otherwise wrap the loader of the ``transformers`` package so registration runs right after
its ``__init__`` has executed. Registration itself imports only ``transformers.quantizers`` (the
layer class is resolved when a model loads), so it cannot re-enter a half-imported ranklm module.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any


def _register() -> None:
    hf = sys.modules.get("ranklm.hf")
    if hf is not None and not hasattr(hf, "register"):
        return  # ranklm.hf itself is importing transformers: it registers when its own import completes
    from .hf import register

    register()


class _AfterExec(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:  # resource readers etc. go to the real loader
        return getattr(self._loader, name)


class _TransformersFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot: find the real spec with the other finders
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _AfterExec(spec.loader)
        return spec


def install() -> None:
    """Arrange ``ranklm.hf.register()`` for the moment transformers is (or already was) imported."""
    if "transformers" in sys.modules:
        _register()
        return
    if not any(isinstance(f, _TransformersFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersFinder())


__all__ = ["install"]
