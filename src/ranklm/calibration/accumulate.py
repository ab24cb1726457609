"""The streaming accumulators every calibration statistic shares: product dtype, float64 running sums on the CPU.

Each batch's product is computed in float32 (or the activations' dtype if wider) and only the
running sum is float64: the float64 matmul dominated calibration time, while one batch (a few
thousand tokens) loses only ~1e-6 relative precision in float32, and the sum over batches, where
rounding would accumulate, stays float64. Set ``FLOAT64_PRODUCTS = True`` here (or the
environment variable ``RANKLM_GRAM_FLOAT64=1``) to compute the products in float64.

By default running sums live in CPU memory in float64: on an accelerator each batch's product is
computed where the activations are and added on the CPU, so device memory holds the model and one
batch, never the statistics. ``running_sums(torch.float32, on_device=True)`` (``--stats-dtype
float32``, the default on a GPU) keeps them in float32 where the activations are instead: no
device-to-host copy per batch and target, half the memory, at a measured cost in accuracy
(tests/test_stats_dtype.py, benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from ..errors import RanklmError

FLOAT64_PRODUCTS: bool = os.environ.get("RANKLM_GRAM_FLOAT64", "") not in ("", "0")


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of one batch's ``x^T x``: float32, or wider if the activations are, or float64 if forced."""
    return torch.float64 if FLOAT64_PRODUCTS else torch.promote_types(dtype, torch.float32)


_RUNNING: dict[str, object] = {"dtype": torch.float64, "on_device": False}


@contextlib.contextmanager
def running_sums(dtype: torch.dtype = torch.float64, on_device: bool = False) -> Iterator[None]:
    """Within the block, running sums are ``dtype``, kept where the activations are (``on_device``) or on the CPU."""
    old = dict(_RUNNING)
    _RUNNING.update(dtype=dtype, on_device=on_device)
    try:
        yield
    finally:
        _RUNNING.update(old)


def to_running(part: torch.Tensor) -> torch.Tensor:
    """One batch's product in the running sums' dtype and place (float64 on the CPU unless ``running_sums``)."""
    device = part.device if _RUNNING["on_device"] else torch.device("cpu")
    return part.to(device=device, dtype=_RUNNING["dtype"])  # type: ignore[arg-type]


def add_sum(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """``total + part`` in place (``part`` itself on the first batch); ``part`` already ``to_running``."""
    return part if total is None else total.add_(part)


def add_product(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``total + x^T x``: one batch's product where ``x`` lives, added to the running sum."""
    if total is not None and x.dtype == total.dtype and x.device == total.device:
        return total.addmm_(x.T, x)  # same dtype and place (float64 forced, or float32 on the device): no temporary
    return add_sum(total, to_running(x.T @ x))


def add_abs_sum(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``total + sum_t |x_t|`` (per channel)."""
    return add_sum(total, to_running(x.abs().sum(0)))


def add_square_sum(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``total + sum_t x_t^2`` (per channel: the diagonal of ``x^T x``)."""
    return add_sum(total, to_running(x.square().sum(0)))


def finite(t: torch.Tensor, message: str) -> torch.Tensor:
    """``t``, or a ``RanklmError(message)`` if it holds NaN/Inf."""
    if not torch.isfinite(t).all():
        raise RanklmError(message)
    return t


__all__ = ["FLOAT64_PRODUCTS", "add_abs_sum", "add_product", "add_square_sum", "add_sum", "finite", "product_dtype",
           "running_sums", "to_running"]
