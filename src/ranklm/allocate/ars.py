"""ARS: Adaptive Rank Selection with a hypernetwork (Gao et al., NAACL 2024; docs/design.md §5).

Works on any base, and runs on the shared training loop (``train/loop.py``) as a
set of hooks. While masks are learned every target is temporarily replaced by a
``MaskedFactorized`` module, ``x -> ((x @ B^T) * m) @ A^T + bias``, with the base's
factors ``A`` (out x r), ``B`` (r x in) (r = the largest rank worth factoring) and
a binary mask ``m`` of length r, i.e. ``U diag(m * s) V`` with the base's transform
undone. All model weights are frozen; only the hypernetwork trains:

* fixed random inputs z (one 32-vector per target, drawn once from the seed, not
  trained) -> bidirectional GRU (hidden 64) over the targets in module order ->
  LayerNorm -> GeLU -> one linear head per target with r_l outputs o_l;
* ``m_l = round(sigmoid((o_l + g + b) / tau))`` with logistic (Gumbel-difference)
  noise g while training, tau = 0.4, b = 3.0 (starts near "keep all"),
  straight-through gradient (forward hard, backward soft);
* loss = the run's objective on the masked model (LM loss for causal LMs, a task
  loss when the run has one, dense-hidden-state distillation for encoders without)
  + a budget term on T(m) = sum_l k_l (out_l + in_l), k_l = sum(m_l)
  + gamma * alignment, ``sum_l ||(m_l - m'_l) * s_l / max(s_l)||^2`` with m'_l the
  first-k_l-ones mask (spectra normalised, so the term does not depend on the base's units).

Deviations from the paper, each with the measurement that led to it (SmolLM2 runs: exploratory
lab runs on the whiten base, 32 x 256 calibration, 16 x 512 held-out evaluation; tiny Llama:
the tests in tests/test_ars.py):

* budget term. The paper's ``lambda * log(max(T, pT*) / pT*)`` pulls with ``lambda / T`` while
  over budget, whatever the target: 100 SmolLM2 steps left the masks at keep ~0.92 for p = 0.6
  and 0.8 alike, so a final fit did the work. A dual-ascent lambda on the log term overshot
  (0.74-0.76 for p = 0.8, 0.41 for p = 0.6); a two-sided quadratic term reached the target.
  Here (``budget_loss="controlled"``, default) the term is ``lambda * w_t * T(m) / pT*``, its
  weight ``w_t`` set after every step by a PI controller on the keep of the noise-free masks
  (``train/budget_control.py``): it grows with the distance to the target and the time spent
  over it, fades when the target is met and turns negative if the masks undershoot. Tiny
  Llama: learned keep within 0.005 of 0.7 and 0.45 in 150 steps. ``budget_loss="log"`` is the
  paper's form, ``"relative"`` a fixed linear+quadratic excess term.
* a target schedule (``schedule=0.6``): the controller steers the masks from keep 1 to the
  request along a cubic schedule over the first 60 % of the steps, then holds (RankDyna's /
  AdaLoRA's budget schedule). Forcing the request from the first step lets the budget term
  dominate every target alike and the allocation ends near uniform (tiny Llama with one
  important layer: rank 13 vs uniform 14 on plain SVD; with the schedule 42, and LM loss
  1.21 vs 1.87).
* monotone logits (``monotone=true``): each target's logits are non-increasing along its
  components (``monotone_logits``), so every learned mask is a top-k prefix by construction.
  With the paper's free per-component logits the alignment term (even summed, gamma = 100)
  ordered only 60-66 % of SmolLM2's 210 masks in 150 steps: components near the rank boundary
  stay out of order under the sampling noise. The alignment term is kept (it is ~0 on prefix
  masks); ``monotone=false`` gives the paper's form, whose alignment test is in the tests.
* learning rate 5e-3 with a cosine decay (paper 1e-3 constant), 100 steps of 2 x 256 tokens
  (the paper trains 4,000 steps on a GPU). 100, not 150: on SmolLM2 (whiten base, 32 x 512
  calibration, 40 x 512 evaluation) 150 steps gave 43.56 / 72.38 at keep 0.8 / 0.6 and 100 steps
  43.63 / 72.10, learned keep 0.8004 / 0.6015, 100 % prefixes both, while the default run fell
  from 24:39 to 10:54 wall (benchmarks/README.md §1). The alignment sum is averaged over targets
  (``align_reduction="target"``; the mean over all ~1e5 components made it vanish).

At the end the deterministic mask (no noise) gives k_l = number of ones ("learned
ranks", their keep ratio is ``keep_learned``); the top k_l components are kept and
``fit_budget`` lands the budget exactly, adding or dropping single components by the
learned logits. The training record (ranklm.json ``training``) reports
``keep_learned`` next to the request, ``keep_after_fit`` and ``prefix_fraction`` (share
of final masks that are top-k prefixes), so a fit that did the work is visible.

Determinism and resume: the hypernetwork and z come from ``seed``; the noise and the
batch of step t come from generators seeded by (seed, t) only, so the loop's state
file (``--state-dir``) resumes to the same rank map as an uninterrupted run.

Memory: the whole model runs forward and backward (activations of one batch), plus the
factors of every target (about the dense size, since r(out+in) ~ out*in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..budget import RankMap, targets_dense_params
from ..decompose.base import Factorization
from ..errors import RanklmError
from ..registry import register_allocator
from ..layers import replace_module
from ..options import Configurable, MethodOptions, opt
from ..targets import Target
from ..train.budget_control import BudgetController, cubic_schedule
from ..train.loop import Hooks
from ..train.masks import HyperNetwork, MaskedFactorized, gumbel_sigmoid_mask, logistic_noise, prefix_fraction
from ..train.objective import Batch, Objective
from . import learned as learned_tail
from .base import LEARNED_KEEP_TOLERANCE, AllocationContext, require_context

TENSOR_PREFIX = "ars."


def monotone_logits(o: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-increasing logits from a head's outputs: ``o_0 + scale * (1 - F_j)``, F the normalised
    cumulative sum of ``softplus(o_1..)``. The first output places the rank, the others shape the
    descent; every noise-free mask is then a top-k prefix. (Normalising keeps one output's change
    from shifting hundreds of components at once, which an unnormalised cumsum did.)"""
    inc = torch.nn.functional.softplus(o[1:]) if len(o) > 1 else o.new_zeros(0)
    f = torch.cumsum(torch.cat([inc[:1] if len(inc) else o.new_ones(1), inc]), 0)
    return o[0] + scale * (1 - f / f[-1])


