"""``--trainer heal``: end-to-end distillation of the compressed model from the dense one (docs/design.md §13).

Every allocator and base optimises each matrix alone; healing trains the installed factors (and,
with ``norms=true``, the norms' weights and biases) of the whole compressed model so that its
next-token distributions match the dense model's: loss = KL(dense || compressed) per position
(``train.logit_distill``; by default against the dense model's top-64 log-probabilities cached
once before the targets are replaced, ``top_k=0`` for a live full-vocabulary teacher). With
``lm_weight=w`` the loss adds w x the LM loss of the training text: that adapts the model to the
text's domain as well (benchmarks §7 measures it against an equally trained near-dense model), so
the default stays distillation only.

It runs on the one resumable loop (``train.loop``: seeded batches, accumulation, clipping, state
every ``--save-every`` steps, ``--resume``, data-parallel under torchrun) with a learning-rate
warm-up and a decay from transformers' schedulers (``lr_schedule`` cosine / linear / constant,
``warmup`` steps). Every ``eval_every`` steps it measures the validation split (``ranklm
compress`` passes the corpus's validation part: for the default corpus, speeches that neither
calibration nor evaluation reads): the mean next-token NLL and KL. It keeps the trained tensors
of the best validation ``monitor`` so far (the step-0 model included, so healing never ends worse
on validation than it started), stops after ``patience`` evaluations without an improvement of at
least ``min_delta``, and puts the best tensors back at the end. Without validation windows
(Python callers who pass none) it trains all its steps and records that nothing was validated.

It trains on the calibration windows, or with ``windows=N`` on N windows of the calibration text: the
calibration windows, then more of the same seeded choice (``pipeline.trainer_windows``; the statistics
still read the calibration windows only). The record says how many (``train_windows``).

What it learned is in its record (ranklm.json ``training``): steps run, first/final training
loss, the validation curve, the best step and value, whether it stopped early.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..budget import DENSE
from ..errors import RanklmError
from ..layers import LowRankLinear
from ..options import Configurable, MethodOptions, opt
from ..registry import register_trainer
from .finetune import TrainResult
from .logit_distill import Teacher, kl_objective, measure, teacher_top_k
from .loop import LR_SCHEDULES, Hooks, LoopConfig, process_state, run_loop
from .objective import Batch, Objective, is_causal_lm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealOptions(MethodOptions):
    # 96 steps x 2 windows on 192 windows (one pass): chosen on the validation split at keep 0.6 against 64 steps on
    # the 32 calibration windows and 64 steps on 128 (best validation NLL 3.695 / 3.774 / 3.742; benchmarks §7)
    steps: int = opt(96, "training steps (at most: early stopping may end sooner)")
    lr: float = opt(1e-4, "peak Adam learning rate")
    warmup: int = opt(6, "linear learning-rate warm-up steps (at most steps)")
    lr_schedule: str = opt("cosine", "decay after the warm-up (transformers' schedulers)", choices=LR_SCHEDULES)
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0: off)", bounds=(0.0, 1e9))
    batch_size: int = opt(2, "windows per step")
    grad_accum: int = opt(1, "micro-batches per step")
    windows: int = opt(192, "train on this many windows of the calibration text: the calibration windows, then more of "
                          "the same seeded choice (0: the calibration windows only)")
    seq_len: int | None = opt(None, "train on the first SEQ_LEN tokens of each calibration window [all]")
    top_k: int = opt(64, "cache the dense model's top-k next-token log-probabilities once (0: live full-vocabulary teacher)")
    lm_weight: float = opt(0.0, "add this times the LM loss (next-token NLL of the training text) to the KL: "
                                "hard labels beside the teacher's distributions (0: distillation only)", bounds=(0.0, 1e6))
    norms: bool = opt(False, "also train the norms' weights and biases")
    dense_targets: bool = opt(False, "also train the target matrices the budget kept dense (weights and biases): "
                                     "at high keep many are, and the factors alone are a small part of the model")
    balance: bool = opt(True, "rescale each rank component so A's column and B's row have equal norms (same product)")
    eval_every: int = opt(8, "steps between validation measurements")
    patience: int = opt(2, "stop after this many validation measurements without improvement")
    min_delta: float = opt(0.0, "an improvement smaller than this does not count", bounds=(0.0, 1e9))
    monitor: str = opt("nll", "validation number early stopping watches", choices=("nll", "kl"))
    val_windows: int = opt(8, "at most this many validation windows")
    restore_best: bool = opt(True, "end with the tensors of the best validation measurement")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "warmup", "top_k", "windows"):
            if getattr(self, name) < 0:
                raise RanklmError(f"heal: {name} must be >= 0")
        for name in ("batch_size", "grad_accum", "eval_every", "patience", "val_windows"):
            if getattr(self, name) < 1:
                raise RanklmError(f"heal: {name} must be a positive integer")
        if not self.lr > 0:
            raise RanklmError("heal: lr must be positive")


def resident_mib() -> float | None:
    """This process's resident memory now (Linux /proc; None elsewhere): the teacher's cost is its growth."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _tensor_mib(tensors: Any) -> float:
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 2)


