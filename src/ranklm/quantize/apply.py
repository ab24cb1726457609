"""Quantize a compressed model's targets in place (after factorization and any training): both factors of a
factored target, or the dense weight of one kept dense. torchao's ``quantize_(model, config, filter_fn)`` is
the model; ranklm keeps its own layer because the stored codes must be packed (torchao's unpacked int8 form
of int2-int7 stores a byte per weight) and loadable without torchao (``modeling_ranklm.py``)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RanklmError
from ..layers import replace_module
from ..targets import Conv1D, Target
from .affine import quantize_matrix
from .spec import WIDTHS


def _float_weight(name: str, module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if hasattr(module, "qweight") or not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise RanklmError(f"--quantize: cannot quantize {name}: it is a {type(module).__name__} without a floating-point "
                          "weight (already quantized?); quantize a float model")
    if w.device.type == "meta":
        raise RanklmError(f"--quantize: cannot quantize {name}: its weight is offloaded (meta); load it onto a device")
    return w


def check_quantizable(model: nn.Module, targets: list[Target], group_size: int) -> None:
    """Before any long work: every target is a float linear layer whose input size the group size divides."""
    for t in targets:
        module = model.get_submodule(t.name)
        for side in ("A", "B") if hasattr(module, "A") and hasattr(module, "B") else ():
            _float_weight(f"{t.name}.{side}", getattr(module, side))
        if not (hasattr(module, "A") and hasattr(module, "B")):
            _float_weight(t.name, module)
        if t.in_features % group_size:
            divisors = [g for g in (16, 32, 64, 128, 256) if t.in_features % g == 0]
            raise RanklmError(f"--quant-group-size {group_size} does not divide the input size {t.in_features} of "
                              f"{t.name}; group sizes that do: {', '.join(map(str, divisors)) or 'none of 16-256'}")


def quantize_targets(model: nn.Module, targets: list[Target], bits: dict[str, int], group_size: int) -> None:
    """Replace each target's weights by ``QuantizedLinear`` at ``bits[name]`` (a name absent: left in float)."""
    for t in targets:
        b = bits.get(t.name)
        if b is None:
            continue
        if b not in WIDTHS:
            raise RanklmError(f"unknown quantization width int{b} for {t.name}; valid: "
                              f"{', '.join(f'int{w}' for w in WIDTHS)}")
        module = model.get_submodule(t.name)
        if hasattr(module, "A") and hasattr(module, "B"):
            for side in ("A", "B"):
                lin = getattr(module, side)
                w = _float_weight(f"{t.name}.{side}", lin)
                setattr(module, side, quantize_matrix(w, b, group_size, getattr(lin, "bias", None)))
            module.bits = b
        else:
            w = _float_weight(t.name, module)
            if Conv1D is not None and isinstance(module, Conv1D):
                w = w.t()  # Conv1D stores in x out; QuantizedLinear computes x W^T + b like nn.Linear
            layer = quantize_matrix(w, b, group_size, getattr(module, "bias", None))
            layer.source_kind = "conv1d" if Conv1D is not None and isinstance(module, Conv1D) else "linear"
            replace_module(model, t.name, layer)
