"""The streaming accumulators every calibration statistic shares: product dtype, float64 running sums on the CPU.

Each batch's product is computed in float32 (or the activations' dtype if wider) and only the
running sum is float64: the float64 matmul dominated calibration time, while one batch (a few
thousand tokens) loses only ~1e-6 relative precision in float32, and the sum over batches, where
rounding would accumulate, stays float64. Set ``FLOAT64_PRODUCTS = True`` here (or the
environment variable ``RANKLM_GRAM_FLOAT64=1``) to compute the products in float64.

Running sums always live in CPU memory: on an accelerator each batch's product is computed where
the activations are and added on the CPU, so device memory holds the model and one batch, never
the statistics.
"""

from __future__ import annotations

import os

import torch

from ..errors import RanklmError

FLOAT64_PRODUCTS: bool = os.environ.get("RANKLM_GRAM_FLOAT64", "") not in ("", "0")


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of one batch's ``x^T x``: float32, or wider if the activations are, or float64 if forced."""
    return torch.float64 if FLOAT64_PRODUCTS else torch.promote_types(dtype, torch.float32)


def add_sum(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """``total + part`` in place (``part`` itself on the first batch); ``part`` already float64 on the CPU."""
    return part if total is None else total.add_(part)


def add_product(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``total + x^T x``: one batch's product where ``x`` lives, the running sum float64 on the CPU."""
    if total is not None and x.dtype == torch.float64 and x.device.type == "cpu":
        return total.addmm_(x.T, x)  # float64 forced: no temporary
    return add_sum(total, (x.T @ x).to(device="cpu", dtype=torch.float64))


def add_abs_sum(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``total + sum_t |x_t|`` (per channel), float64 on the CPU."""
    return add_sum(total, x.abs().sum(0).to(device="cpu", dtype=torch.float64))


def add_square_sum(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``total + sum_t x_t^2`` (per channel: the diagonal of ``x^T x``), float64 on the CPU."""
    return add_sum(total, x.square().sum(0).to(device="cpu", dtype=torch.float64))


def finite(t: torch.Tensor, message: str) -> torch.Tensor:
    """``t``, or a ``RanklmError(message)`` if it holds NaN/Inf."""
    if not torch.isfinite(t).all():
        raise RanklmError(message)
    return t


__all__ = ["FLOAT64_PRODUCTS", "add_abs_sum", "add_product", "add_square_sum", "add_sum", "finite", "product_dtype"]