def _digest(ids: torch.Tensor) -> str:
    """A fingerprint of token windows: a shared teacher cache is reused only for the very same windows."""
    return hashlib.sha1(ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest() + str(tuple(ids.shape))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


@torch.no_grad()
def balance_factors(model: nn.Module) -> int:
    """Give each rank component of every LowRankLinear equal norms in A (column) and B (row).

    The product A B is unchanged, but bases leave the two sides on very different scales (kfac:
    ``A = L_G^-T U S``, ``B = V^T L_A^-1``), and Adam's step is about the same size on every
    element: balanced, one learning rate means the same relative step on both sides. Returns how
    many layers were rescaled."""
    n = 0
    for m in model.modules():
        if isinstance(m, LowRankLinear) and m.rank > 0:
            na, nb = m.A.weight.norm(dim=0), m.B.weight.norm(dim=1)
            ok = (na > 0) & (nb > 0)
            d = torch.where(ok, (nb / na.clamp_min(1e-30)).sqrt(), torch.ones_like(na))
            m.A.weight.mul_(d.unsqueeze(0))
            m.B.weight.div_(d.unsqueeze(1))
            n += 1
    return n


def healed_parameters(model: nn.Module, norms: bool, dense: Sequence[str] = ()) -> list[tuple[str, torch.Tensor]]:
    """Every LowRankLinear's factors and bias, with ``norms`` every norm's weight and bias, and the weight and
    bias of the modules named in ``dense`` (targets the budget kept dense)."""
    named = [(f"{n}.{pn}", p) for n, m in model.named_modules() if isinstance(m, LowRankLinear)
             for pn, p in m.named_parameters()]
    if not named:
        raise RanklmError("heal: the model has no LowRankLinear layers to train")
    if norms:
        named += [(f"{n}.{pn}", p) for n, m in model.named_modules() if _is_norm(m) for pn, p in m.named_parameters()]
    named += [(f"{n}.{pn}", p) for n in dense for pn, p in model.get_submodule(n).named_parameters()]
    return named


class HealHooks(Hooks):
    """The loop's additions: KL loss, validation every ``eval_every`` steps, best tensors, early stop."""

    name = "heal"

    def __init__(self, opts: HealOptions, teacher: Teacher, validation: Batch | None, batch_size: int) -> None:
        self.o, self.teacher, self.validation, self.batch_size = opts, teacher, validation, batch_size
        self.named: list[tuple[str, torch.Tensor]] = []
        self.dense: list[str] = []  # targets kept dense that train too (dense_targets)
        self.curve: dict[str, list[float]] = {"step": [], "nll": [], "kl": []}
        self.best_value, self.best_step, self.bad, self.stopped = float("inf"), 0, 0, False
        self.best: dict[str, torch.Tensor] = {}
        self.model: nn.Module | None = None

    def parameters(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        self.named = healed_parameters(model, self.o.norms, self.dense)
        return self.named

    def loss(self, model: nn.Module, objective: Objective, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss = objective.loss(model, batch)
        return loss, {"loss": float(loss.detach())}

    def validate(self, model: nn.Module, step: int) -> None:
        """Measure the validation split at ``step`` (steps done) and update best / patience."""
        if self.validation is None:
            return
        state = process_state()
        res = measure(model, self.teacher, self.validation, self.batch_size, int(state.process_index), int(state.num_processes))
        for k, v in (("step", float(step)), ("nll", res["nll"]), ("kl", res["kl"])):
            self.curve[k].append(v)
        value = res[self.o.monitor]
        if value < self.best_value - self.o.min_delta or not self.curve["step"][:-1]:
            self.best_value, self.best_step, self.bad = value, step, 0
            if self.o.restore_best:
                self.best = {n: p.detach().clone() for n, p in self.named}
        else:
            self.bad += 1
            self.stopped = self.bad >= self.o.patience

    def after_step(self, model: nn.Module, step: int, logs: dict[str, float]) -> None:
        if (step + 1) % self.o.eval_every == 0:
            self.validate(model, step + 1)

    def should_stop(self) -> bool:
        return self.stopped

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"curve.{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.curve.items()}
        out["early"] = torch.tensor([self.best_value, self.best_step, self.bad, float(self.stopped)], dtype=torch.float64)
        out.update({f"best.{n}": t for n, t in self.best.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.curve = {k: tensors[f"curve.{k}"].tolist() for k in self.curve if f"curve.{k}" in tensors}
        if "early" in tensors:
            bv, bs, bad, stopped = tensors["early"].tolist()
            self.best_value, self.best_step, self.bad, self.stopped = bv, int(bs), int(bad), bool(stopped)
        self.best = {k[5:]: v.clone() for k, v in tensors.items() if k.startswith("best.")}

    def fingerprint(self) -> dict[str, Any]:
        o = self.o
        return {"top_k": o.top_k, "lm_weight": o.lm_weight, "norms": o.norms, "eval_every": o.eval_every, "patience": o.patience,
                "min_delta": o.min_delta, "monitor": o.monitor, "restore_best": o.restore_best, "steps": o.steps,
                "balance": o.balance, "windows": o.windows,
                "validation": None if self.validation is None else list(self.validation["input_ids"].shape)}


@register_trainer("heal")
class HealTrainer(Configurable):
    """``--trainer heal``: distil the dense model's next-token distributions into the compressed one."""

    name = "heal"
    Options = HealOptions
    validates = True  # ranklm compress cuts validation windows for it (context.validation)

    def __init__(self, options: Any = None, /, **given: Any) -> None:
        super().__init__(options, **given)
        self.teacher: Teacher | None = None
        self.cache: dict[str, torch.Tensor] | None = None
        self.val_cache: dict[str, torch.Tensor] | None = None
        self.val_ids: torch.Tensor | None = None
        self.prepare_seconds = 0.0
        self.teacher_memory: dict[str, Any] = {}
        self.teacher_shared = False  # the cache came from an earlier run on the same dense model and windows
        self.train_ids: torch.Tensor | None = None  # the windows the teacher was prepared on (prepare())

    def prepare(self, model: nn.Module, context: Any) -> None:
        """Called by the pipeline on the dense model, before any target is replaced: the teacher."""
        import time

        if not is_causal_lm(model):
            raise RanklmError(f"heal distils next-token distributions: it needs a causal LM; {type(model).__name__} has none")
        if context.windows is None:
            raise RanklmError("heal needs calibration windows to train on")
        t0 = time.perf_counter()
        rss0 = resident_mib()
        val = getattr(context, "validation", None)
        self.val_ids = None if val is None else val[: self.val_windows]
        windows = self.train_ids = self._train_windows(self._windows_of(context))  # train() reads the same, logged once
        bs = self.batch_size
        self.teacher_shared = False
        if self.top_k:
            self.teacher = Teacher()
            # bench's cells compress copies of one dense model on the same windows: one cache serves them all
            shared = getattr(context, "shared", None)
            key = ("heal-teacher", self.top_k, bs, _digest(windows), None if self.val_ids is None else _digest(self.val_ids))
            if shared is not None and key in shared:
                self.cache, self.val_cache = shared[key]
                self.teacher_shared = True
            else:
                self.cache = teacher_top_k(model, windows, self.top_k, bs)
                if self.val_ids is not None:
                    self.val_cache = teacher_top_k(model, self.val_ids, self.top_k, bs)
                if shared is not None:
                    shared[key] = (self.cache, self.val_cache)
        else:
            live = copy.deepcopy(model).eval()
            for p in live.parameters():
                p.requires_grad_(False)
            self.teacher = Teacher(live)
        self.prepare_seconds = time.perf_counter() - t0
        rss1 = resident_mib()
        held = ([*self.cache.values(), *(self.val_cache or {}).values()] if self.top_k
                else [*self.teacher.live.parameters(), *self.teacher.live.buffers()])
        self.teacher_memory = {"tensors_mib": _tensor_mib(held),
                               "rss_growth_mib": None if rss0 is None or rss1 is None else round(rss1 - rss0, 1)}

    def _train_windows(self, windows: torch.Tensor) -> torch.Tensor:
        return windows[:, : self.seq_len] if self.seq_len else windows

    def _windows_of(self, context: Any) -> torch.Tensor:
        """The windows it trains on: the driver's longer list when ``windows`` asks for more than the
        calibration windows (``pipeline.trainer_windows``), else the calibration windows."""
        more = getattr(context, "train_windows", None)
        if more is not None:
            return more
        if self.windows > len(context.windows):  # recorded in train_windows; info, as the default asks for 192
            logger.info("heal: windows=%d asked for, training on the %d calibration windows (the driver cut no more: "
                        "calibration given as token ids, or a text with no more windows)", self.windows, len(context.windows))
        return context.windows

    def train(self, model: nn.Module, context: Any) -> TrainResult:
        if self.teacher is None:
            raise RanklmError("heal: no teacher (the pipeline calls prepare() on the dense model before installing)")
        windows = self.train_ids
        objective = kl_objective(windows, self.teacher, self.cache, self.top_k, self.lm_weight)
        validation = None if self.val_ids is None else self.teacher.examples(self.val_ids, self.val_cache)
        bs = self.batch_size
        balanced = balance_factors(model) if self.balance else 0
        hooks = HealHooks(self.config, self.teacher, validation, bs)
        if self.dense_targets and context.rank_map is None:
            raise RanklmError("heal: dense_targets needs the installed rank map (the pipeline sets it before training)")
        hooks.dense = sorted(n for n, k in (context.rank_map or {}).items() if k == DENSE) if self.dense_targets else []
        hooks.named = healed_parameters(model, self.norms, hooks.dense)
        if validation is None:
            logger.warning("heal: no validation windows: training all %d steps, no early stopping", self.steps)
        else:
            hooks.validate(model, 0)  # the starting point (overwritten by a resumed state)
        cfg = LoopConfig(
            steps=self.steps, lr=self.lr, batch_size=bs, seed=context.seed, grad_accum=self.grad_accum,
            save_every=context.save_every, state_file=context.state_file(self.name), resume=context.resume,
            progress=context.progress, desc="heal", max_grad_norm=self.max_grad_norm or None,
            lr_schedule=self.lr_schedule, warmup_steps=min(self.warmup, self.steps),
        )
        res = run_loop(model, objective, hooks, cfg)
        restored = False
        if self.restore_best and hooks.best:
            with torch.no_grad():
                for n, p in hooks.named:
                    p.copy_(hooks.best[n])
            restored = True
        losses = res.history.get("loss") or []
        curve = hooks.curve
        record = {
            "trainer": self.name, "stage": "train", "steps": self.steps, "steps_run": len(losses),
            "options": self.options(), "objective": objective.description, "teacher":
                {"kind": "top-k cache" if self.top_k else "live copy", "top_k": self.top_k,
                 "prepare_seconds": round(self.prepare_seconds, 2), "memory": self.teacher_memory,
                 "shared": self.teacher_shared},
            "train_windows": {"windows": int(len(windows)), "seq_len": int(windows.shape[1]),
                              "calibration_windows": int(len(context.windows))},
            "balanced_layers": balanced, "dense_targets_trained": len(hooks.dense), "trained_tensors": len(hooks.named), "trained_params": int(sum(p.numel() for _, p in hooks.named)),
            "first_loss": losses[0] if losses else None, "final_loss": res.final_loss,
            "stopped_early": res.stopped_at is not None and res.stopped_at < self.steps,
            "validation": None if validation is None else {
                "windows": int(len(self.val_ids)), "seq_len": int(self.val_ids.shape[1]), "monitor": self.monitor,
                "curve": curve, "start": {"nll": curve["nll"][0], "kl": curve["kl"][0]} if curve["nll"] else None,
                "best_step": hooks.best_step, "best": hooks.best_value, "restored_best": restored},
            "seconds": round(res.seconds, 2), "resumed_from_step": res.start_step, "world_size": res.world_size,
            "history": res.history,
        }
        self.teacher = self.cache = self.val_cache = self.train_ids = None  # free the teacher (a live copy is a whole model)
        return TrainResult(record=record)


__all__ = ["HealHooks", "HealOptions", "HealTrainer", "healed_parameters"]
