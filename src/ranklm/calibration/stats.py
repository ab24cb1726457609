"""Streaming calibration statistics collected with forward hooks.

For each target the Gram matrix ``G = sum_t x_t x_t^T`` of its inputs (``"gram"``)
and/or the per-channel sum of ``|x|`` (``"abs_mean"``, ASVD) is accumulated in
float64 batch by batch; no activation is kept after its batch.
Each batch's product is computed in float32 (or the activations' dtype if wider) and
only the running sum is float64: the float64 matmul dominated calibration time, while
one batch (a few thousand tokens) loses only ~1e-6 relative precision in float32 and the
sum over batches, where rounding would accumulate, stays float64.
Set ``FLOAT64_PRODUCTS = True`` (or the environment variable ``RANKLM_GRAM_FLOAT64=1``)
to compute the products in float64 as before.
Targets that read the very same input tensor (q/k/v, gate/up) share one Gram:
the first batch detects the sharing and later batches compute it once.
Memory: one ``in x in`` float64 matrix per distinct input (about 1 GB for SmolLM2).
The accumulators always live in CPU memory: on an accelerator each batch's product is
computed where the activations are and added on the CPU, so device memory holds the
model and one batch, never the statistics.

``out_cov`` targets get the covariance of their *outputs*, ``C = sum_t y_t y_t^T``
(``"out_cov"``), instead of the input Gram: a whitening base can factor a target with
``out <= in`` (e.g. a down projection) from ``C = W G W^T`` alone, and the product costs
``out^2`` per token instead of ``in^2``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import RanklmError
from ..targets import Target

FLOAT64_PRODUCTS: bool = os.environ.get("RANKLM_GRAM_FLOAT64", "") not in ("", "0")


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of one batch's ``x^T x``: float32, or wider if the activations are, or float64 if forced."""
    return torch.float64 if FLOAT64_PRODUCTS else torch.promote_types(dtype, torch.float32)


