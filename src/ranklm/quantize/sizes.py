"""Bytes as stored (docs/design.md §11): what a target or a model occupies in its checkpoint, and the prices
of the joint allocator's options. Biases are left out of a target's bytes, as they are of its parameter
cost (§2): they never change."""

from __future__ import annotations

import torch
from torch import nn

GROUP_META_BYTES = 3  # per group: a float16 scale and an int8 zero point


def dense_bytes(out: int, inp: int, element_size: int) -> int:
    return out * inp * element_size


def quantized_bytes(out: int, inp: int, bits: int, group_size: int) -> int:
    """``QuantizedLinear`` of an out x in matrix: packed codes (the last group padded) + scales + zeros."""
    from ..modeling_ranklm import group_axis

    rows, cols = (out, inp) if group_axis(inp, out, group_size) == "in" else (inp, out)
    groups = -(-cols // group_size)
    return rows * (-(-groups * group_size * bits // 8) + GROUP_META_BYTES * groups)


def factored_bytes(out: int, inp: int, rank: int, bits: int | None, group_size: int, element_size: int) -> int:
    """Both factors at ``rank``: float in the model's dtype (``bits`` None) or quantized (B: k x in, A: out x k)."""
    if bits is None:
        return rank * (out + inp) * element_size
    return quantized_bytes(rank, inp, bits, group_size) + quantized_bytes(out, rank, bits, group_size)


def _tensor_bytes(module: nn.Module) -> int:
    """Bytes of a leaf layer's stored weight (weight or qweight + scale + zero), without its bias."""
    if hasattr(module, "qweight"):
        return sum(t.numel() * t.element_size() for t in (module.qweight, module.scale, module.zero))
    w = module.weight
    return w.numel() * w.element_size()


def stored_target_bytes(module: nn.Module) -> int:
    """Bytes a target occupies as stored: dense, factored (A and B) or quantized, biases excluded."""
    if hasattr(module, "A") and hasattr(module, "B"):
        return _tensor_bytes(module.A) + _tensor_bytes(module.B)
    return _tensor_bytes(module)


def model_stored_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the checkpoint stores (tied weights once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.state_dict().values()):
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def bytes_summary(model: nn.Module, targets: list | None = None, dense_bytes: int | None = None) -> dict[str, float | int]:
    """Bytes of a ranklm model as stored: its targets (default: those of its compression state) and their dense
    bytes (default: in the model's dtype), the whole model, and bits per dense target weight; ``ranklm
    compress``/``evaluate``/``bench`` print these beside the ratios, and the quantization stage records them."""
    if targets is None:
        targets = list(getattr(getattr(model, "ranklm", None), "targets", None) or [])
    dense_params = sum(t.dense_params for t in targets)
    if dense_bytes is None:
        dtype = getattr(model, "dtype", None) or next(p.dtype for p in model.parameters() if p.is_floating_point())
        dense_bytes = dense_params * torch.empty((), dtype=dtype).element_size()
    stored = sum(stored_target_bytes(model.get_submodule(t.name)) for t in targets)
    return {"target_bytes": stored, "target_bytes_dense": dense_bytes,
            "target_bytes_ratio": stored / dense_bytes if dense_bytes else 1.0,
            "bits_per_target_weight": 8.0 * stored / dense_params if dense_params else 0.0,
            "model_bytes": model_stored_bytes(model)}
