"""ARS: Adaptive Rank Selection with a hypernetwork (Gao et al., NAACL 2024; DESIGN §5).

Works on any base. While masks are learned every target is temporarily replaced
by a ``MaskedFactorized`` module, ``x -> ((x @ B^T) * m) @ A^T + bias``, with the
base's factors ``A`` (out x r), ``B`` (r x in) (r = the largest rank worth
factoring) and a binary mask ``m`` of length r, i.e. ``U diag(m * s) V`` with the
base's transform undone. All model weights are frozen; only the hypernetwork
trains:

* fixed random inputs z (one 32-vector per target, drawn once from the seed, not
  trained) -> bidirectional GRU (hidden 64) over the targets in module order ->
  LayerNorm -> GeLU -> one linear head per target with r_l outputs o_l;
* ``m_l = round(sigmoid((o_l + g + b) / tau))`` with logistic (Gumbel-difference)
  noise g while training, tau = 0.4, b = 3.0 (starts near "keep all"),
  straight-through gradient (forward hard, backward soft);
* loss = LM loss of the masked model on calibration windows
  (``model(input_ids=ids, labels=ids).loss``; for encoders without a given ``loss_fn``,
  distillation of the dense model's last hidden states, ``train/distill.py``)
  + lambda * log(max(T(m), p*T_total) / (p*T_total)), T(m) = sum_l k_l (out_l + in_l),
  k_l = sum(m_l) (straight-through value, so it is differentiable)
  + gamma * sum_l ||(m_l - m'_l) * s_l / max(s_l)||^2, m'_l = first-k_l-ones mask.
  The spectrum is normalised by its largest value so the alignment term is
  scale-free: it does not depend on the base's units (whitened spectra are in
  activation-weighted units, orders of magnitude away from plain SVD's);
* lambda = 16, gamma = 10, Adam lr 1e-3 (constant).

At the end the deterministic mask (no noise) gives k_l = number of ones; the top
k_l components are kept and ``fit_budget`` lands the budget exactly. Its
priority for the step that adds component j of target l is the j-th largest
learned logit of that target, with the per-parameter division neutralised: the
budget term already priced each component by its parameter cost during
training, so the logits are compared directly.

Determinism and resume: the hypernetwork and z come from ``seed``; the noise and
the calibration batch of step t come from generators seeded by (seed, t) only.
So a run of N steps whose state (hypernetwork + Adam state + step) is saved and
resumed for the remaining steps reproduces an uninterrupted run's rank map. The
state goes into ``context.artifacts`` (tensors under ``ars.*`` -> the
checkpoint's ``allocator.safetensors``; step, options, history of keep ratio,
LM loss and alignment per step, learned ranks -> ``ranklm.json`` ``artifacts.ars``)
and, with ``save_state=PATH``, into a standalone safetensors file every
``save_every`` steps (atomic rename). ``resume=`` takes that file, a checkpoint
directory, or an artifacts dict.

Memory: the whole model runs forward and backward (activations of one batch),
plus the factors of every target (about the dense size, since r(out+in) ~ out*in).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..budget import RankMap, fit_budget, max_factored_rank, target_cost, targets_dense_params
from ..decompose.base import Factorization
from ..errors import RanklmError
from ..layers import replace_module
from ..targets import Target
from ..train.finetune import batch_for_step, is_causal_lm, lm_loss
from ..train.freeze import training_only
from ..train.masks import HyperNetwork, MaskedFactorized, gumbel_sigmoid_mask, logistic_noise, prefix_fraction
from ..train.state import load_optimizer_tensors, optimizer_tensors, read_state_file, write_state_file
from .base import AllocationContext, require_context

TENSOR_PREFIX = "ars."
STATE_VERSION = 1


def _load_resume(resume: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors with the ``ars.`` prefix, JSON meta) from a state file, checkpoint dir or artifacts dict."""
    import safetensors.torch

    if isinstance(resume, dict):
        tensors = {k: v for k, v in resume.items() if isinstance(v, torch.Tensor) and k.startswith(TENSOR_PREFIX)}
        meta = resume.get("ars")
        if not isinstance(meta, dict):
            raise RanklmError("ARS resume: the artifacts hold no 'ars' entry")
        return tensors, meta
    p = Path(resume)
    if p.is_dir():
        f, meta_file = p / "allocator.safetensors", p / "ranklm.json"
        if not f.is_file() or not meta_file.is_file():
            raise RanklmError(f"ARS resume: {p} has no allocator.safetensors/ranklm.json (not an ARS checkpoint)")
        meta = json.loads(meta_file.read_text()).get("artifacts", {}).get("ars")
        if not isinstance(meta, dict):
            raise RanklmError(f"ARS resume: {meta_file} holds no ARS state")
        return safetensors.torch.load_file(str(f)), meta
    return read_state_file(p, "ars", "ARS")


