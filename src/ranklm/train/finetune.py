"""Limited fine-tuning of installed low-rank factors on calibration text (DESIGN §1 "training").

After a rank map is installed, ``finetune_factors`` trains the ``A``/``B``
weights of every ``LowRankLinear`` (and, with ``train_all=True``, every other
parameter too) for a few Adam steps on the LM loss of random calibration
windows. Batches are drawn from a generator seeded per step, so a run is
deterministic on CPU. Ranks do not change; the model stays a plain
LowRankLinear model that ``ranklm.save`` writes as usual.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import RanklmError
from ..layers import LowRankLinear

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def is_causal_lm(model: nn.Module) -> bool:
    head = getattr(model, "get_output_embeddings", None)
    can_generate = getattr(model, "can_generate", None)
    return callable(head) and head() is not None and callable(can_generate) and bool(can_generate())


def batch_for_step(windows: torch.Tensor, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Calibration windows for one step: a seeded choice that depends only on (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randperm(len(windows), generator=g)[: min(batch_size, len(windows))]
    return windows[idx]


def finetune_factors(
    model: nn.Module,
    windows: torch.Tensor,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 2,
    seed: int = 0,
    train_all: bool = False,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> list[float]:
    """Fine-tune the installed factors for ``steps`` Adam steps; returns the loss per step."""
    if steps <= 0:
        return []
    if loss_fn is None:
        if not is_causal_lm(model):
            raise RanklmError(f"fine-tuning needs a causal LM loss; {type(model).__name__} has no LM head (give loss_fn)")
        loss_fn = lm_loss
    factor_params = [p for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()]
    if not factor_params:
        raise RanklmError("nothing to fine-tune: the model has no LowRankLinear layers")
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(train_all)
    for p in factor_params:
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    device = next(model.parameters()).device
    model.eval()  # no dropout: deterministic
    history: list[float] = []
    try:
        bar = tqdm(range(steps), desc="fine-tune factors", disable=not progress, unit="step")
        for step in bar:
            ids = batch_for_step(windows, batch_size, seed, step).to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, ids)
            if not torch.isfinite(loss):
                raise RanklmError(f"fine-tuning diverged at step {step} (non-finite loss); lower the learning rate")
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
            p.grad = None
        model.train(was_training)
    return history
