"""The classification side of task fine-tuning: the task objective, the head, and task evaluation.

The driver that runs a fine-tuning (head warm-up, the pipeline with this objective, evaluation) is
``ranklm.apps.finetune``; these are the pieces it and the CLI's ``evaluate --task`` share.
"""

from __future__ import annotations


import torch
from torch import nn

from ..eval.accuracy import AccuracyResult, classification_metrics
from ..tasks import TaskData, encode, label_ids
from .loop import Hooks
from .objective import Batch, Objective

DEFAULT_STEPS = 200
DEFAULT_LR = 1e-4
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_LENGTH = 64


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    mask = batch["attention_mask"]
    length = max(1, int(mask.sum(1).max()))
    return model(input_ids=batch["input_ids"][:, :length], attention_mask=mask[:, :length], labels=batch["labels"]).loss


def task_examples(task: TaskData, tokenizer, split: str, max_length: int, label2id: dict[str, int] | None = None
                  ) -> dict[str, torch.Tensor]:
    s = task.splits[split]
    ex = encode(tokenizer, s.texts, max_length)
    ex["labels"] = label_ids(task, s.labels, label2id)
    return ex


def task_objective(task: TaskData, tokenizer, max_length: int = DEFAULT_MAX_LENGTH, split: str = "train",
                   label2id: dict[str, int] | None = None) -> Objective:
    """Cross-entropy of a sequence classifier on a task split."""
    ex = task_examples(task, tokenizer, split, max_length, label2id)
    return Objective("task", ex, classification_loss,
                     description=f"classification loss on {task.name} {split} ({len(ex['labels'])} examples, max {max_length} tokens)")


def model_label2id(model: nn.Module) -> dict[str, int] | None:
    cfg = getattr(model, "config", None)
    l2i = getattr(cfg, "label2id", None)
    return {str(k): int(v) for k, v in l2i.items()} if l2i else None


def evaluate_task(model: nn.Module, tokenizer, task: TaskData, split: str = "test", max_length: int = DEFAULT_MAX_LENGTH,
                  batch_size: int = 64) -> AccuracyResult:
    """Accuracy and macro-F1 on a split, labels mapped with the model's own ``label2id``."""
    l2i = model_label2id(model)
    ex = task_examples(task, tokenizer, split, max_length, l2i)
    names = [n for n, _ in sorted((l2i or task.label2id).items(), key=lambda kv: kv[1])]
    return classification_metrics(model, ex["input_ids"], ex["attention_mask"], ex["labels"], names, batch_size)


def head_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The classification head: every parameter outside the base encoder, plus its pooler (new or
    never trained for the task, e.g. sentence-transformers checkpoints)."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    body = {id(p) for p in inner.parameters()} if isinstance(inner, nn.Module) else set()
    return [(n, p) for n, p in model.named_parameters() if id(p) not in body or ".pooler." in f".{n}"]


class HeadHooks(Hooks):
    """Train the classification head only, the encoder frozen (the linear-probe stage of LP-FT)."""

    name = "head"

    def parameters(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return head_parameters(model)


class DenseHooks(Hooks):
    """Fine-tune every parameter of the model (the dense stage)."""

    name = "dense"

    def parameters(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return list(model.named_parameters())


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_LR", "DEFAULT_MAX_LENGTH", "DEFAULT_STEPS", "DenseHooks", "HeadHooks",
           "classification_loss", "evaluate_task", "head_parameters", "model_label2id", "task_examples", "task_objective"]
