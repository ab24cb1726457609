"""Per-element Fisher information of the target weights (FWSVD, TFWSVD, SVD-drop predictor).

``F_ij = sum over calibration windows of (dL/dW_ij)^2``, with L the LM loss of one
window (decoders) or a caller-given task loss (encoders). The loss may also be a
``train.Objective`` (a task: input ids, attention mask, labels): Fisher is then summed over
its first ``len(windows)`` examples, one example per backward pass (per-example squared
gradients, as FWSVD/TFWSVD compute them on the task-tuned encoder), and the windows only
say how many. The model is frozen
except the target weights; gradients are squared into one float32 accumulator
per target right after each backward and then dropped, so no per-batch gradient
is kept. Memory: the model, one backward pass, and one accumulator the size of
every target weight (about 0.43 GB for SmolLM2-135M).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import has_lm_head
from ..errors import RanklmError
from ..targets import Conv1D, Target
from ..train.freeze import training_only

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a causal LM on ``ids``."""
    if not has_lm_head(model):
        raise RanklmError(
            f"Fisher statistics need a loss; {type(model).__name__} has no LM head (an encoder?): give a task loss"
        )
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def collect_fisher(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    loss_fn: LossFn | Any | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """``{target: F}`` with F float32 ``out x in`` (torch layout, Conv1D transposed)."""
    objective = None
    if loss_fn is not None and hasattr(loss_fn, "examples") and hasattr(loss_fn, "loss"):  # a train.Objective
        objective, n_examples = loss_fn, min(len(windows), len(loss_fn))
    loss_fn = loss_fn or lm_loss
    weights = {t.name: model.get_submodule(t.name).weight for t in targets}
    transposed = {t.name: bool(Conv1D) and isinstance(model.get_submodule(t.name), Conv1D) for t in targets}
    # accumulators in CPU memory: on an accelerator the device holds the model and one backward pass only
    fisher = {name: torch.zeros_like(w, dtype=torch.float32, device="cpu") for name, w in weights.items()}
    device = next(model.parameters()).device
    with training_only(model, weights.values()):
        total = n_examples if objective is not None else len(windows)
        for i in tqdm(range(0, total, batch_size), desc="fisher", disable=not progress, unit="batch"):
            if objective is not None:
                j = min(i + batch_size, total)
                loss = objective.loss(model, {k: v[i:j] for k, v in objective.examples.items()})
            else:
                loss = loss_fn(model, windows[i : i + batch_size].to(device))
            if not torch.isfinite(loss):
                raise RanklmError("non-finite loss while collecting Fisher statistics (NaN/Inf in the model?)")
            loss.backward()
            for name, w in weights.items():
                if w.grad is not None:
                    fisher[name].add_(w.grad.float().square().cpu())
                    w.grad = None
    out = {}
    for name, f in fisher.items():
        f = f.t().contiguous() if transposed[name] else f
        if not torch.isfinite(f).all():
            raise RanklmError(f"non-finite Fisher statistics for {name}")
        out[name] = f
    return out
