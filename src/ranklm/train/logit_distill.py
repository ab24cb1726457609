"""Distillation of next-token distributions from the dense model (docs/design.md §13, ``heal``).

Two teachers, one loss (KL(dense || compressed) per predicted position, averaged over positions):

* **cached top-k** (``top_k > 0``): the dense model runs once over the windows before any target
  is replaced; for every position it keeps the log-probabilities of its ``k`` most likely tokens
  (float32) and their ids. The loss is then the exact KL between the two distributions coarsened
  to ``k + 1`` outcomes (those tokens and "any other"): zero when they agree, a lower bound of the
  full KL otherwise. Memory: ``windows x seq_len x k x 12`` bytes (46 x 512 x 64: 18 MB), no
  second model, no teacher forward per step.
* **live teacher** (``top_k = 0``): a frozen copy of the dense model runs on every batch and the
  loss is the full-vocabulary KL. Memory: a second model; time: one more forward per step.

The cache is stored as aligned example tensors of an ``Objective`` (``t_logp``, ``t_idx``), so the
loop's seeded batches, data-parallel slicing and resume fingerprint carry it with the windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .objective import Batch, Objective


def _logits(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits.float()


@torch.no_grad()
def teacher_top_k(model: nn.Module, windows: torch.Tensor, k: int, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """The dense model's top-``k`` next-token log-probabilities and token ids per position, on CPU."""
    device = next(model.parameters()).device
    logp, idx = [], []
    was = model.training
    model.eval()
    try:
        for i in range(0, len(windows), batch_size):
            lp = F.log_softmax(_logits(model, windows[i : i + batch_size].to(device)), -1)
            v, j = lp.topk(min(k, lp.shape[-1]), dim=-1)
            logp.append(v.cpu())
            idx.append(j.to(torch.int32).cpu())
    finally:
        model.train(was)
    return {"t_logp": torch.cat(logp), "t_idx": torch.cat(idx)}


def top_k_kl(student_logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q) on the teacher's top-k tokens plus one "other" outcome."""
    lq_all = F.log_softmax(student_logits.float(), -1)
    lq = lq_all.gather(-1, t_idx.long())
    p = t_logp.exp()
    kl_top = (p * (t_logp - lq)).sum(-1)
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - lq.exp().sum(-1)).clamp_min(1e-12)
    kl_rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (kl_top + kl_rest).mean()


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of the full-vocabulary KL(teacher || student)."""
    ls, lt = F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1)
    return F.kl_div(ls, lt, log_target=True, reduction="batchmean") / student_logits.shape[1]  # batch x seq x vocab


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of ``ids`` under ``logits`` (the LM loss, from logits already computed)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class Teacher:
    """The dense model's next-token distributions on given windows: cached top-k or a live frozen copy."""

    def __init__(self, live: nn.Module | None = None) -> None:
        self.live = live  # None: the batch carries the cache

    def kl(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.live is None:
            return top_k_kl(logits, batch["t_logp"].to(logits.device), batch["t_idx"].to(logits.device))
        with torch.no_grad():
            t = _logits(self.live, batch["input_ids"], batch.get("attention_mask"))
        return full_kl(logits, t)

    def examples(self, windows: torch.Tensor, cache: dict[str, torch.Tensor] | None) -> Batch:
        return {"input_ids": windows, **(cache or {})}


def kl_objective(windows: torch.Tensor, teacher: Teacher, cache: dict[str, torch.Tensor] | None, k: int,
                 lm_weight: float = 0.0) -> Objective:
    """KL(dense || compressed) of next-token distributions on ``windows`` (the ``heal`` objective), plus
    ``lm_weight`` times the LM loss on the same text (Hinton et al.'s hard-label term; 0: KL only)."""

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = _logits(model, batch["input_ids"], batch.get("attention_mask"))
        kl = teacher.kl(logits, batch)
        return kl + lm_weight * next_token_nll(logits, batch["input_ids"]) if lm_weight else kl

    what = f"top-{k} cached" if teacher.live is None else "full-vocabulary, live teacher"
    plus = f" + {lm_weight:g} x next-token NLL" if lm_weight else ""
    return Objective("kl-distill", teacher.examples(windows, cache), loss,
                     description=f"KL(dense || compressed) of next-token distributions ({what}){plus} on "
                                 f"{len(windows)} x {windows.shape[1]} tokens",
                     extra={"teacher": teacher})


@torch.no_grad()
def measure(model: nn.Module, teacher: Teacher, examples: Batch, batch_size: int = 4,
            rank: int = 0, world: int = 1) -> dict[str, float]:
    """Validation numbers: mean next-token NLL and mean KL over ``examples`` (this process's share,
    summed over processes when data-parallel), each window weighted equally."""
    device = next(model.parameters()).device
    n = len(examples["input_ids"])
    mine = list(range(rank, n, world))
    sums = torch.zeros(3, dtype=torch.float64)
    was = model.training
    model.eval()
    try:
        for i in range(0, len(mine), batch_size):
            sel = torch.tensor(mine[i : i + batch_size])
            b = {k: v[sel].to(device) for k, v in examples.items()}
            logits = _logits(model, b["input_ids"], b.get("attention_mask"))
            for j in range(len(sel)):  # per window, so the mean does not depend on the batching
                one = {k: v[j : j + 1] for k, v in b.items()}
                sums[0] += float(next_token_nll(logits[j : j + 1], one["input_ids"]))
                sums[1] += float(teacher.kl(logits[j : j + 1], one))
            sums[2] += len(sel)
    finally:
        model.train(was)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    count = max(1.0, float(sums[2]))
    return {"nll": float(sums[0]) / count, "kl": float(sums[1]) / count}


__all__ = ["Teacher", "full_kl", "kl_objective", "measure", "next_token_nll", "teacher_top_k", "top_k_kl"]
