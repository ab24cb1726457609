"""The one training loop every trainer runs on (docs/design.md §1: training is an axis).

``run_loop(model, objective, hooks, config)`` trains ``hooks.parameters(model)``
with Adam on ``hooks.loss(...)`` (by default the objective's loss: plain
fine-tuning). A trainer (ARS, fine-tuning, SoftLMs, RankDyna) is a set of hooks:

* ``begin(model)`` / ``end(model)``: swap wrappers in and out (``end`` always runs);
* ``parameters(model)``: the named tensors to train (they may live outside the model,
  e.g. ARS's hypernetwork);
* ``loss(model, objective, batch, step)`` -> (loss, numbers to log): masks, penalties;
* ``after_step(model, step, logs)``: schedules, importance scores, masking;
* ``state_tensors()`` / ``load_state_tensors(t)``: extra state a resume needs (EMAs);
* ``fingerprint()``: options that must match for a resume.

What the loop does for every trainer: seeded batches (a function of seed and step
only), gradient accumulation, a progress bar with the logged numbers, a non-finite
loss stop, the state (trained tensors, Adam moments, hook state, step, history)
saved atomically every ``save_every`` steps and at the end, and ``resume``.

Data parallel: the loop runs through accelerate's process state, so the same code
runs under ``torchrun``/``accelerate launch``. Each process takes its slice of the
step's global batch; gradients are averaged over processes with an explicit
all-reduce of every trained tensor (this works for tensors outside the model, which
DDP would not see, and does not depend on the model being wrapped). Only the main
process writes state files.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import RanklmError
from .freeze import training_only
from .objective import Batch, Objective
from .state import load_optimizer_tensors, optimizer_tensors, read_state_file, write_state_file

STATE_VERSION = 2
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class LoopConfig:
    steps: int
    lr: float
    batch_size: int = 4
    seed: int = 0
    grad_accum: int = 1
    save_every: int = 50
    state_file: str | os.PathLike | None = None  # where to save (and, with resume, read) the loop's state
    resume: bool = False
    progress: bool = True
    desc: str = "train"
    max_grad_norm: float | None = None
    lr_schedule: str = "constant"  # or "cosine": decay every group's lr to 0 over the steps; or "linear"
    warmup_steps: int = 0  # > 0 (or lr_schedule "linear"): transformers' schedule of that name with this warm-up
    others_trainable: bool = False  # also train every model parameter that hooks.parameters does not name

    def __post_init__(self) -> None:
        if int(self.steps) < 0:
            raise RanklmError(f"{self.desc}: steps must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RanklmError(f"{self.desc}: lr must be a positive number")
        if self.lr_schedule not in LR_SCHEDULES:
            raise RanklmError(f"{self.desc}: lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        if int(self.warmup_steps) < 0:
            raise RanklmError(f"{self.desc}: warmup_steps must be >= 0")
        if int(self.batch_size) < 1 or int(self.grad_accum) < 1 or int(self.save_every) < 1:
            raise RanklmError(f"{self.desc}: batch_size, grad_accum and save_every must be positive integers")

    def fingerprint(self) -> dict[str, Any]:
        return {"lr": self.lr, "batch_size": int(self.batch_size), "seed": int(self.seed), "grad_accum": int(self.grad_accum),
                "max_grad_norm": self.max_grad_norm, "others_trainable": self.others_trainable, "lr_schedule": self.lr_schedule,
                **({"warmup_steps": int(self.warmup_steps)} if self.warmup_steps else {})}


class Hooks:
    """A trainer's additions to the loop; the defaults make it plain fine-tuning of the given parameters."""

    name = "train"

    def begin(self, model: nn.Module) -> None:
        pass

    def end(self, model: nn.Module) -> None:
        pass

    def parameters(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier of one trained tensor (e.g. a threshold trained faster than factors)."""
        return 1.0

    def loss(self, model: nn.Module, objective: Objective, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss = objective.loss(model, batch)
        return loss, {"loss": float(loss.detach())}

    def after_step(self, model: nn.Module, step: int, logs: dict[str, float]) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def fingerprint(self) -> dict[str, Any]:
        return {}

    def should_stop(self) -> bool:
        """True ends the run before its next step (early stopping); the state is saved at that step."""
        return False


@dataclass
class LoopResult:
    steps: int
    start_step: int  # > 0 when the run resumed
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    world_size: int = 1
    stopped_at: int | None = None  # the step count at which hooks.should_stop() ended the run

    @property
    def final_loss(self) -> float | None:
        h = self.history.get("loss") or []
        return h[-1] if h else None


def process_state() -> Any:
    """accelerate's process state (rank, world size, device); one per process."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _average_gradients(params: list[torch.Tensor], world: int) -> None:
    if world <= 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


def lr_factors(cfg: LoopConfig, opt: torch.optim.Optimizer) -> Any:
    """``factor(step)``, the multiplier of every group's base lr at ``step`` (a function of the step only,
    so a resumed run follows the same schedule). With warm-up, or for ``linear``, it is transformers'
    schedule of that name (``get_scheduler``: cosine / linear decay, constant, after a linear warm-up);
    without warm-up ``cosine`` and ``constant`` keep the loop's own formulas (ARS and SoftLMs ran on them)."""
    if not cfg.warmup_steps and cfg.lr_schedule in ("constant", "cosine"):
        if cfg.lr_schedule == "constant":
            return lambda step: 1.0
        return lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.steps)))
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    sched = get_scheduler(name, opt, num_warmup_steps=int(cfg.warmup_steps), num_training_steps=max(1, int(cfg.steps)))
    fn = sched.lr_lambdas[0]
    for g, lr0 in zip(opt.param_groups, sched.base_lrs):  # undo the scheduler's own first step
        g["lr"] = lr0
    return fn


