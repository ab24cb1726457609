"""Generic helpers on a model, below every method: the training bracket and the one LM loss.

``training_only`` is the bracket that Fisher statistics, kfac's output gradients, factor
fine-tuning and mask learning all need: eval mode (no dropout, deterministic), ``requires_grad``
only where gradients are wanted, and afterwards every flag, gradient and the train/eval mode
restored, whatever happened in between (an error or Ctrl-C included).

``lm_loss`` is the mean next-token NLL of a causal LM: calibration's gradient statistics and the
training objectives (``train.objective.lm_objective``) both call this one function.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .architectures import is_causal_lm, not_causal_reason
from .errors import RanklmError


@contextmanager
def training_only(
    model: nn.Module, params: Iterable[nn.Parameter] = (), others: bool = False, clear_grads: bool = True
) -> Iterator[None]:
    """Within the block: eval mode; ``params`` require grad, every other parameter ``others``.

    On exit each parameter's ``requires_grad`` and the model's mode are restored and, with
    ``clear_grads``, every gradient is dropped (they would otherwise pin memory).
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(others)
    for p in params:
        p.requires_grad_(True)
        if clear_grads:
            p.grad = None
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            if clear_grads:
                p.grad = None
        model.train(was_training)


def lm_loss(
    model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token NLL of a causal LM on ``ids`` (``labels`` default to ``ids``; masked-out positions are not predicted)."""
    if not is_causal_lm(model):
        raise RanklmError(f"an LM loss needs a causal LM head and {not_causal_reason(model)}: give a task loss")
    labels = ids if labels is None else labels
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, -100)
        return model(input_ids=ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
    return model(input_ids=ids, labels=labels, use_cache=False).loss


__all__ = ["lm_loss", "training_only"]
