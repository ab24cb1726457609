"""``--dtype`` values: ``auto`` (the model folder's own dtype) or a torch dtype."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RanklmError

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


def dtype_name(model: nn.Module) -> str:
    """The dtype of a model's first parameter without ``torch.``: ``float32``, ``bfloat16``, ..."""
    return str(next(model.parameters()).dtype).replace("torch.", "")


__all__ = ["DTYPES", "DTYPE_ALIASES", "dtype_name", "parse_dtype"]