def backbone(model: nn.Module) -> nn.Module:
    """The model without its LM/classifier head, so calibration does not pay for vocab logits."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else model


@torch.no_grad()
def run_batches(model: nn.Module, windows: torch.Tensor, batch_size: int, desc: str, progress: bool = True) -> None:
    body = backbone(model)
    device = next(model.parameters()).device
    extra = {"use_cache": False} if hasattr(getattr(body, "config", None), "use_cache") else {}
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="batch"):
        body(input_ids=windows[i : i + batch_size].to(device), **extra)


def collect_stats(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    needs: frozenset[str] | set[str],
    batch_size: int = 4,
    progress: bool = True,
    fisher_windows: int | None = None,
    loss_fn=None,
) -> dict[str, dict[str, Any]]:
    """All statistics a base needs: ``{target: {"gram"?, "abs_mean"?, "fisher"?, "out_gram"?, "tokens", "name"}}``.

    ``"out_gram"`` (kfac's output-gradient factor, ``output_grads``) runs backward passes on the
    first ``fisher_windows`` windows, like Fisher; wide outputs get ``"out_sq"`` (diagonal) instead.
    """
    unknown = set(needs) - {"gram", "abs_mean", "fisher", "out_gram"}
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}")
    out: dict[str, dict[str, Any]] = {t.name: {"name": t.name} for t in targets}
    if needs & {"gram", "abs_mean"}:
        acts = collect_activation_stats(model, targets, windows, batch_size, progress, gram="gram" in needs, abs_mean="abs_mean" in needs)
        for name, st in acts.items():
            out[name].update(st)
    if "fisher" in needs:
        from .fisher import collect_fisher

        fw = windows if fisher_windows is None else windows[:fisher_windows]
        for name, f in collect_fisher(model, targets, fw, loss_fn=loss_fn, progress=progress).items():
            out[name]["fisher"] = f
    if "out_gram" in needs:
        from .output_grads import collect_output_grams

        fw = windows if fisher_windows is None else windows[:fisher_windows]
        for name, st in collect_output_grams(model, targets, fw, loss_fn=loss_fn, batch_size=batch_size, progress=progress).items():
            out[name].update(st)
    return out


def collect_grams(
    model: nn.Module, targets: list[Target], windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """``{target: {"gram": float64 in x in, "tokens": int, "name": target}}`` over all windows."""
    return collect_activation_stats(model, targets, windows, batch_size, progress, gram=True)


def _add_product(sums: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    """``sums[name] += x^T x``: one batch's product where ``x`` lives, the running sum float64 on the CPU."""
    if name in sums and x.dtype == torch.float64 and x.device.type == "cpu":
        sums[name].addmm_(x.T, x)  # float64 forced: no temporary
    else:
        g = (x.T @ x).to(device="cpu", dtype=torch.float64)
        sums[name] = sums[name].add_(g) if name in sums else g


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    gram: bool = True,
    abs_mean: bool = False,
    out_cov: frozenset[str] | set[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """Input statistics of every target over all windows, streamed (see module docstring).

    Targets named in ``out_cov`` get ``"out_cov"`` (their output covariance) instead of ``"gram"``.
    """
    grams: dict[str, torch.Tensor] = {}
    covs: dict[str, torch.Tensor] = {}
    abs_sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    alias: dict[str, str] = {}  # target -> target whose identical input it shares
    fingerprints: dict[tuple, str] = {}
    first_batch = [True]

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            if name in alias:
                return
            x = args[0] if args else next(iter(kwargs.values()))  # type: ignore[union-attr]
            x = x.detach().reshape(-1, x.shape[-1])
            if first_batch[0]:
                key = (x.data_ptr(), tuple(x.shape), float(x.sum()), float((x * x).sum()))
                if key in fingerprints:
                    alias[name] = fingerprints[key]
                    return
                fingerprints[key] = name
            xp = x.to(product_dtype(x.dtype))
            if gram:
                _add_product(grams, name, xp)
            if abs_mean:
                a = xp.abs().sum(0).to(device="cpu", dtype=torch.float64)
                abs_sums[name] = abs_sums[name] + a if name in abs_sums else a
            tokens[name] = tokens.get(name, 0) + x.shape[0]

        return hook

    def make_out_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            y = out.detach().reshape(-1, out.shape[-1])
            bias = getattr(module, "bias", None)
            yp = y.to(product_dtype(y.dtype))
            if bias is not None:  # the covariance of W x: the bias is kept as is, so it is not part of the error
                yp = yp - bias.detach().to(yp.dtype)
            _add_product(covs, name, yp)
            tokens[name] = tokens.get(name, 0) + y.shape[0]

        return hook

    by_output = {t.name for t in targets if t.name in out_cov}
    if by_output and (abs_mean or not gram):
        raise ValueError("out_cov replaces the input Gram only: not with abs_mean, and only where a Gram is asked for")
    handles = [model.get_submodule(t.name).register_forward_hook(make_out_hook(t.name)) if t.name in by_output
               else model.get_submodule(t.name).register_forward_pre_hook(make_hook(t.name)) for t in targets]
    try:
        for i in tqdm(range(0, len(windows), batch_size), desc="calibration", disable=not progress, unit="batch"):
            run_batches(model, windows[i : i + batch_size], batch_size, "", progress=False)
            first_batch[0] = False
    finally:
        for h in handles:
            h.remove()
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        src = alias.get(t.name, t.name)
        entry: dict[str, Any] = {"tokens": tokens[src], "name": t.name}
        if t.name in by_output:
            entry["out_cov"] = covs[src]
        elif gram:
            entry["gram"] = grams[src]
        if abs_mean:
            entry["abs_mean"] = abs_sums[src] / tokens[src]
        for key in ("gram", "out_cov", "abs_mean"):
            if key in entry and not torch.isfinite(entry[key]).all():
                side = "output" if key == "out_cov" else "input"
                raise RanklmError(f"non-finite calibration statistics (NaN/Inf activations) at the {side} of {t.name}")
        out[t.name] = entry
    return out
