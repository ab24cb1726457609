"""Task-free training loss for encoders: match the dense model's last hidden states.

Masked-LM heads and task labels are often absent (a plain ``BertModel``, a sentence
encoder), but the dense model itself is a teacher: the loss is the mean squared
error between the compressed and the dense model's last hidden states on the
calibration windows, divided by the teacher's mean square so it is unit-free.
Teacher states are computed once, before any module is replaced (memory:
windows x seq_len x hidden floats).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def last_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


@torch.no_grad()
def hidden_state_distillation(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4
) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """A ``loss_fn(model, ids)`` against the dense hidden states of ``windows`` (call before compressing)."""
    device = next(model.parameters()).device
    teacher: dict[bytes, torch.Tensor] = {}
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        states = last_hidden(model, chunk.to(device)).detach()
        for row, state in zip(chunk, states):
            teacher[row.numpy().tobytes()] = state

    def loss(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        target = torch.stack([teacher[row.cpu().numpy().tobytes()] for row in ids])
        student = last_hidden(m, ids)
        return (student - target).square().mean() / target.square().mean().clamp_min(1e-12)

    return loss
