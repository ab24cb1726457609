"""Limited fine-tuning of installed low-rank factors on calibration text (DESIGN §1 "training").

After a rank map is installed, ``finetune_factors`` trains the ``A``/``B``
weights of every ``LowRankLinear`` (and, with ``train_all=True``, every other
parameter too) for a few Adam steps on the LM loss of random calibration
windows. Batches are drawn from a generator seeded per step, so a run is
deterministic on CPU. Ranks do not change; the model stays a plain
LowRankLinear model that ``ranklm.save`` writes as usual.

Resume: with ``save_state=PATH`` the trained tensors, Adam moments, step and loss
history go into one safetensors file every ``save_every`` steps (``train/state.py``);
``resume=PATH`` loads it into the same model (same rank map, same trainable set)
and continues, which reproduces the uninterrupted run exactly because step t's
batch depends only on (seed, t).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import RanklmError
from ..layers import LowRankLinear
from .freeze import training_only
from .state import load_optimizer_tensors, optimizer_tensors, read_state_file, write_state_file

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
STATE_KEY = "finetune"
STATE_VERSION = 1


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def is_causal_lm(model: nn.Module) -> bool:
    head = getattr(model, "get_output_embeddings", None)
    can_generate = getattr(model, "can_generate", None)
    return callable(head) and head() is not None and callable(can_generate) and bool(can_generate())


def batch_for_step(windows: torch.Tensor, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Calibration windows for one step: a seeded choice that depends only on (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randperm(len(windows), generator=g)[: min(batch_size, len(windows))]
    return windows[idx]


def finetune_factors(
    model: nn.Module,
    windows: torch.Tensor,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 2,
    seed: int = 0,
    train_all: bool = False,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    save_state: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    save_every: int = 50,
) -> list[float]:
    """Fine-tune the installed factors for ``steps`` Adam steps; returns the loss per step (all of them, resumed too)."""
    if steps <= 0:
        return []
    if loss_fn is None:
        if not is_causal_lm(model):
            raise RanklmError(f"fine-tuning needs a causal LM loss; {type(model).__name__} has no LM head (give loss_fn)")
        loss_fn = lm_loss
    factor_params = [p for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()]
    if not factor_params:
        raise RanklmError("nothing to fine-tune: the model has no LowRankLinear layers")
    device = next(model.parameters()).device
    options = {"steps": int(steps), "lr": float(lr), "batch_size": int(batch_size), "seed": int(seed), "train_all": bool(train_all)}
    history: list[float] = []
    start = 0
    with training_only(model, factor_params, others=train_all):  # eval mode: no dropout, deterministic
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.Adam([p for _, p in named], lr=lr)
        if resume is not None:
            start, history = _restore(resume, named, opt, options)
        bar = tqdm(range(start, steps), desc="fine-tune factors", disable=not progress, unit="step", initial=start, total=steps)
        for step in bar:
            ids = batch_for_step(windows, batch_size, seed, step).to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, ids)
            if not torch.isfinite(loss):
                raise RanklmError(f"fine-tuning diverged at step {step} (non-finite loss); lower the learning rate")
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if save_state is not None and ((step + 1) % max(1, save_every) == 0 or step + 1 == steps):
                _save(save_state, named, opt, step + 1, history, options)
    return history


def _save(path: str | os.PathLike, named: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer,
          step: int, history: list[float], options: dict) -> None:
    tensors = {f"param.{n}": p.detach() for n, p in named}
    tensors.update(optimizer_tensors(opt, "opt."))
    meta = {"version": STATE_VERSION, "step": step, "options": options, "history": history,
            "params": {n: list(p.shape) for n, p in named}}
    write_state_file(path, tensors, meta, key=STATE_KEY)


def _restore(path: str | os.PathLike, named: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer,
             options: dict) -> tuple[int, list[float]]:
    """Load a saved state into the live parameters/optimizer; refuse one from another run."""
    tensors, meta = read_state_file(path, STATE_KEY, "fine-tune")
    if meta.get("params") != {n: list(p.shape) for n, p in named}:
        raise RanklmError(f"fine-tune resume: {path} was saved for other trainable tensors (another rank map or model)")
    saved = dict(meta.get("options", {}))
    diff = [k for k in ("lr", "batch_size", "seed", "train_all") if saved.get(k) != options[k]]
    if diff:
        raise RanklmError("fine-tune resume: " + ", ".join(f"{k} {saved.get(k)} != {options[k]}" for k in diff) + f" ({path})")
    step = int(meta["step"])
    if step > options["steps"]:
        raise RanklmError(f"fine-tune resume: {path} is at step {step}, beyond the {options['steps']} steps asked for")
    with torch.no_grad():
        for n, p in named:
            p.copy_(tensors[f"param.{n}"])
    load_optimizer_tensors(opt, tensors, "opt.")
    return step, list(meta.get("history", []))[:step]
