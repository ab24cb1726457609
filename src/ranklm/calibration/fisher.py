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

``collect_curvature`` runs the same passes and, from their forwards and backwards, also streams
what the activation and Kronecker bases read, with ``stats``' and ``output_grads``' conventions
and keys: the input Gram ``"gram"`` and ``"abs_mean"`` (forward pre-hooks; targets reading the
same tensor share one Gram), and the output-gradient Gram ``"out_gram"`` (``"out_sq"`` past
``output_grads.DENSE_OUT_MAX``) of per-token gradients of the summed loss (the batch-mean loss's
gradient times the predicted tokens, or times the batch size for a task objective). One set of
passes instead of three: ``ranklm info --diagnose`` compares every base on the same windows.
Memory on top of Fisher's: one ``in x in`` and one ``out x out`` float64 per target (SmolLM2: ~2 GB).
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
    return collect_curvature(model, targets, windows, loss_fn, batch_size, progress, grams=False)[0]


def collect_curvature(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    loss_fn: LossFn | Any | None = None,
    batch_size: int = 1,
    progress: bool = True,
    grams: bool = True,
    dense_out_max: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """``(fisher, stats)``: Fisher as ``collect_fisher``; with ``grams``, ``stats[target]`` holds ``"gram"``,
    ``"abs_mean"``, ``"tokens"``, ``"out_gram"`` or ``"out_sq"``, ``"out_tokens"`` and ``"name"`` from the same
    passes (module docstring), ready for any base's ``decompose``; without, ``stats`` is empty."""
    from .output_grads import DENSE_OUT_MAX
    from .stats import _add_product, product_dtype

    objective = None
    if loss_fn is not None and hasattr(loss_fn, "examples") and hasattr(loss_fn, "loss"):  # a train.Objective
        objective, n_examples = loss_fn, min(len(windows), len(loss_fn))
    loss_fn = loss_fn or lm_loss
    weights = {t.name: model.get_submodule(t.name).weight for t in targets}
    transposed = {t.name: bool(Conv1D) and isinstance(model.get_submodule(t.name), Conv1D) for t in targets}
    # accumulators in CPU memory: on an accelerator the device holds the model and one backward pass only
    fisher = {name: torch.zeros_like(w, dtype=torch.float32, device="cpu") for name, w in weights.items()}
    device = next(model.parameters()).device

    dense_max = DENSE_OUT_MAX if dense_out_max is None else int(dense_out_max)
    in_sums: dict[str, torch.Tensor] = {}
    abs_sums: dict[str, torch.Tensor] = {}
    out_sums: dict[str, torch.Tensor] = {}
    in_tokens: dict[str, int] = {}
    out_tokens: dict[str, int] = {}
    alias: dict[str, str] = {}  # target -> target whose identical input it shares (detected on the first batch)
    fingerprints: dict[tuple, str] = {}
    batch = {"first": True, "scale": 1.0}

    def input_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name in alias:
                return
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if batch["first"]:
                key = (x.data_ptr(), tuple(x.shape))
                if key in fingerprints:
                    alias[name] = fingerprints[key]
                    return
                fingerprints[key] = name
            xp = x.to(product_dtype(x.dtype))
            _add_product(in_sums, name, xp)
            a = xp.abs().sum(0).to(device="cpu", dtype=torch.float64)
            abs_sums[name] = abs_sums[name].add_(a) if name in abs_sums else a
            in_tokens[name] = in_tokens.get(name, 0) + x.shape[0]

        return hook

    def output_hook(name: str):
        dense = model.get_submodule(name).weight.shape[1 if transposed[name] else 0] <= dense_max

        def on_grad(g: torch.Tensor) -> None:
            g = g.detach().reshape(-1, g.shape[-1])
            gp = g.to(product_dtype(g.dtype)) * batch["scale"]  # per-token gradient of the summed loss
            if dense:
                _add_product(out_sums, name, gp)
            else:
                part = gp.square().sum(0).to(device="cpu", dtype=torch.float64)
                out_sums[name] = out_sums[name].add_(part) if name in out_sums else part
            out_tokens[name] = out_tokens.get(name, 0) + g.shape[0]

        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            y = out[0] if isinstance(out, (tuple, list)) else out
            if torch.is_tensor(y) and y.requires_grad:
                y.register_hook(on_grad)

        return hook, dense

    handles, dense_out = [], {}
    if grams:
        for t in targets:
            module = model.get_submodule(t.name)
            handles.append(module.register_forward_pre_hook(input_hook(t.name)))
            hook, dense_out[t.name] = output_hook(t.name)
            handles.append(module.register_forward_hook(hook))
    try:
        with training_only(model, weights.values()):
            total = n_examples if objective is not None else len(windows)
            for i in tqdm(range(0, total, batch_size), desc="fisher", disable=not progress, unit="batch"):
                j = min(i + batch_size, total)
                if objective is not None:
                    batch["scale"] = float(j - i)
                    loss = objective.loss(model, {k: v[i:j] for k, v in objective.examples.items()})
                else:
                    ids = windows[i:j].to(device)
                    batch["scale"] = float(ids.shape[0] * (ids.shape[1] - 1))
                    loss = loss_fn(model, ids)
                if not torch.isfinite(loss):
                    raise RanklmError("non-finite loss while collecting Fisher statistics (NaN/Inf in the model?)")
                loss.backward()
                batch["first"] = False
                for name, w in weights.items():
                    if w.grad is not None:
                        fisher[name].add_(w.grad.float().square().cpu())
                        w.grad = None
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, f in fisher.items():
        f = f.t().contiguous() if transposed[name] else f
        if not torch.isfinite(f).all():
            raise RanklmError(f"non-finite Fisher statistics for {name}")
        out[name] = f
    stats: dict[str, dict[str, Any]] = {}
    for t in targets if grams else ():
        src = alias.get(t.name, t.name)
        if t.name not in out_sums:
            raise RanklmError(f"no gradient reached the output of {t.name}: it does not affect the loss")
        entry = {"name": t.name, "gram": in_sums[src], "tokens": in_tokens[src], "abs_mean": abs_sums[src] / in_tokens[src],
                 "out_gram" if dense_out[t.name] else "out_sq": out_sums[t.name], "out_tokens": out_tokens[t.name]}
        for key in ("gram", "out_gram", "out_sq"):
            if key in entry and not torch.isfinite(entry[key]).all():
                raise RanklmError(f"non-finite calibration statistics ({key}) for {t.name}")
        stats[t.name] = entry
    return out, stats
