"""Factorizations kept on disk: the spectra in memory, the factors in safetensors files of a temporary folder.

Why: the global knapsack reads only each target's spectrum (``Factorization.s`` and its ``meta``), but the
factors of every target together are as large as the targets in float32 (4 GB for a 1 B model). The
bounded mode (``pipeline.bounded``) writes each block's factors here as soon as they are computed and
keeps a ``SpilledFactorization`` per target; installation reads back only the allocated prefix
(``factors(k)``: the first k rows of ``B`` and of ``A`` stored transposed, so a prefix is one contiguous
read). Writing them once costs disk I/O, recomputing them at the allocated rank would cost a second
statistics pass and every SVD again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from ..decompose import Factorization
from ..errors import RanklmError

SPILL_DIR_ENV = "RANKLM_SPILL_DIR"  # where the temporary folder goes (default: the system's temporary folder)


def spill_parent() -> Path:
    return Path(os.environ.get(SPILL_DIR_ENV) or tempfile.gettempdir())


def spill_folder(owner: Any, prefix: str, what: str, parent: str | os.PathLike | None = None) -> tuple[Path, Any]:
    """A new temporary folder under ``parent`` (default ``spill_parent()``) and the finalizer that removes it
    when ``owner`` is garbage-collected (call it to remove it now); one error line naming ``what`` if it fails."""
    parent = Path(parent) if parent is not None else spill_parent()
    try:
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as e:
        raise RanklmError(f"cannot create a folder for {what} in {parent}: {e.strerror or e} "
                          f"(set {SPILL_DIR_ENV} to a writable folder)") from None
    return folder, weakref.finalize(owner, shutil.rmtree, str(folder), True)


class FactorStore:
    """A temporary folder of factor files, one per block; removed by ``close()`` or when garbage-collected."""

    def __init__(self, parent: str | os.PathLike | None = None) -> None:
        self.dir, self._finalizer = spill_folder(self, "ranklm-factors-", "spilled factors", parent)
        self.bytes = 0
        self._files = 0

    def put(self, facs: dict[str, Factorization]) -> dict[str, "SpilledFactorization"]:
        """Write ``facs`` (one block's) to one file; their spilled stand-ins, spectra and meta kept in memory."""
        from safetensors.torch import save_file

        path = self.dir / f"block-{self._files:05d}.safetensors"
        self._files += 1
        tensors: dict[str, torch.Tensor] = {}
        for name, f in facs.items():
            tensors[f"{name}.At"] = f.A.detach().cpu().t().contiguous()  # r x out: a rank prefix is contiguous
            tensors[f"{name}.B"] = f.B.detach().cpu().contiguous()
        try:
            save_file(tensors, str(path))
        except OSError as e:
            raise RanklmError(f"cannot write spilled factors to {path}: {e.strerror or e} "
                              f"(set {SPILL_DIR_ENV} to a folder with room, or --memory-mode whole)") from None
        self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        return {name: SpilledFactorization(path, name, f.s.detach().cpu(), dict(f.meta), f.max_rank,
                                           f.A.dtype, f.A.device) for name, f in facs.items()}

    def close(self) -> None:
        self._finalizer()


class SpilledFactorization:
    """A ``Factorization`` whose ``A``/``B`` live in a file: ``s``, ``meta`` and ``max_rank`` in memory,
    ``factors(k)`` reads the first k components (``A``/``B`` read everything: for callers that need all)."""

    def __init__(self, path: Path, name: str, s: torch.Tensor, meta: dict[str, Any], max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.path, self.name, self.s, self.meta = path, name, s, meta
        self._max_rank, self.dtype, self.device = int(max_rank), dtype, device

    @property
    def max_rank(self) -> int:
        return self._max_rank

    def _read(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            at = f.get_slice(f"{self.name}.At")[:k]
            b = f.get_slice(f"{self.name}.B")[:k]
        return at.t().to(self.device), b.to(self.device)

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= k <= self.max_rank:
            raise ValueError(f"rank {k} outside [0, {self.max_rank}]")
        return self._read(k)

    def approx(self, k: int) -> torch.Tensor:
        a, b = self.factors(k)
        return a @ b

    @property
    def A(self) -> torch.Tensor:
        return self._read(self.max_rank)[0]

    @property
    def B(self) -> torch.Tensor:
        return self._read(self.max_rank)[1]

    def load(self) -> Factorization:
        """The whole factorization in memory."""
        a, b = self._read(self.max_rank)
        return Factorization(a, b, self.s, meta=self.meta)


__all__ = ["FactorStore", "SPILL_DIR_ENV", "SpilledFactorization", "spill_folder", "spill_parent"]