class ARSHooks(Hooks):
    """The ARS trainer: masked factors in place of the targets, a hypernetwork, budget and alignment terms."""

    name = "ars"

    def __init__(self, allocator: "ARSAllocator", targets: list[Target], factorizations: dict[str, Factorization],
                 keep: float, seed: int, device: torch.device) -> None:
        self.a, self.targets, self.facs, self.keep, self.seed, self.device = allocator, targets, factorizations, keep, seed, device
        self.ranks = [factorizations[t.name].max_rank for t in targets]
        self.costs = torch.tensor([float(t.out_features + t.in_features) for t in targets], dtype=torch.float64)
        self.dense = float(targets_dense_params(targets))
        self.budget = keep * self.dense
        self.s_norm = []
        for t, r in zip(targets, self.ranks):
            s = factorizations[t.name].s.detach().to(torch.float32)
            self.s_norm.append((s[:r] / s.max().clamp_min(1e-30)).to(device))
        self.arange = [torch.arange(r, device=device) for r in self.ranks]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.hyper = HyperNetwork(self.ranks, allocator.input_dim, allocator.hidden).to(device)
        self.masked: list[MaskedFactorized] = []
        self.originals: dict[str, nn.Module] = {}
        self.control = BudgetController(allocator.kp, allocator.ki, allocator.limit)
        self.det_cost = float("nan")

    # -- loop hooks -------------------------------------------------------------
    def begin(self, model: nn.Module) -> None:
        for t in self.targets:
            orig = model.get_submodule(t.name)
            f = self.facs[t.name]
            w_dtype = next(orig.parameters()).dtype
            mod = MaskedFactorized(f.A.to(device=self.device, dtype=w_dtype), f.B.to(device=self.device, dtype=w_dtype),
                                   getattr(orig, "bias", None), t.in_features, t.out_features)
            self.originals[t.name] = orig
            self.masked.append(mod)
            replace_module(model, t.name, mod)

    def end(self, model: nn.Module) -> None:
        for name, orig in self.originals.items():
            replace_module(model, name, orig)
        self.originals.clear()
        self.masked.clear()

    def parameters(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [(f"hyper.{n}", p) for n, p in self.hyper.named_parameters()]

    def fingerprint(self) -> dict[str, Any]:
        return {"options": self.a.options(), "keep": self.keep, "targets": [t.name for t in self.targets],
                "mask_lengths": self.ranks}

    def budget_term(self, cost: torch.Tensor) -> torch.Tensor:
        ratio = cost / self.budget
        if self.a.budget_loss == "controlled":
            return self.a.lam * self.control.weight * ratio
        if self.a.budget_loss == "log":
            return self.a.lam * torch.log(torch.clamp_min(ratio, 1.0))
        excess = torch.clamp_min(ratio - 1.0, 0.0)
        return self.a.lam * (excess + excess.square() / (2 * self.a.margin))

    def alignment(self, masks: list[torch.Tensor], k: torch.Tensor) -> torch.Tensor:
        align = sum(((m - (ar < kk.detach()).to(m)) * s).square().sum()
                    for m, kk, ar, s in zip(masks, k, self.arange, self.s_norm))
        if self.a.align_reduction == "mean":
            return align / float(sum(self.ranks))
        if self.a.align_reduction == "target":
            return align / len(self.targets)
        return align

    def logits(self) -> list[torch.Tensor]:
        """The hypernetwork's per-target logits; with ``monotone`` each target's are non-increasing."""
        raw = self.hyper()
        if not self.a.monotone:
            return raw
        return [monotone_logits(o, self.a.monotone_scale) for o in raw]

    def loss(self, model: nn.Module, objective: Objective, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 500_009)
        logits = self.logits()
        masks = []
        for o in logits:
            noise = logistic_noise(o.shape, gen).to(self.device)
            masks.append(gumbel_sigmoid_mask(o, self.a.tau, self.a.bias, noise)[0])
        for mod, m in zip(self.masked, masks):
            mod.mask = m
        task = objective.loss(model, batch)
        k = torch.stack([m.sum() for m in masks])
        cost = (k * self.costs.to(k)).sum()
        budget = self.budget_term(cost)
        align = self.alignment(masks, k)
        with torch.no_grad():
            det = [(o.detach() + self.a.bias > 0).float() for o in logits]
            kd = torch.tensor([float(m.sum()) for m in det], dtype=torch.float64)
            self.det_cost = float((kd * self.costs).sum())
        logs = {
            "loss": float(task.detach()),
            "keep": float((kd * self.costs).sum()) / self.dense,
            "keep_sampled": float(cost.detach()) / self.dense,
            "align": float(align.detach()),
            "prefix": prefix_fraction(det),
            "budget": float(budget.detach()),
            "budget_weight": self.control.weight,
        }
        return task + budget + self.a.gamma * align, logs

    def target_keep(self, step: int) -> float:
        """The keep the masks are steered to after ``step``: down from 1 along a cubic schedule over
        the first ``schedule`` fraction of the steps, then the target (docs: why a schedule)."""
        return cubic_schedule(step + 1, 1.0, self.keep, 0, self.a.schedule * self.a.steps)

    def after_step(self, model: nn.Module, step: int, logs: dict[str, float]) -> None:
        # the masks as they would be installed (deterministic) steer the budget weight
        with torch.no_grad():
            kd = torch.tensor([float((o + self.a.bias > 0).sum()) for o in self.logits()], dtype=torch.float64)
        self.control.update(float((kd * self.costs).sum()), self.target_keep(step) * self.dense)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"control": self.control.state()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "control" in tensors:
            self.control.load(tensors["control"])

    # -- after training -----------------------------------------------------------
    @torch.no_grad()
    def final_logits(self) -> list[torch.Tensor]:
        return [o.detach().cpu() for o in self.logits()]


@dataclass(frozen=True)
class ARSOptions(MethodOptions):
    steps: int = opt(100, "mask-learning steps")
    lr: float = opt(5e-3, "Adam learning rate of the hypernetwork (paper: 1e-3)")
    batch_size: int = opt(2, "windows per step")
    train_seq_len: int | None = opt(256, "train on the first N tokens of each calibration window (null = all)")
    tau: float = opt(0.4, "Gumbel-sigmoid temperature")
    bias: float = opt(3.0, "logit bias b (3 starts near keep-all)")
    lam: float = opt(16.0, "budget-term weight lambda")
    gamma: float = opt(10.0, "alignment-term weight gamma")
    budget_loss: str = opt("controlled", "budget term: controlled (weight from a PI controller on the learned keep), "
                           "relative (pull grows with the excess) or log (paper)", choices=("controlled", "relative", "log"))
    schedule: float = opt(0.6, "controlled budget: the target keep falls from 1 to the request along a cubic "
                          "schedule over this fraction of the steps (0 = the request from the start)")
    kp: float = opt(20.0, "controlled budget: proportional gain")
    ki: float = opt(0.2, "controlled budget: integral gain")
    limit: float = opt(100.0, "controlled budget: bound on the weight")
    margin: float = opt(0.05, "relative budget term: excess at which the quadratic part equals the linear one")
    align_reduction: str = opt("target", "alignment: sum per target averaged over targets, mean over all components, "
                               "or sum", choices=("target", "mean", "sum"))
    monotone: bool = opt(True, "non-increasing logits per target (every learned mask a top-k prefix)")
    monotone_scale: float = opt(20.0, "monotone: logit drop from the first to the last component")
    lr_schedule: str = opt("cosine", "learning-rate schedule", choices=("cosine", "constant"))
    input_dim: int = opt(32, "hypernetwork input size")
    hidden: int = opt(64, "hypernetwork GRU hidden size")
    loss_fn: Any = opt(None, "an Objective or loss_fn(model, ids) [the run's objective]", python_only=True)
    state_file: Any = opt(None, "save the training state here (the pipeline uses --state-dir)", python_only=True)
    resume: bool = opt(False, "continue from state_file", python_only=True)
    save_every: int = opt(50, "steps between state saves", python_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 0:
            raise RanklmError("ARS steps must be >= 0")
        if not (self.tau > 0 and self.lr > 0 and self.lam >= 0 and self.gamma >= 0 and self.margin > 0):
            raise RanklmError("ARS needs tau > 0, lr > 0, lam >= 0, gamma >= 0, margin > 0")
        if self.batch_size < 1:
            raise RanklmError("ARS batch_size must be a positive integer")
        if self.budget_loss not in ("controlled", "relative", "log"):
            raise RanklmError("ARS budget_loss must be 'controlled', 'relative' or 'log'")
        if self.align_reduction not in ("target", "mean", "sum"):
            raise RanklmError("ARS align_reduction must be 'target', 'mean' or 'sum'")
        if not 0.0 <= self.schedule < 1.0:
            raise RanklmError("ARS schedule must lie in [0, 1)")


@register_allocator("ars")
class ARSAllocator(Configurable):
    """Learned binary masks from a Bi-GRU hypernetwork (see the module docstring)."""

    name = "ars"
    needs_context = True
    needs_spectra = True
    needs_training = True  # trains on the loop (resumable with --state-dir)
    default_calib_windows = 32  # training dominates the run; 32 x 512 calibration is the protocol it was measured with
    Options = ARSOptions

    def __init__(self, options: ARSOptions | None = None, /, **given: Any) -> None:
        super().__init__(options, **given)
        self.save_every = max(1, self.save_every)

    def allocate(
        self,
        targets: list[Target],
        factorizations: dict[str, Factorization],
        keep: float,
        min_rank: int = 1,
        context: AllocationContext | None = None,
    ) -> RankMap:
        context = require_context(context, self.name)
        seed = int(context.seed)
        # The objective is built on the dense model (a distillation teacher needs it) before masks go in.
        objective = learned_tail.objective(self.loss_fn, context, self.train_seq_len)
        hooks = ARSHooks(self, targets, factorizations, keep, seed, next(context.model.parameters()).device)
        result = learned_tail.train(context, self.name, hooks, objective, steps=self.steps, lr=self.lr,
                                    batch_size=self.batch_size, desc="ars masks", state_file=self.state_file,
                                    resume=self.resume, save_every=self.save_every, lr_schedule=self.lr_schedule)

        logits = hooks.final_logits()
        final_masks = [(o + self.bias > 0) for o in logits]
        learned = {t.name: int(m.sum()) for t, m in zip(targets, final_masks)}
        order = {t.name: torch.sort(o + self.bias, descending=True).values.tolist() for t, o in zip(targets, logits)}
        prefix = prefix_fraction([m.float() for m in final_masks])

        def export(rank_map: RankMap, learned_keep: float) -> None:
            tensors = {f"{TENSOR_PREFIX}hyper.{k}": v.detach().cpu().clone().contiguous()
                       for k, v in hooks.hyper.state_dict().items()}
            for t, m in zip(targets, final_masks):
                tensors[f"{TENSOR_PREFIX}mask.{t.name}"] = m.to(torch.uint8).contiguous()
            context.artifacts.update(tensors)
            context.artifacts["ars"] = {
                "step": self.steps, "seed": seed, "keep": keep, "options": self.options(), "history": result.history,
                "targets": [t.name for t in targets], "mask_lengths": hooks.ranks, "ranks_learned": learned,
                "keep_learned": learned_keep, "prefix_fraction_final": prefix,
                "tensors": f"{TENSOR_PREFIX}hyper.*, {TENSOR_PREFIX}mask.<target> in allocator.safetensors",
            }

        # the learned logits order the single components the exact fit adds or drops
        return learned_tail.conclude(context, self.name, "allocate", self.options(), objective, result, targets, keep,
                                     min_rank, learned, order, export, prefix_fraction=prefix)


__all__ = ["ARSAllocator", "ARSHooks", "LEARNED_KEEP_TOLERANCE"]
