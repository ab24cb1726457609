"""Quantization loss on the kfac scale (docs/design.md §11): what the joint allocator needs per target.

Under the Kronecker-factored Fisher, replacing W by W' costs about ``½ ||L_G^T (W - W') L_A||_F²``, the scale
on which ``½σ²`` prices truncation. So for each allowed width b:

- dense at b bits: ``½ ||L_G^T (W - Q_b(W)) L_A||²``;
- factored at rank k with b-bit factors: ``½ ||M - â_k ŷ_k||²`` with ``M = L_G^T W L_A``, ``â = L_G^T Q_b(A)``,
  ``ŷ = Q_b(B) L_A`` (A, B the base's factors at the largest rank K, their first k columns / rows). It is
  truncation and quantization error together, for every k at once:
  ``||M||² - 2 Σ_{i<k} â_i^T M ŷ_i + Σ_{i,j<k} (â^T â)_ij (ŷ ŷ^T)_ij``.

B's groups run along the input, so Q_b(B)'s first k rows are exactly the quantized B_k. A (out x k) is
grouped along its output at ranks that are not a multiple of the group size (``group_axis``), along its input
at those that are: one curve for each grouping of A_K, each exact at the ranks where the installed layer
groups that way, so every rank's price is exact (an output size the group size does not divide: A is grouped
along its input, padded, and the price is exact at multiples of the group size only).
Cost: a few more ``m x n``-sized metric products and K x K Grams per width.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..quantize.affine import dequantize_matrix


def factored_curve(m: torch.Tensor, a_hat: torch.Tensor, y_hat: torch.Tensor) -> np.ndarray:
    """``||M - â_k ŷ_k||²`` for k = 0..K (float64 numpy, K+1 values)."""
    m2 = float(m.square().sum())
    cross = ((a_hat.mT @ m) * y_hat).sum(1)  # â_i^T M ŷ_i
    h = (a_hat.mT @ a_hat) * (y_hat @ y_hat.mT)
    c = h.cumsum(0).cumsum(1).diagonal()  # Σ_{i,j<k} H_ij at k = 1..K
    curve = m2 - 2.0 * cross.cumsum(0) + c
    return np.concatenate([[m2], curve.double().cpu().numpy()]).clip(min=0.0)


def quantization_losses(
    w: torch.Tensor, m: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out_metric: Callable[[torch.Tensor], torch.Tensor],
    in_metric: Callable[[torch.Tensor], torch.Tensor], widths: tuple[int, ...], group_size: int, scale: float,
) -> dict[str, Any]:
    """``{"factored": {bits: losses for k = 0..K}, "dense": {bits: loss}}`` on the ``scale``·error² scale.

    ``out_metric(X) = L_G^T X``, ``in_metric(Y) = Y L_A``; ``m = out_metric(in_metric(W))``; ``a`` (out x K),
    ``b`` (K x in) the factors that will be installed (float64)."""
    out: dict[str, Any] = {"factored": {}, "dense": {}, "group_size": group_size}
    ranks = np.arange(a.shape[1] + 1)
    for bits in widths:
        y_hat = in_metric(dequantize_matrix(b, bits, group_size).to(m.dtype))

        def curve(axis: str) -> np.ndarray:
            return factored_curve(m, out_metric(dequantize_matrix(a, bits, group_size, axis).to(m.dtype)), y_hat)

        losses = curve("in")  # the installed A's grouping at ranks that are multiples of the group size
        if a.shape[0] % group_size == 0:  # at every other rank A is grouped along its output (group_axis)
            along_out = curve("out")
            other = ranks % group_size != 0
            losses[other] = along_out[other]
        out["factored"][bits] = scale * losses
        err = w - dequantize_matrix(w, bits, group_size).to(w.dtype)
        out["dense"][bits] = scale * float(out_metric(in_metric(err)).square().sum())
    return out
