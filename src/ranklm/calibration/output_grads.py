"""Output-gradient second moments of the target layers (the ``G`` factor of ``kfac``).

``G = E[g g^T]`` with ``g = dL/dy`` at a target's output, one vector per token, streamed in
float64 (``"out_gram"``, ``out x out``). ``L`` is the summed per-token LM loss (decoders;
``fisher.lm_loss`` times the predicted tokens, so each g is a per-token gradient and
``0.5 * vec(dW)^T (A ⊗ G) vec(dW)`` estimates the change of the *mean* per-token loss when
A and G are means) or a task ``train.Objective``'s loss times its batch size (encoders).

Gradients reach every target output without any weight gradient: all parameters are frozen
and the input embeddings' output is made to require grad, so backward computes activation
gradients only; a forward hook on each target registers a tensor hook on its output that
adds ``g^T g`` (float32 products, float64 running sum, CPU accumulators, as ``stats``).

Outputs wider than ``DENSE_OUT_MAX`` (default 4096; env ``RANKLM_KFAC_DENSE_OUT_MAX``) keep
only the diagonal, ``E[g_i^2]`` (``"out_sq"``): a dense G for an MLP up projection of a 1 B
model (out 8192) is 0.5 GB per target in float64. Memory: one ``out x out`` float64 per
target (SmolLM2-135M: about 1.4 GB) plus the model's backward pass of one batch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import RanklmError
from ..targets import Target
from ..train.freeze import training_only
from .fisher import lm_loss
from .stats import product_dtype

DENSE_OUT_MAX: int = int(os.environ.get("RANKLM_KFAC_DENSE_OUT_MAX", "4096"))


def collect_output_grams(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    loss_fn: Any = None,
    batch_size: int = 4,
    progress: bool = True,
    dense_max: int | None = None,
) -> dict[str, dict[str, Any]]:
    """``{target: {"out_gram" (out x out) or "out_sq" (out), "out_tokens"}}``, sums over tokens, float64."""
    dense_max = DENSE_OUT_MAX if dense_max is None else int(dense_max)
    objective = loss_fn if loss_fn is not None and hasattr(loss_fn, "examples") and hasattr(loss_fn, "loss") else None
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    dense = {t.name: t.out_features <= dense_max for t in targets}

    def make_hook(name: str):
        def on_grad(g: torch.Tensor) -> None:
            g = g.detach().reshape(-1, g.shape[-1])
            gp = g.to(product_dtype(g.dtype))
            part = (gp.T @ gp) if dense[name] else gp.square().sum(0)
            part = part.to(device="cpu", dtype=torch.float64)
            sums[name] = sums[name].add_(part) if name in sums else part
            tokens[name] = tokens.get(name, 0) + g.shape[0]

        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            y = out[0] if isinstance(out, (tuple, list)) else out
            if torch.is_tensor(y) and y.requires_grad:
                y.register_hook(on_grad)

        return hook

    def needs_grad(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.requires_grad_(True) if not out.requires_grad else out

    embeddings = model.get_input_embeddings()
    handles = [model.get_submodule(t.name).register_forward_hook(make_hook(t.name)) for t in targets]
    handles.append(embeddings.register_forward_hook(needs_grad))
    device = next(model.parameters()).device
    total = min(len(windows), len(objective)) if objective is not None else len(windows)
    try:
        with training_only(model, ()):
            for i in tqdm(range(0, total, batch_size), desc="kfac output gradients", disable=not progress, unit="batch"):
                j = min(i + batch_size, total)
                if objective is not None:
                    loss = objective.loss(model, {k: v[i:j] for k, v in objective.examples.items()}) * (j - i)
                else:
                    ids = windows[i:j].to(device)
                    loss = lm_loss(model, ids) * (ids.shape[0] * (ids.shape[1] - 1))
                if not torch.isfinite(loss):
                    raise RanklmError("non-finite loss while collecting kfac output gradients (NaN/Inf in the model?)")
                loss.backward()
    finally:
        for h in handles:
            h.remove()
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        if t.name not in sums:
            raise RanklmError(f"no gradient reached the output of {t.name}: it does not affect the loss")
        if not torch.isfinite(sums[t.name]).all():
            raise RanklmError(f"non-finite kfac output-gradient statistics for {t.name}")
        out[t.name] = {"out_gram" if dense[t.name] else "out_sq": sums[t.name], "out_tokens": tokens[t.name]}
    return out
