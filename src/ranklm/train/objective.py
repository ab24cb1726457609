"""Training objectives: a loss over a batch, the examples it draws from, an optional metric.

A batch is a dict of tensors whose first dimension is the example: ``input_ids``
always, ``attention_mask`` and ``labels`` when the data has them (padded task
data, classification labels). Every trainer (ARS, fine-tuning, and the ones built
on the same loop) takes an ``Objective`` instead of token ids, so the same trainer
runs on language modelling, distillation or a classification task.

Batches are a seeded choice that depends only on ``(seed, step)`` (not on what ran
before), which is what makes a resumed run equal an uninterrupted one. In a
data-parallel run every process draws the same global batch and keeps its own
slice of it (``rank::world``), so one process and many see the same examples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..modules import lm_loss

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s batch: a function of (seed, step) only."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the examples of one step (a seeded choice without replacement)."""
    return torch.randperm(n, generator=step_generator(seed, step))[: min(batch_size, n)]


def batch_for_step(windows: torch.Tensor, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Calibration windows for one step (token ids only)."""
    return windows[batch_indices(len(windows), batch_size, seed, step)]


@dataclass
class Objective:
    """What a training run minimises, and on which examples."""

    name: str
    examples: Batch  # aligned tensors, first dimension = examples
    loss_fn: LossFn
    metric: Callable[[nn.Module], dict[str, float]] | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)  # e.g. the teacher of a distillation objective

    def __post_init__(self) -> None:
        if "input_ids" not in self.examples:
            raise ValueError("an objective's examples need input_ids")
        n = {len(v) for v in self.examples.values()}
        if len(n) != 1:
            raise ValueError(f"an objective's example tensors differ in length: {sorted(n)}")

    def __len__(self) -> int:
        return len(self.examples["input_ids"])

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Batch:
        """This process's share of step ``step``'s global batch."""
        idx = batch_indices(len(self), batch_size, seed, step)
        idx = idx[rank::world]
        return {k: v[idx] for k, v in self.examples.items()}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device = next(model.parameters()).device
        return self.loss_fn(model, {k: v.to(device) for k, v in batch.items()})

    def fingerprint(self) -> str:
        """sha256 over the examples' bytes: a resumed run must train on the same data."""
        h = hashlib.sha256(self.name.encode())
        for k in sorted(self.examples):
            v = self.examples[k].detach().cpu().contiguous()
            h.update(k.encode())
            h.update(str(tuple(v.shape)).encode())
            h.update(v.numpy().tobytes())
        return h.hexdigest()


def is_causal_lm(model: nn.Module) -> bool:
    head = getattr(model, "get_output_embeddings", None)
    can_generate = getattr(model, "can_generate", None)
    return callable(head) and head() is not None and callable(can_generate) and bool(can_generate())


def _lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The one LM loss (``ranklm.modules.lm_loss``) on a batch dict."""
    return lm_loss(model, batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))


def lm_objective(windows: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Objective:
    """Next-token loss of a causal LM on token windows (padding, if masked, is not predicted)."""
    ex: Batch = {"input_ids": windows}
    if attention_mask is not None:
        ex["attention_mask"] = attention_mask
    return Objective("lm", ex, _lm_loss, description=f"LM loss on {len(windows)} x {windows.shape[1]} tokens")


def ids_objective(windows: torch.Tensor, loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], name: str = "custom") -> Objective:
    """Wrap a ``loss_fn(model, input_ids)`` (the older callable form) as an objective."""
    return Objective(name, {"input_ids": windows}, lambda m, b: loss_fn(m, b["input_ids"]),
                     description=f"{name} loss on {len(windows)} x {windows.shape[1]} tokens")


def hidden_distillation_objective(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> Objective:
    """Match the dense model's last hidden states (encoders without a task); build it before compressing."""
    from .distill import hidden_state_distillation

    fn = hidden_state_distillation(model, windows, batch_size)
    obj = ids_objective(windows, fn, name="hidden-distill")
    obj.description = f"distillation of the dense model's last hidden states on {len(windows)} x {windows.shape[1]} tokens"
    return obj


def default_objective(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> Objective:
    """LM loss for causal LMs; for encoders without a task, distillation of the dense hidden states."""
    if is_causal_lm(model):
        return lm_objective(windows)
    return hidden_distillation_objective(model, windows, batch_size)


def as_objective(loss: Objective | Callable | None, model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> Objective:
    """An objective from what a caller gave: an Objective, a ``loss_fn(model, ids)``, or None (the default)."""
    if isinstance(loss, Objective):
        return loss
    if callable(loss):
        return ids_objective(windows, loss)
    return default_objective(model, windows, batch_size)


__all__ = [
    "Batch",
    "Objective",
    "as_objective",
    "batch_for_step",
    "batch_indices",
    "default_objective",
    "hidden_distillation_objective",
    "ids_objective",
    "is_causal_lm",
    "lm_objective",
    "step_generator",
]
