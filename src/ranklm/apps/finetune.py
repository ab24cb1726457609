"""Task fine-tuning of encoders with compression (docs/design.md §5 "Task fine-tuning", ``ranklm finetune``).

``finetune_task`` drives one run: a classification objective on the task's train split
(``input_ids``, ``attention_mask``, ``labels``; each batch is trimmed to its longest
sequence), the compression pipeline (``pipeline.run``) with that objective, and the
accuracy/macro-F1 of the result on the validation and test splits. What each
``--allocator`` does with the ``steps`` budget (every method spends the same total number of
loop steps, each step one batch of ``batch_size`` examples), after the same head warm-up:

* every method first trains the new classification head alone for ``head_steps`` (encoder
  frozen, lr ``head_lr``; the linear-probe stage of LP-FT, Kumar et al. 2022). Measured on
  MiniLM + Rotten Tomatoes without it: the loss of a new head on a sentence-embedding encoder
  sat at ln 2 for ~35 of 50-100 steps at lr 1e-4-2e-4, which both wasted the short CPU step
  budget and left RankDyna's importance scores measured before any task signal existed;

* ``--keep 1``: dense fine-tuning of every parameter for ``steps`` (the uncompressed reference);
* ``rankdyna``: one round of ``steps`` in which the model adapts and the ranks move
  (``allocate/rankdyna.py``), starting from the pre-trained model;
* ``static`` (and any allocator that does not train the model, e.g. ``ars``, ``softlm``,
  ``uniform``): dense fine-tuning for ``dense_fraction x steps`` (0.5), then the pipeline
  factors the task-tuned model with the base (Fisher bases on the task loss) and allocates;
  a learning allocator (ARS, SoftLMs) learns its masks/thresholds on the task loss for half of
  the remaining steps (unless its ``steps`` option is given); the ``finetune`` trainer trains
  the factors and every other parameter for the rest, its learning rate warmed up over the first 20 %
  of those steps (``post_truncation_warmup``: without it SoftLMs' keep-0.4 run collapsed to the
  majority class when this stage started).

Data parallel: under ``torchrun``/``accelerate launch`` every process runs this same function
(same seed, same data); the loop splits each global batch and averages gradients (gloo on
CPU), so all processes end with the same rank map and weights. Only the main process writes
(state files, run.json, the checkpoint) and evaluates.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..budget import DENSE, model_params
from ..calibration import TextSource, token_windows
from ..config import CompressConfig
from ..errors import RanklmError
from ..pipeline import calibration_info, compression_state, make_plan
from ..pipeline import run as run_pipeline
from ..registry import declared_options, table
from ..targets import find_targets
from ..tasks import TaskData
from ..train.state import open_state_dir
from ..train.loop import LR_SCHEDULES, Hooks, LoopConfig, process_state, run_loop
from ..train.task import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_MAX_LENGTH,
    DEFAULT_STEPS,
    DenseHooks,
    HeadHooks,
    evaluate_task,
    model_label2id,
    task_objective,
)


@dataclass
class TaskRunConfig:
    keep: float
    allocator: str = "rankdyna"
    base: str = "svd"
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH_SIZE
    max_length: int = DEFAULT_MAX_LENGTH
    seed: int = 0
    head_steps: int = 50
    head_lr: float = 1e-3
    calib_windows: int = 64
    fisher_examples: int = 64
    save_every: int = 25
    # None: each stage's own schedule (dense and post-truncation stages constant after their warm-up, RankDyna's
    # round linear); a name: that schedule for the dense stage, RankDyna's round and the fine-tuning after truncation,
    # so methods compare on equal terms (ARS' and SoftLMs' mask / threshold stages keep their own)
    lr_schedule: str | None = None
    base_options: dict[str, Any] = field(default_factory=dict)
    allocator_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "calib_windows", "fisher_examples", "save_every"):
            if int(getattr(self, name)) < 1:
                raise RanklmError(f"--{name.replace('_', '-')} must be a positive integer")
        if int(self.head_steps) < 0:
            raise RanklmError("--head-steps must be >= 0")
        for name in ("lr", "head_lr"):
            if not getattr(self, name) > 0:
                raise RanklmError(f"--{name.replace('_', '-')} must be a positive number")
        if not 0 < self.keep <= 1:
            raise RanklmError(f"bad ratio --keep {self.keep}: it must lie in (0, 1]")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise RanklmError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)} (got {self.lr_schedule!r})")


def _declares(cls: type, option: str) -> bool:
    return any(o.name == option for o in declared_options(cls) or ())


def plan_steps(cfg: TaskRunConfig) -> dict[str, Any]:
    """How ``cfg.steps`` is spent: {"dense": n, "allocator_options": {...}, "finetune": n}."""
    ALLOCATORS = table("allocator")

    if cfg.keep >= 1.0:
        return {"dense": cfg.steps, "allocator_options": {}, "finetune": 0}
    if cfg.allocator not in ALLOCATORS:
        raise RanklmError(f"unknown allocator {cfg.allocator!r}; valid allocators: {', '.join(sorted(ALLOCATORS))}")
    cls = ALLOCATORS[cfg.allocator]
    opts = dict(cfg.allocator_options)
    if getattr(cls, "trains_model", False):  # RankDyna: one round
        opts.setdefault("steps", cfg.steps)
        if _declares(cls, "lr"):
            opts.setdefault("lr", cfg.lr)
        if cfg.lr_schedule is not None and _declares(cls, "lr_schedule"):
            opts.setdefault("lr_schedule", cfg.lr_schedule)
        return {"dense": 0, "allocator_options": opts, "finetune": 0}
    frac = float(opts.get("dense_fraction", 0.5)) if _declares(cls, "dense_fraction") else 0.5
    dense = int(round(frac * cfg.steps))
    rest = cfg.steps - dense
    alloc_steps = 0
    if getattr(cls, "needs_training", False) and _declares(cls, "steps"):
        opts.setdefault("steps", rest // 2)
        alloc_steps = int(opts["steps"])
    return {"dense": dense, "allocator_options": opts, "finetune": max(0, rest - alloc_steps), "allocator_steps": alloc_steps}


POST_TRUNCATION_WARMUP = 0.2  # of the fine-tuning steps after truncation
STAGE_WARMUP = 0.1  # of the dense stage's steps, with a --lr-schedule that decays (as RankDyna's round)


def post_truncation_warmup(steps: int) -> int:
    """Warm-up steps of the fine-tuning stage after truncation.

    SoftLMs at keep 0.4 (benchmarks/tasks.md) learned its thresholds to a task loss of 0.48, then the
    first steps of plain Adam at the full lr on every parameter of the truncated model (fresh moments:
    every element moves by about lr at once) drove the loss back to ln 2 and the model to the majority
    class. The stage now warms its lr up linearly over the first 20 % of its steps, with clipping as in
    the dense stage."""
    return max(1, round(POST_TRUNCATION_WARMUP * steps)) if steps > 0 else 0


def finetune_task(model: nn.Module, tokenizer, task: TaskData, cfg: TaskRunConfig, state_dir: str | Path | None = None,
                  resume: bool = False, progress: bool = True, model_info: dict[str, Any] | None = None,
                  evaluate: bool = True) -> dict[str, Any]:
    """Fine-tune (and compress) ``model`` in place on ``task``; returns the run's summary.

    ``model.ranklm`` holds the compression state afterwards (save it with ``ranklm.save``).
    """
    state = process_state()
    main = bool(state.is_main_process)
    world = int(state.num_processes)
    steps_plan = plan_steps(cfg)
    objective = task_objective(task, tokenizer, cfg.max_length, "train", model_label2id(model))
    info = model_info or {"name_or_path": getattr(model.config, "name_or_path", type(model).__name__)}
    config = CompressConfig(
        keep=cfg.keep, recipe=None, base=cfg.base, allocator=cfg.allocator if cfg.keep < 1 else "uniform",
        calib_windows=cfg.calib_windows, seq_len=cfg.max_length, batch_size=cfg.batch_size, seed=cfg.seed,
        fisher_windows=cfg.fisher_examples, base_options=dict(cfg.base_options),
        allocator_options=steps_plan["allocator_options"] if cfg.keep < 1 else {},
        trainer="finetune" if steps_plan["finetune"] > 0 else "none",
        trainer_options={"steps": steps_plan["finetune"], "lr": cfg.lr, "batch_size": cfg.batch_size, "train_all": True,
                         "warmup": post_truncation_warmup(steps_plan["finetune"]), "max_grad_norm": 1.0,
                         **({"lr_schedule": cfg.lr_schedule} if cfg.lr_schedule is not None else {})}
        if steps_plan["finetune"] > 0 else {},
    )
    config.validate_options(from_cli=True)
    if state_dir is not None and main:
        fingerprint = {"model": str(info.get("path") or info.get("name_or_path")), "task": task.info(),
                       "objective_sha256": objective.fingerprint(), "run": asdict(cfg), "world_size": world}
        open_state_dir(state_dir, fingerprint, resume)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    torch.manual_seed(cfg.seed)
    dense_params = model_params(model)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []

    def train_stage(hooks: Hooks, steps: int, lr: float, seed: int, stage: str, desc: str, schedule: str | None = None) -> None:
        """One loop stage before compression (head warm-up, dense fine-tuning), recorded in ranklm.json.
        ``schedule``: the run's --lr-schedule, with the same 10 % warm-up as RankDyna's round (None: constant)."""
        scheduled = schedule is not None and schedule != "constant"
        lc = LoopConfig(steps=steps, lr=lr, batch_size=cfg.batch_size, seed=seed, save_every=cfg.save_every,
                        state_file=None if state_dir is None else Path(state_dir) / f"{hooks.name}.safetensors",
                        resume=resume, progress=progress, desc=desc, max_grad_norm=1.0, lr_schedule=schedule or "constant",
                        warmup_steps=max(1, round(STAGE_WARMUP * steps)) if scheduled else 0)
        res = run_loop(model, objective, hooks, lc)
        records.append({"trainer": hooks.name, "stage": stage, "steps": steps,
                        "options": {"lr": lr, "batch_size": cfg.batch_size, "lr_schedule": lc.lr_schedule,
                                    "warmup_steps": lc.warmup_steps}, "objective": objective.description,
                        "final_loss": res.final_loss, "first_loss": (res.history.get("loss") or [None])[0],
                        "seconds": round(res.seconds, 2), "resumed_from_step": res.start_step, "world_size": res.world_size,
                        "history": res.history})

    if cfg.head_steps > 0:  # LP-FT: a trained head first, so every method's steps (and RankDyna's scores) see a task signal
        train_stage(HeadHooks(), cfg.head_steps, cfg.head_lr, cfg.seed + 1, "before compression (encoder frozen)", "head warm-up")
    if steps_plan["dense"] > 0:
        train_stage(DenseHooks(), steps_plan["dense"], cfg.lr, cfg.seed, "before compression", "dense fine-tune",
                    cfg.lr_schedule)
    if cfg.keep >= 1.0:
        targets = find_targets(model)
        rank_map = {t.name: DENSE for t in targets}
        model.ranklm = compression_state(model, make_plan(config), targets, rank_map, dense_params, None, info,
                                         {"train_s": time.perf_counter() - t0}, {}, records)  # type: ignore[assignment]
        model.ranklm.method = "dense-finetune"
    else:
        src = TextSource(f"{task.name} train split texts", task.splits["train"].texts)
        windows = token_windows(tokenizer, src, cfg.max_length, cfg.calib_windows, seed=cfg.seed, strict=False)
        run_pipeline(model, tokenizer, config, data=windows, progress=progress, base_model=info,
                     calibration=calibration_info(src.description, windows, config), objective=objective,
                     state_dir=state_dir, resume=resume, save_every=cfg.save_every)
        model.ranklm.training[:0] = records
    train_seconds = time.perf_counter() - t0
    st = model.ranklm
    st.artifacts["task"] = task.info()
    st.timings["train_seconds"] = train_seconds
    summary: dict[str, Any] = {
        "task": task.name, "model": info.get("name_or_path"), "method": st.method,
        "allocator": cfg.allocator if cfg.keep < 1 else "none", "base": cfg.base if cfg.keep < 1 else None,
        "keep_requested": st.keep_requested, "keep_achieved": st.keep_achieved, "keep_achieved_model": st.keep_achieved_model,
        "steps": cfg.steps, "head_steps": cfg.head_steps, "steps_plan": {k: v for k, v in steps_plan.items() if k != "allocator_options"},
        "batch_size": cfg.batch_size, "max_length": cfg.max_length, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule, "seed": cfg.seed,
        "world_size": world, "train_seconds": round(train_seconds, 2), "split_sizes": task.sizes,
        "params": st.params,
    }
    for r in st.training:
        if "keep_learned" in r:
            summary["keep_learned"] = r["keep_learned"]
        if "comebacks" in r:
            summary["comebacks"] = r["comebacks"]
    if evaluate and main:
        t1 = time.perf_counter()
        val = evaluate_task(model, tokenizer, task, "validation", cfg.max_length)
        test = evaluate_task(model, tokenizer, task, "test", cfg.max_length)
        st.evaluation = {"task": task.name, "validation": val.to_dict(), "test": test.to_dict()}
        summary.update(accuracy=test.accuracy, macro_f1=test.macro_f1, validation_accuracy=val.accuracy,
                       validation_macro_f1=val.macro_f1, test_examples=test.examples, eval_seconds=round(time.perf_counter() - t1, 2))
    return summary


__all__ = ["TaskRunConfig", "finetune_task", "plan_steps"]