class ARSAllocator:
    """Learned binary masks from a Bi-GRU hypernetwork (see the module docstring)."""

    name = "ars"
    needs_context = True

    def __init__(
        self,
        steps: int = 200,
        batch_size: int | None = None,
        lr: float = 1e-3,
        tau: float = 0.4,
        bias: float = 3.0,
        lam: float = 16.0,
        gamma: float = 10.0,
        input_dim: int = 32,
        hidden: int = 64,
        train_seq_len: int | None = None,
        loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        resume: Any = None,
        save_state: str | os.PathLike | None = None,
        save_every: int = 50,
        align_reduction: str = "mean",
        **_: Any,
    ) -> None:
        if int(steps) < 0:
            raise RanklmError("ARS steps must be >= 0")
        if not (tau > 0 and lr > 0 and lam >= 0 and gamma >= 0):
            raise RanklmError("ARS needs tau > 0, lr > 0, lam >= 0, gamma >= 0")
        if batch_size is not None and int(batch_size) < 1:
            raise RanklmError("ARS batch_size must be a positive integer")
        self.steps = int(steps)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.lr = float(lr)
        self.tau = float(tau)
        self.bias = float(bias)
        self.lam = float(lam)
        self.gamma = float(gamma)
        self.input_dim = int(input_dim)
        self.hidden = int(hidden)
        self.train_seq_len = None if train_seq_len is None else int(train_seq_len)
        self.loss_fn = loss_fn
        self.resume = resume
        self.save_state = save_state
        self.save_every = max(1, int(save_every))
        if align_reduction not in ("mean", "sum"):
            raise RanklmError("ARS align_reduction must be 'mean' or 'sum'")
        self.align_reduction = align_reduction

    def options(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "tau": self.tau, "bias": self.bias,
            "lam": self.lam, "gamma": self.gamma, "input_dim": self.input_dim, "hidden": self.hidden,
            "train_seq_len": self.train_seq_len, "align_reduction": self.align_reduction,
        }

    # -- state ------------------------------------------------------------------
    def _state(
        self, hyper: HyperNetwork, opt: torch.optim.Optimizer, step: int, history: dict[str, list[float]],
        targets: list[Target], ranks: list[int], seed: int, keep: float,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{TENSOR_PREFIX}hyper.{k}": v.detach().clone().contiguous() for k, v in hyper.state_dict().items()}
        tensors.update(optimizer_tensors(opt, f"{TENSOR_PREFIX}opt."))
        meta = {
            "version": STATE_VERSION,
            "step": int(step),
            "seed": int(seed),
            "keep": float(keep),
            "options": self.options(),
            "targets": [t.name for t in targets],
            "mask_lengths": list(ranks),
            "history": history,
        }
        return tensors, meta

    def _restore(
        self, hyper: HyperNetwork, opt: torch.optim.Optimizer, targets: list[Target], ranks: list[int], seed: int
    ) -> tuple[int, dict[str, list[float]]]:
        tensors, meta = _load_resume(self.resume)
        if meta.get("targets") != [t.name for t in targets] or meta.get("mask_lengths") != list(ranks):
            raise RanklmError("ARS resume: the saved state was learned for other targets or another model/base")
        if int(meta.get("seed", seed)) != int(seed):
            raise RanklmError(f"ARS resume: the saved state used seed {meta.get('seed')}, this run uses {seed}")
        hp = f"{TENSOR_PREFIX}hyper."
        hyper_sd = {k[len(hp):]: v for k, v in tensors.items() if k.startswith(hp)}
        try:
            hyper.load_state_dict(hyper_sd, strict=True)
        except RuntimeError as e:
            raise RanklmError(f"ARS resume: hypernetwork state does not fit: {str(e).splitlines()[0]}") from None
        load_optimizer_tensors(opt, tensors, f"{TENSOR_PREFIX}opt.")
        history = meta.get("history") or {}
        return int(meta.get("step", 0)), {k: list(v) for k, v in history.items()}

    # -- the allocation ---------------------------------------------------------
    def allocate(
        self,
        targets: list[Target],
        factorizations: dict[str, Factorization],
        keep: float,
        min_rank: int = 1,
        context: AllocationContext | None = None,
    ) -> RankMap:
        context = require_context(context, self.name)
        model = context.model
        loss_fn = self.loss_fn or getattr(context, "loss_fn", None)
        windows = context.windows
        if self.train_seq_len is not None:
            windows = windows[:, : self.train_seq_len]
        if loss_fn is None:
            if is_causal_lm(model):
                loss_fn = lm_loss
            else:  # encoders without a task: distil the dense model's last hidden states
                from ..train.distill import hidden_state_distillation

                loss_fn = hidden_state_distillation(model, windows, context.batch_size)
        batch_size = self.batch_size or context.batch_size
        seed = int(context.seed)
        device = next(model.parameters()).device

        ranks = [factorizations[t.name].max_rank for t in targets]
        costs = torch.tensor([float(t.out_features + t.in_features) for t in targets], dtype=torch.float64)
        budget = keep * targets_dense_params(targets)
        s_norm = []
        for t, r in zip(targets, ranks):
            s = factorizations[t.name].s.detach().to(torch.float32)
            s_norm.append((s[:r] / s.max().clamp_min(1e-30)).to(device))
        arange = [torch.arange(r, device=device) for r in ranks]
        n_components = float(sum(ranks))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hyper = HyperNetwork(ranks, self.input_dim, self.hidden).to(device)
        opt = torch.optim.Adam(hyper.parameters(), lr=self.lr)
        start, history = 0, {"keep": [], "keep_sampled": [], "lm_loss": [], "align": [], "prefix": []}
        if self.resume is not None:
            start, history = self._restore(hyper, opt, targets, ranks, seed)

        # Swap in masked factorized modules; the model's own weights stay frozen.
        originals: dict[str, nn.Module] = {}
        masked: list[MaskedFactorized] = []
        with training_only(model, clear_grads=False):  # the model's own weights stay frozen, eval mode (no dropout)
            try:
                for t in targets:
                    orig = model.get_submodule(t.name)
                    f = factorizations[t.name]
                    w_dtype = next(orig.parameters()).dtype
                    mod = MaskedFactorized(
                        f.A.to(device=device, dtype=w_dtype), f.B.to(device=device, dtype=w_dtype),
                        getattr(orig, "bias", None), t.in_features, t.out_features,
                    )
                    originals[t.name] = orig
                    masked.append(mod)
                    replace_module(model, t.name, mod)

                def record(det: list[torch.Tensor], sampled_k: torch.Tensor, lm: float, align: float) -> None:
                    k = torch.tensor([float(m.sum()) for m in det], dtype=torch.float64)
                    history["keep"].append(float((k * costs).sum()) / targets_dense_params(targets))
                    history["keep_sampled"].append(float((sampled_k * costs).sum()) / targets_dense_params(targets))
                    history["lm_loss"].append(lm)
                    history["align"].append(align)
                    history["prefix"].append(prefix_fraction(det))

                bar = tqdm(range(start, self.steps), desc="ars masks", disable=not context.progress, unit="step")
                for step in bar:
                    ids = batch_for_step(windows, batch_size, seed, step).to(device)
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 500_009)
                    logits = hyper()
                    masks = []
                    for o in logits:
                        noise = logistic_noise(o.shape, gen).to(device)
                        masks.append(gumbel_sigmoid_mask(o, self.tau, self.bias, noise)[0])
                    for mod, m in zip(masked, masks):
                        mod.mask = m
                    lm = loss_fn(model, ids)
                    if not torch.isfinite(lm):
                        raise RanklmError(f"ARS: non-finite training loss at step {step}")
                    k = torch.stack([m.sum() for m in masks])
                    cost = (k * costs.to(k)).sum()
                    budget_term = self.lam * torch.log(torch.clamp_min(cost / budget, 1.0))
                    align = sum(
                        (((m - (ar < kk.detach()).to(m)) * s) ** 2).sum() for m, kk, ar, s in zip(masks, k, arange, s_norm)
                    )
                    if self.align_reduction == "mean":
                        align = align / n_components
                    loss = lm + budget_term + self.gamma * align
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        det = [(o.detach() + self.bias > 0).float() for o in logits]
                    record(det, k.detach().double().cpu(), float(lm.detach()), float(align.detach()))
                    bar.set_postfix(
                        loss=f"{float(loss.detach()):.3f}", keep=f"{history['keep'][-1]:.3f}/{keep:.3f}", align=f"{float(align.detach()):.3f}"
                    )
                    if self.save_state is not None and ((step + 1) % self.save_every == 0 or step + 1 == self.steps):
                        write_state_file(self.save_state, *self._state(hyper, opt, step + 1, history, targets, ranks, seed, keep), key="ars")
            finally:
                for name, orig in originals.items():
                    replace_module(model, name, orig)

        with torch.no_grad():
            logits = [o.detach().cpu() for o in hyper()]
        final_masks = [(o + self.bias > 0) for o in logits]
        learned = {t.name: int(m.sum()) for t, m in zip(targets, final_masks)}
        order = {t.name: torch.sort(o + self.bias, descending=True).values.tolist() for t, o in zip(targets, logits)}

        def priority(t: Target, j: int) -> float:
            step_cost = t.out_features + t.in_features
            if j >= max_factored_rank(t) or j >= len(order[t.name]):
                return -1e30 * step_cost  # never prefer going dense over a learned component
            return order[t.name][j] * step_cost  # fit_budget divides by the step cost; undo it

        start_map: RankMap = {
            t.name: max(learned[t.name], min(min_rank, max_factored_rank(t))) for t in targets
        }
        rank_map = fit_budget(targets, start_map, keep, priority, min_rank)

        tensors, meta = self._state(hyper, opt, max(start, self.steps), history, targets, ranks, seed, keep)
        for t, m in zip(targets, final_masks):
            tensors[f"{TENSOR_PREFIX}mask.{t.name}"] = m.to(torch.uint8).contiguous()
        learned_keep = sum(target_cost(t, learned[t.name]) for t in targets) / targets_dense_params(targets)
        meta.update(
            ranks_learned=learned,
            keep_learned=learned_keep,
            prefix_fraction_final=prefix_fraction([m.float() for m in final_masks]),
            tensors=f"{TENSOR_PREFIX}hyper.*, {TENSOR_PREFIX}opt.*, {TENSOR_PREFIX}mask.<target> in allocator.safetensors",
        )
        if not math.isfinite(learned_keep):  # pragma: no cover - defensive
            raise RanklmError("ARS produced a non-finite keep ratio")
        context.artifacts.update(tensors)
        context.artifacts["ars"] = meta
        return rank_map


__all__ = ["ARSAllocator"]
