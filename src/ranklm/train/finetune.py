"""Fine-tuning of installed low-rank factors: the training loop with no extra hook (docs/design.md §1 "training").

After a rank map is installed, the ``finetune`` trainer trains the ``A``/``B``
weights of every ``LowRankLinear`` (and, with ``train_all=true``, every other
parameter too) for a few Adam steps on the run's objective (LM loss on the
calibration windows for causal LMs). Ranks do not change; the factors are trained
in place, so what the trainer returns is the model itself, which the pipeline
saves as usual. Resume goes through the loop's state file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..modules import lm_loss  # noqa: F401  (re-exported: the one LM loss lives in core)
from ..errors import RanklmError
from ..layers import LowRankLinear
from ..options import Configurable, MethodOptions, opt
from .loop import LR_SCHEDULES, Hooks, LoopConfig, run_loop
from .objective import Objective, as_objective, batch_for_step, is_causal_lm
from ..registry import register_trainer

__all__ = ["FactorHooks", "FinetuneOptions", "FinetuneTrainer", "TrainResult", "batch_for_step", "finetune_factors", "is_causal_lm", "lm_loss"]


@dataclass
class TrainResult:
    """What a trainer hands back to the pipeline.

    ``factors`` maps target names to trained ``(A, B)``: the pipeline installs them
    (never the base's originals over them). ``None`` when the trainer trained the
    installed layers in place. ``record`` goes into ranklm.json's ``training`` list.
    """

    record: dict[str, Any]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)


class FactorHooks(Hooks):
    """Train every LowRankLinear's factors (plain fine-tuning)."""

    name = "finetune"

    def parameters(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        named = [(f"{n}.{pn}", p) for n, m in model.named_modules() if isinstance(m, LowRankLinear)
                 for pn, p in m.named_parameters()]
        if not named:
            raise RanklmError("nothing to fine-tune: the model has no LowRankLinear layers")
        return named


@dataclass(frozen=True)
class FinetuneOptions(MethodOptions):
    steps: int = opt(100, "training steps")
    lr: float = opt(1e-4, "Adam learning rate")
    batch_size: int | None = opt(None, "windows per step [the run's --batch-size]")
    grad_accum: int = opt(1, "micro-batches per step")
    train_all: bool = opt(False, "also train every other parameter (embeddings, norms, dense targets)")
    seq_len: int | None = opt(None, "train on the first SEQ_LEN tokens of each calibration window [all]")
    warmup: int = opt(0, "linear learning-rate warm-up steps (fresh Adam moments on truncated factors)")
    lr_schedule: str = opt("constant", "after the warm-up: constant, or linear / cosine decay to 0", choices=LR_SCHEDULES)
    max_grad_norm: float = opt(0.0, "clip the gradient norm to this (0: off)", bounds=(0.0, 1e9))
    objective: Any = opt(None, "an Objective or loss_fn(model, ids) [LM loss]", python_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 0 or self.warmup < 0:
            raise RanklmError("finetune: steps and warmup must be >= 0")


@register_trainer("finetune")
class FinetuneTrainer(Configurable):
    """``--trainer finetune``: a few Adam steps on the installed factors."""

    name = "finetune"
    Options = FinetuneOptions

    def train(self, model: nn.Module, context: Any) -> TrainResult:
        windows = context.windows
        if windows is None and context.objective is None and self.objective is None:
            raise RanklmError("finetune needs training data (calibration windows or a task)")
        if windows is not None and self.seq_len:
            windows = windows[:, : self.seq_len]
        objective = self.objective or context.objective
        if objective is None and not is_causal_lm(model):
            raise RanklmError(f"fine-tuning needs a causal LM loss or a task; {type(model).__name__} has no LM head")
        objective = as_objective(objective, model, windows, context.batch_size)
        cfg = LoopConfig(
            steps=self.steps, lr=self.lr, batch_size=self.batch_size or context.batch_size, seed=context.seed,
            grad_accum=self.grad_accum, save_every=context.save_every, state_file=context.state_file(self.name),
            resume=context.resume, progress=context.progress, desc="fine-tune", others_trainable=self.train_all,
            warmup_steps=min(self.warmup, self.steps), max_grad_norm=self.max_grad_norm or None,
            lr_schedule=self.lr_schedule,
        )
        res = run_loop(model, objective, FactorHooks(), cfg)
        record = {
            "trainer": self.name, "stage": "train", "steps": self.steps, "options": self.options(),
            "objective": objective.description or objective.name, "final_loss": res.final_loss,
            "first_loss": (res.history.get("loss") or [None])[0], "seconds": round(res.seconds, 2),
            "resumed_from_step": res.start_step, "world_size": res.world_size, "history": res.history,
        }
        return TrainResult(record=record)


def finetune_factors(
    model: nn.Module,
    windows: torch.Tensor,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 2,
    seed: int = 0,
    train_all: bool = False,
    loss_fn: Objective | Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    save_state: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    save_every: int = 50,
) -> list[float]:
    """Fine-tune the installed factors for ``steps`` Adam steps; returns the loss per step (resumed ones too).

    ``save_state`` is the loop's state file; ``resume`` (a state file) continues from it."""
    if steps <= 0:
        return []
    if loss_fn is None and not is_causal_lm(model):
        raise RanklmError(f"fine-tuning needs a causal LM loss; {type(model).__name__} has no LM head (give loss_fn)")
    objective = as_objective(loss_fn, model, windows, batch_size)
    cfg = LoopConfig(steps=steps, lr=lr, batch_size=batch_size, seed=seed, save_every=save_every,
                     state_file=resume if resume is not None else save_state, resume=resume is not None,
                     progress=progress, desc="fine-tune factors", others_trainable=train_all)
    if resume is not None and not os.path.isfile(resume):
        raise RanklmError(f"fine-tune resume: {resume} does not exist")
    if resume is not None and save_state is not None and os.fspath(save_state) != os.fspath(resume):
        # continue from one file, keep saving into another
        import shutil

        shutil.copyfile(resume, save_state)
        cfg.state_file = save_state
    return run_loop(model, objective, FactorHooks(), cfg).history.get("loss", [])