def run_loop(model: nn.Module, objective: Objective, hooks: Hooks, cfg: LoopConfig) -> LoopResult:
    """Train ``hooks.parameters(model)`` for ``cfg.steps`` steps (see the module docstring)."""
    state = process_state()
    world, rank = int(state.num_processes), int(state.process_index)
    if cfg.batch_size < world:
        raise RanklmError(f"{cfg.desc}: batch size {cfg.batch_size} is smaller than the {world} processes")
    t0 = time.perf_counter()
    history: dict[str, list[float]] = {}
    start = 0
    stopped_at: int | None = None
    hooks.begin(model)
    try:
        named = hooks.parameters(model)
        in_model = {id(p) for p in model.parameters()}
        with training_only(model, [p for _, p in named if id(p) in in_model], others=cfg.others_trainable):
            if cfg.others_trainable:
                have = {id(p) for _, p in named}
                named = named + [(f"model.{n}", p) for n, p in model.named_parameters() if id(p) not in have]
            for _, p in named:
                p.requires_grad_(True)
            params = [p for _, p in named]
            scales: dict[float, list[torch.Tensor]] = {}
            for n, p in named:
                scales.setdefault(float(hooks.lr_scale(n)), []).append(p)
            opt = torch.optim.Adam([{"params": ps, "lr": cfg.lr * sc} for sc, ps in scales.items()], lr=cfg.lr)
            base_lrs = [g["lr"] for g in opt.param_groups]
            factor = lr_factors(cfg, opt)
            fp = {"version": STATE_VERSION, "trainer": hooks.name, "loop": cfg.fingerprint(), "hooks": hooks.fingerprint(),
                  "objective": objective.fingerprint(), "params": {n: list(p.shape) for n, p in named}}
            if cfg.resume and cfg.state_file is not None and Path(cfg.state_file).is_file():
                start, history = _restore(cfg.state_file, named, opt, hooks, fp, cfg.steps)
            bar = tqdm(range(start, cfg.steps), desc=cfg.desc, disable=not cfg.progress or rank != 0, unit="step",
                       initial=start, total=cfg.steps)
            for step in bar:
                if hooks.should_stop():  # a resumed run that had stopped early stays stopped
                    stopped_at = step
                    break
                if cfg.lr_schedule != "constant" or cfg.warmup_steps:  # a function of the step only: resumes exactly
                    f = factor(step)
                    for g, lr0 in zip(opt.param_groups, base_lrs):
                        g["lr"] = lr0 * f
                opt.zero_grad(set_to_none=True)
                logs: dict[str, float] = {}
                for micro in range(cfg.grad_accum):
                    batch = objective.batch(step * cfg.grad_accum + micro, cfg.batch_size, cfg.seed, rank, world)
                    loss, micro_logs = hooks.loss(model, objective, batch, step)
                    if not torch.isfinite(loss):
                        raise RanklmError(f"{cfg.desc}: non-finite training loss at step {step}; lower the learning rate")
                    (loss / cfg.grad_accum).backward()
                    for k, v in micro_logs.items():
                        logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
                _average_gradients(params, world)
                if world > 1:  # every process logs the same (global) numbers
                    logs = _mean_logs(logs, world)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                hooks.after_step(model, step, logs)
                for k, v in logs.items():
                    history.setdefault(k, []).append(float(v))
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(logs.items())[:5]})
                stop = hooks.should_stop()
                if cfg.state_file is not None and rank == 0 and (
                        (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop):
                    _save(cfg.state_file, named, opt, hooks, fp, step + 1, history)
                if stop:
                    stopped_at = step + 1
                    break
            bar.close()
    finally:
        hooks.end(model)
    return LoopResult(steps=cfg.steps, start_step=start, history=history, seconds=time.perf_counter() - t0, world_size=world,
                      stopped_at=stopped_at)


def _mean_logs(logs: dict[str, float], world: int) -> dict[str, float]:
    import torch.distributed as dist

    if not logs:
        return logs
    t = torch.tensor(list(logs.values()), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world for k, v in zip(logs, t.tolist())}


def _save(path: str | os.PathLike, named: list[tuple[str, torch.Tensor]], opt: torch.optim.Optimizer, hooks: Hooks,
          fp: dict[str, Any], step: int, history: dict[str, list[float]]) -> None:
    tensors = {f"param.{n}": p.detach() for n, p in named}
    tensors.update(optimizer_tensors(opt, "opt."))
    tensors.update({f"hook.{k}": v for k, v in hooks.state_tensors().items()})
    write_state_file(path, tensors, {"fingerprint": fp, "step": step, "history": history}, key="loop")


def _restore(path: str | os.PathLike, named: list[tuple[str, torch.Tensor]], opt: torch.optim.Optimizer, hooks: Hooks,
             fp: dict[str, Any], steps: int) -> tuple[int, dict[str, list[float]]]:
    """Load a saved state into the live tensors, optimizer and hooks; refuse one from another run."""
    import json

    tensors, meta = read_state_file(path, "loop", f"{hooks.name} training")
    saved = json.loads(json.dumps(meta.get("fingerprint", {})))
    fresh = json.loads(json.dumps(fp, default=str))
    diff = sorted(k for k in set(saved) | set(fresh) if saved.get(k) != fresh.get(k))
    if diff:
        detail = []
        for k in diff:
            if isinstance(saved.get(k), dict) and isinstance(fresh.get(k), dict):
                sub = sorted(j for j in set(saved[k]) | set(fresh[k]) if saved[k].get(j) != fresh[k].get(j))
                detail.append(f"{k}: {', '.join(sub[:4])}")
            else:
                detail.append(k)
        raise RanklmError(f"{hooks.name} resume: {path} was saved by a different run ({'; '.join(detail)} differ)")
    step = int(meta["step"])
    if step > steps:
        raise RanklmError(f"{hooks.name} resume: {path} is at step {step}, beyond the {steps} steps asked for")
    with torch.no_grad():
        for n, p in named:
            p.copy_(tensors[f"param.{n}"])
    load_optimizer_tensors(opt, tensors, "opt.")
    hooks.load_state_tensors({k[5:]: v for k, v in tensors.items() if k.startswith("hook.")})
    history = {k: list(v)[:step] for k, v in (meta.get("history") or {}).items()}
    return step, history


__all__ = ["Hooks", "LoopConfig", "LoopResult", "process_state", "run_loop"]
