"""Train a chosen set of parameters of a model, and give the model back as it was.

Fisher statistics, factor fine-tuning and ARS mask learning all need the same
bracket: eval mode (no dropout, deterministic), ``requires_grad`` only where
gradients are wanted, and afterwards every flag, gradient and the train/eval mode
restored, whatever happened in between (an error or Ctrl-C included).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import nn


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
