"""Classification accuracy and macro-F1 of a sequence classifier (docs/design.md §2 "Accuracy").

Accuracy is the fraction of correct predictions on a held-out split that shares no group
with the training split; macro-F1 is the unweighted mean over classes of each class's F1
(a class never predicted nor present contributes nothing). Batches are trimmed to their
longest sequence and examples are batched by length, so padding costs little.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class AccuracyResult:
    accuracy: float
    macro_f1: float
    examples: int
    per_class_f1: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"accuracy {self.accuracy:.4f}, macro-F1 {self.macro_f1:.4f} on {self.examples} examples"


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> tuple[float, list[float]]:
    f1s: list[float] = []
    per: list[float] = []
    for c in range(num_labels):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            per.append(float("nan"))
            continue
        f1 = 2 * tp / (2 * tp + fp + fn)
        f1s.append(f1)
        per.append(f1)
    return (sum(f1s) / len(f1s) if f1s else 0.0), per


@torch.no_grad()
def predict(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)  # similar lengths together: little padding
    pred = torch.zeros(len(input_ids), dtype=torch.long)
    try:
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            length = max(1, int(lengths[idx].max()))
            logits = model(input_ids=input_ids[idx, :length].to(device), attention_mask=attention_mask[idx, :length].to(device)).logits
            pred[idx] = logits.argmax(-1).cpu()
    finally:
        model.train(was)
    return pred


def classification_metrics(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                           label_names: list[str] | None = None, batch_size: int = 64) -> AccuracyResult:
    pred = predict(model, input_ids, attention_mask, batch_size)
    num = int(getattr(getattr(model, "config", None), "num_labels", 0) or int(labels.max()) + 1)
    f1, per = macro_f1(pred, labels, num)
    names = label_names or [str(i) for i in range(num)]
    return AccuracyResult(accuracy=float((pred == labels).float().mean()) if len(labels) else 0.0, macro_f1=f1,
                          examples=int(len(labels)), per_class_f1={n: v for n, v in zip(names, per)})


__all__ = ["AccuracyResult", "classification_metrics", "macro_f1", "predict"]
