"""SoftLMs: learnable soft thresholds on singular values, trained to the budget (docs/design.md §5).

Bhatnagar, Wen, Kang, "SoftLMs: Efficient Adaptive Low-Rank Approximation of Language
Models using Soft-Thresholding Mechanism". Works on any base and runs on the shared
training loop. Every target is replaced, while training, by a
``SoftThresholdFactorized`` module ``U diag(s * g(s; alpha, kappa)) V`` initialised from the
base's factorization (the base's ``A = U sqrt(s)``, ``B = sqrt(s) V`` split back into U, s, V,
so thresholding acts on the base's own spectrum: whitened for ``whiten``):

* trainable: U, s, V of every target (learning rate ``lr`` relative to each tensor's initial
  RMS, so factors of any scale move by the same fraction), and one threshold ``alpha`` per
  target on the normalised spectrum ``s / s_max`` (learning rate ``alpha_lr``);
* gate: the shifted tanh ``1/2 (1 + tanh(kappa (s/s_max - alpha)))``; ``gate="hard"``
  (default) forwards the hard threshold and back-propagates the soft gate's gradient
  (straight-through), ``gate="soft"`` forwards the soft gate. Hard is the default because
  training then sees exactly the model that is installed (the soft forward also passes the
  components just below the threshold, which the installed model drops) and because it learns
  the budget. Measured on SmolLM2, keep 0.5, in a reduced setting (50 steps, 8 x 512
  calibration, 8 x 512 evaluation; ``benchmarks/results/softlm-gate/``): hard 273.3 perplexity
  with learned keep 0.512; soft 218.7 but learned keep 0.576 -- the budget was not reached and
  the exact fit then cut 7.6 % of the parameters the training never saw removed. The soft
  forward's better perplexity there makes a soft-to-hard schedule (``kappa_final``) worth
  measuring;
* sharpness ``kappa`` with an optional linear hardening schedule to ``kappa_final``;
* ``L_acmp`` (adaptive compression loss; *inferred* form): ``c_t * P_soft / P*``, with
  ``P_soft = sum_l (m_l + n_l) sum_i h_li`` the differentiable parameter count and ``P*`` the
  budget. Its weight ``c_t`` follows the *hard* count ``P = sum_l cost(#{s_norm > alpha})``
  through ``train/budget_control.BudgetController`` (proportional gain ``acmp_p``, integral
  gain ``acmp_eta``): it grows while the budget is violated, fades once it is met, and turns
  negative (gives rank back) if the count stays under it, so training lands on the target
  instead of overshooting it (measured on a tiny Llama: within 0.002; a weight that only
  decays once met missed by 0.08, a purely integral one oscillated by +-0.1);
* task loss: distillation or the run's objective. ``distill`` trains on
  ``(1 - w) LM + w KL(dense || compressed)`` (``w`` = ``distill_weight``, default 1) on the
  next-token distributions, the teacher being the same model run with its original modules
  (no copy of the model). Default (``distill=null``): on for a causal LM on the default LM
  objective, off when the run has a task objective or a ``loss_fn`` (the run's objective is
  then the loss). Why on: 150 steps of 1 x 256 tokens give the trained factors far more signal
  from the dense model's full distributions than from one label per token -- measured on
  SmolLM2, keep 0.5, 32 x 512 calibration, 40 x 512 evaluation: **59.07** perplexity with
  distillation against 137.93 with the LM loss (dense 23.22; ``benchmarks/README.md`` §3),
  at ~1.3x the step time (the teacher's forward).

Initial thresholds (*inferred*; the paper starts from the full model with many more GPU
steps): ``init_keep`` (default: the target) sets each ``alpha`` at the uniform rank of that
keep ratio, so training starts at the budget and redistributes rank between targets instead of
spending the CPU-sized step budget on reaching it.

At the end: rank = number of singular values above ``alpha`` per target (``keep_learned``);
``fit_budget`` lands the budget exactly (adding/dropping single components by their
normalised singular value); the *trained* factors of the kept components are handed to the
pipeline (``context.trained_factors``), which installs them as plain ``LowRankLinear`` layers.
ranklm.json gets ``artifacts.softlm`` (alpha, kappa, rank per target, the alpha trajectory)
and the training record (``keep_learned``, ``keep_after_fit``, final loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..budget import RankMap, max_factored_rank, target_cost, targets_dense_params
from ..decompose.base import Factorization
from ..errors import RanklmError
from ..layers import replace_module
from ..options import Configurable, MethodOptions, opt
from ..targets import Target
from ..train.budget_control import BudgetController
from ..train.logit_distill import full_kl, next_token_nll
from ..train.loop import Hooks
from ..train.objective import Batch, Objective, is_causal_lm
from ..train.soft_threshold import SoftThresholdFactorized
from . import learned as learned_tail
from .base import AllocationContext, require_context
from ..registry import register_allocator



def _uniform_rank(t: Target, keep: float) -> int:
    return min(int(keep * t.dense_params // (t.out_features + t.in_features)), max_factored_rank(t))


class SoftLMHooks(Hooks):
    """The SoftLMs trainer on the shared loop."""

    name = "softlm"

    def __init__(self, a: "SoftLMAllocator", targets: list[Target], facs: dict[str, Factorization], keep: float,
                 device: torch.device, steps: int) -> None:
        self.a, self.targets, self.facs, self.keep, self.device, self.steps = a, targets, facs, keep, device, steps
        self.budget = keep * targets_dense_params(targets)
        self.costs = {t.name: t.out_features + t.in_features for t in targets}
        self.mods: dict[str, SoftThresholdFactorized] = {}
        self.originals: dict[str, nn.Module] = {}
        self.control = BudgetController(a.acmp_p, a.acmp_eta, a.acmp_max, a.acmp_init)
        self.scales: dict[str, float] = {}
        self.trajectory: dict[str, list[float]] = {t.name: [] for t in targets}
        self.rank_trajectory: dict[str, list[int]] = {t.name: [] for t in targets}
        self.steps_axis: list[int] = []
        self.distill = bool(a.distill)  # the resolved choice (allocate() sets it)

    def begin(self, model: nn.Module) -> None:
        init_keep = self.a.init_keep if self.a.init_keep is not None else self.keep
        for t in self.targets:
            f = self.facs[t.name]
            orig = model.get_submodule(t.name)
            dtype = next(orig.parameters()).dtype
            r = f.max_rank
            s = f.s[:r].to(device=self.device, dtype=torch.float32).clamp_min(1e-12)
            root = s.sqrt()
            u = (f.A.to(self.device, torch.float32) / root).to(dtype)
            v = (f.B.to(self.device, torch.float32) / root[:, None]).to(dtype)
            s_norm = s / s.max()
            k = _uniform_rank(t, init_keep)
            alpha = 1.0 + 1e-3 if k <= 0 else (float(s_norm[k - 1] + s_norm[k]) / 2 if k < r else float(s_norm[-1]) / 2)
            mod = SoftThresholdFactorized(orig, u, s.to(dtype), v, alpha, t.in_features, t.out_features)
            mod.hard = self.a.gate == "hard"
            mod.kappa = self.a.kappa
            self.originals[t.name] = orig
            self.mods[t.name] = mod
            for pn, p in (("U", mod.U), ("V", mod.V), ("s", mod.s)):
                self.scales[f"{t.name}.{pn}"] = float(p.detach().float().square().mean().sqrt().clamp_min(1e-12))
            replace_module(model, t.name, mod)

    def end(self, model: nn.Module) -> None:
        for name, orig in self.originals.items():
            replace_module(model, name, orig)

    def parameters(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, m in self.mods.items():
            out += [(f"{name}.U", m.U), (f"{name}.s", m.s), (f"{name}.V", m.V), (f"{name}.alpha", m.alpha)]
        return out

    def lr_scale(self, name: str) -> float:
        if name.endswith(".alpha"):
            return self.a.alpha_lr / self.a.lr
        return self.scales[name]

    def fingerprint(self) -> dict[str, Any]:
        return {"options": self.a.options(), "keep": self.keep, "targets": [t.name for t in self.targets]}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"c": self.control.state()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "c" in tensors:
            self.control.load(tensors["c"])

    def hard_cost(self) -> float:
        return float(sum(target_cost(t, self.mods[t.name].hard_rank()) for t in self.targets))

    def _set_kappa(self, step: int) -> None:
        if self.a.kappa_final is None or self.steps <= 1:
            return
        frac = min(1.0, step / (self.steps - 1))
        kappa = self.a.kappa + (self.a.kappa_final - self.a.kappa) * frac
        for m in self.mods.values():
            m.kappa = kappa

    def loss(self, model: nn.Module, objective: Objective, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        self._set_kappa(step)
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in batch.items()}
        logs: dict[str, float] = {}
        if self.distill:
            with torch.no_grad():
                for m in self.mods.values():
                    m.dense = True
                try:
                    teacher = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False).logits
                finally:
                    for m in self.mods.values():
                        m.dense = False
            out = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False)
            labels = b.get("labels", b["input_ids"])
            task = next_token_nll(out.logits, labels)
            kl = full_kl(out.logits, teacher)
            logs["distill"] = float(kl.detach())
            main = (1.0 - self.a.distill_weight) * task + self.a.distill_weight * kl
        else:
            task = objective.loss(model, b)
            main = task
        p_soft = sum(self.costs[n] * m.soft_rank() for n, m in self.mods.items())
        acmp = self.control.weight * p_soft / self.budget
        logs.update({"loss": float(task.detach()), "acmp": float(acmp.detach()),
                     "keep": self.hard_cost() / targets_dense_params(self.targets), "c": self.control.weight})
        return main + acmp, logs

    def after_step(self, model: nn.Module, step: int, logs: dict[str, float]) -> None:
        self.control.update(self.hard_cost(), self.budget)
        with torch.no_grad():
            for m in self.mods.values():
                m.alpha.clamp_(0.0, 1.0 + 1e-3)
        if step % max(1, self.steps // 50) == 0 or step == self.steps - 1:
            for n, m in self.mods.items():
                self.trajectory[n].append(float(m.alpha.detach()))
                self.rank_trajectory[n].append(m.hard_rank())
            self.steps_axis.append(step)


@dataclass(frozen=True)
class SoftLMOptions(MethodOptions):
    steps: int = opt(150, "training steps")
    lr: float = opt(2e-3, "learning rate of U, s, V relative to each tensor's initial RMS")
    alpha_lr: float = opt(5e-3, "learning rate of the thresholds (on s/s_max)")
    batch_size: int = opt(1, "windows per step")
    train_seq_len: int | None = opt(256, "train on the first N tokens of each calibration window (null = all)")
    kappa: float = opt(10.0, "sharpness of the shifted-tanh gate")
    kappa_final: float | None = opt(None, "harden linearly to this sharpness by the last step [no schedule]")
    gate: str = opt("hard", "forward the hard threshold with the soft gate's gradient, or the soft gate",
                    choices=("hard", "soft"))
    init_keep: float | None = opt(None, "keep ratio the initial thresholds give (uniform ranks) [the target]")
    acmp_init: float = opt(0.0, "initial weight c of the adaptive compression loss")
    acmp_eta: float = opt(0.2, "integral gain: step of c per unit of relative excess of the hard parameter count")
    acmp_p: float = opt(20.0, "proportional gain: c also holds acmp_p x the current relative excess")
    acmp_max: float = opt(100.0, "bound on |c|")
    lr_schedule: str = opt("cosine", "learning-rate schedule of every trained tensor", choices=("cosine", "constant"))
    factors: str = opt("trained", "what gets installed at the learned ranks: the trained factors, or the base's "
                       "block-by-block refit (the thresholds only choose ranks; the trained U, s, V are discarded)",
                       choices=("trained", "refit"))
    distill: bool | None = opt(None, "train on KL(dense || compressed) of next-token distributions (causal LMs) "
                               "[null = on for a causal LM trained on the default LM objective, off with a task "
                               "objective or loss_fn]")
    distill_weight: float = opt(1.0, "with distill: loss = (1 - w) LM + w KL (1 = the dense model's distributions "
                                "replace the labels)")
    loss_fn: Any = opt(None, "an Objective or loss_fn(model, ids) [the run's objective]", python_only=True)
    state_file: Any = opt(None, "save the training state here (the pipeline uses --state-dir)", python_only=True)
    resume: bool = opt(False, "continue from state_file", python_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.distill_weight <= 1.0:
            raise RanklmError("softlm distill_weight must lie in [0, 1]")
        if self.steps < 0 or self.lr <= 0 or self.alpha_lr <= 0 or self.batch_size < 1 or self.kappa <= 0:
            raise RanklmError("softlm needs steps >= 0, lr > 0, alpha_lr > 0, batch_size >= 1, kappa > 0")
        if not (self.acmp_eta > 0 and self.acmp_max > 0):
            raise RanklmError("softlm needs acmp_eta > 0 and acmp_max > 0")
        if self.factors not in ("trained", "refit"):
            raise RanklmError("softlm factors must be 'trained' or 'refit'")
        if self.init_keep is not None and not 0 < self.init_keep <= 1:
            raise RanklmError("softlm init_keep must lie in (0, 1]")


@register_allocator("softlm")
class SoftLMAllocator(Configurable):
    """``--allocator softlm`` (see the module docstring)."""

    name = "softlm"
    needs_context = True
    needs_spectra = True
    needs_training = True
    default_calib_windows = 32  # training dominates the run; 32 x 512 calibration is the protocol it was measured with
    Options = SoftLMOptions

    def allocate(self, targets: list[Target], factorizations: dict[str, Factorization], keep: float, min_rank: int = 1,
                 context: AllocationContext | None = None) -> RankMap:
        context = require_context(context, self.name)
        model = context.model
        if self.distill and not is_causal_lm(model):
            raise RanklmError("softlm distill=true distils next-token distributions: it needs a causal LM")
        # the default: distil a causal LM on the run's own LM objective (measured on SmolLM2 at keep 0.5: 59.07
        # perplexity against 137.93 with the LM loss alone); a task objective or loss_fn is the user's choice
        distill = self.distill if self.distill is not None else (
            is_causal_lm(model) and self.loss_fn is None and context.objective is None)
        objective = learned_tail.objective(self.loss_fn, context, self.train_seq_len)
        hooks = SoftLMHooks(self, targets, factorizations, keep, next(model.parameters()).device, self.steps)
        hooks.distill = bool(distill)
        result = learned_tail.train(context, self.name, hooks, objective, steps=self.steps, lr=self.lr,
                                    batch_size=self.batch_size, desc="softlm thresholds", state_file=self.state_file,
                                    resume=self.resume, lr_schedule=self.lr_schedule)

        order = {n: m.order() for n, m in hooks.mods.items()}
        learned = {t.name: hooks.mods[t.name].hard_rank() for t in targets}
        # the fit adds or drops single components by their normalised singular value
        values = {n: m.s_norm[order[n]].tolist() for n, m in hooks.mods.items()}

        def export(rank_map: RankMap, learned_keep: float) -> None:
            if self.factors == "trained":
                context.trained_factors = {
                    t.name: tuple(f.detach().clone() for f in hooks.mods[t.name].export_factors(order[t.name][: int(r)]))
                    for t in targets if (r := rank_map[t.name]) != "dense"
                }
            # a target the fit leaves dense keeps its original weight (the factors cover only r_max components);
            # factors="refit" leaves trained_factors unset: the pipeline refits the base at rank_map as for any allocator
            steps_axis = hooks.steps_axis
            context.artifacts["softlm"] = {
                "options": self.options(), "distill": hooks.distill, "history": result.history,
                "alpha": {n: float(m.alpha.detach()) for n, m in hooks.mods.items()},
                "kappa": next(iter(hooks.mods.values())).kappa if hooks.mods else self.kappa,
                "ranks_learned": learned, "keep_learned": learned_keep,
                "trajectory": {"steps": steps_axis, "series": hooks.trajectory, "ylabel": "threshold alpha (on s / s_max)",
                               "title": "SoftLMs thresholds over training"},
            }
            context.artifacts["softlm-ranks"] = {
                "trajectory": {"steps": steps_axis, "series": hooks.rank_trajectory, "ylabel": "rank (hard threshold)",
                               "title": "SoftLMs ranks over training"},
            }
            for n, m in hooks.mods.items():
                context.artifacts[f"softlm.alpha.{n}"] = m.alpha.detach().reshape(1).cpu().clone()

        return learned_tail.conclude(context, self.name, "allocate", self.options(), objective, result, targets, keep,
                                     min_rank, learned, values, export)


__all__ = ["SoftLMAllocator", "SoftLMHooks"]
