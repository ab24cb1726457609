"""The memory preflight: estimate a run's peak from the shapes before any statistic, and pick or refuse a mode.

Why: the whole-model kfac run holds every target's input Gram, output-gradient Gram and factorization at
once (a Qwen2.5-0.5B-shaped model peaked at 13.0 GiB; a 1 B model needs more than this 24 GiB machine), and
Linux answers an allocation that does not fit with the OOM killer, not an exception: without an estimate a
user finds out by being killed. The estimate adds what each statistic stores (``gram`` in², ``out_gram``
out² or out past ``DENSE_OUT_MAX``, ``fisher`` m·n float32, ...; float64 sums, one per distinct input: q/k/v
and gate/up share theirs), the factors (``r·(m+n)`` float32 at the largest factored rank r), the largest
single factorization's working set, one backward pass (logits and saved activations of a batch) and, block
by block, the calibration activations at one layer. It is an estimate (labelled so in the messages):
conservative terms where the exact size depends on LAPACK or the attention kernel.

Modes (``--memory-mode``): ``whole`` (every target at once), ``bounded`` (``pipeline.bounded``: the same
result, one block at a time), ``auto`` (bounded wherever it applies, said in one log line with both
estimates; whole-model otherwise). Why bounded by default rather than "whole when it fits": the results are
identical, it costs one extra forward pass of each block and a write of the factors (measured in
benchmarks/README.md), and "fits" on a shared machine is a guess the OOM killer settles. A mode that does not
fit (estimate > 75 % of the available memory: see HEADROOM) is one ``RanklmError`` line with the estimate and what to do;
so is an out-of-memory error while collecting statistics (``out_of_memory_as_error``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..budget import max_factored_rank
from ..calibration import get_statistic
from ..errors import RanklmError
from ..resources import available_memory, device_free_memory, gib
from ..targets import Target

log = logging.getLogger("ranklm")

MODES = ("auto", "bounded", "whole")
# A mode fits when its estimate is at most this fraction of the available memory. Measured on the Llama-3.2-1B
# shape (bounded, 8 windows): the resident growth beyond the model and the process was 1.12x the estimate after
# the backward pass and 1.18x in the first block (freed activations kept by the allocator); 0.75 = 0.9 / 1.2.
HEADROOM = 0.75
F64, F32 = 8, 4
# Targets whose inputs are the very same tensor (one Gram each group): the collector detects this at run time
# (collect.Collector); the estimate knows it by name and counts any other target on its own (conservative).
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
                 ("w1", "w3"), ("wq", "wk", "wv"))


def _input_group(t: Target) -> str:
    parent, _, leaf = t.name.rpartition(".")
    for group in SHARED_INPUTS:
        if leaf in group:
            return f"{parent}.{'+'.join(group)}"
    return t.name


def statistics_bytes(targets: list[Target], needs: set[str]) -> dict[str, int]:
    """Bytes each target's statistics keep (shared inputs counted once, on the first target of the group)."""
    seen: set[str] = set()
    out: dict[str, int] = {}
    dense_max = None
    if "out_gram" in needs:
        from ..calibration.gradients import DENSE_OUT_MAX

        dense_max = get_statistic("out_gram").dense_max or DENSE_OUT_MAX
    for t in targets:
        m, n, total = t.out_features, t.in_features, 0
        group = _input_group(t)
        first = group not in seen
        seen.add(group)
        if first:
            total += F64 * n * n * ("gram" in needs) + F64 * n * ("abs_mean" in needs)
        total += F64 * m * m * ("out_cov" in needs) + F32 * m * n * ("fisher" in needs)
        if "out_gram" in needs:
            total += F64 * (m * m if m <= int(dense_max) else m)
        out[t.name] = total
    return out


def gradient_bytes(targets: list[Target], needs: set[str]) -> dict[str, int]:
    """The part of ``statistics_bytes`` that gradient statistics keep (held for the whole run)."""
    from .bounded import GRADIENT_NEEDS

    return statistics_bytes(targets, set(needs) & set(GRADIENT_NEEDS))


def factor_bytes(t: Target) -> int:
    """A ``Factorization`` in float32 at the largest factored rank: A (m x r), B (r x n), s."""
    m, n = t.out_features, t.in_features
    return F32 * (max_factored_rank(t) * (m + n) + min(m, n))


def decompose_bytes(t: Target) -> int:
    """Working set of one two-sided factorization (kfac, the largest base): both Gram factors and a working
    copy of the larger, W and M = L_G^T W L_A in float64, the SVD's outputs and LAPACK workspace."""
    m, n = t.out_features, t.in_features
    k = min(m, n)
    return F64 * (2 * n * n + 2 * m * m + 4 * m * n + 5 * k * k)


def backward_bytes(model: nn.Module, batch: int, seq_len: int) -> int:
    """One backward pass of the LM loss on ``batch`` windows: float32 logits (three copies: logits, their
    log-softmax, its gradient) and every layer's saved activations in the model's dtype (per token: about
    8 hidden-sized tensors for norms, attention and residuals, 4 MLP-sized ones for gate, up, act, product)."""
    cfg = getattr(model, "config", None)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 1024)
    inter = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "ffn_dim", 0) or getattr(cfg, "n_inner", 0) or 4 * hidden)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 1)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    act = next(model.parameters()).element_size()
    tokens = batch * seq_len
    return 3 * F32 * tokens * vocab + act * tokens * layers * (8 * hidden + 4 * inter)


BACKWARD_BUDGET = 4 * 2**30  # estimated bytes one backward pass of gradient statistics may take (see below)
GRADIENT_PASS_BUDGET = 6 * 2**30  # estimated model + gradient statistics + one backward pass (see below)


def gradient_batch_size(model: nn.Module, batch_size: int, seq_len: int, budget: int = BACKWARD_BUDGET,
                        held: int = 0, pass_budget: int = GRADIENT_PASS_BUDGET) -> int:
    """Windows per backward pass of gradient statistics: the largest ``<= batch_size`` whose estimated backward
    (``backward_bytes``) stays within ``budget`` and, with ``held`` (the model and the gradient statistics that
    the pass keeps: ``gradient_pass_held``), within ``pass_budget``; at least 1.

    Why: the backward's activations and logits grow with the batch and, unlike the statistics, are not
    bounded by the block-by-block mode. Measured on a Llama-3.2-1B shape in bf16: peak 9.0 GiB at 4 windows
    per backward, 7.9-8.0 GiB at 3 (the 4 GiB backward budget alone), which set the whole run's peak. The
    second budget counts what the pass holds besides the backward (model 2.0 GiB + output Grams 1.6 GiB
    there): 6 GiB gives the 1 B shape 2 windows per backward and keeps SmolLM2-135M's 4 (estimated 5.4 GiB:
    its numbers unchanged). Results depend on the batch only through the float32 rounding of each batch's
    products; both memory modes compute the same ``held``, so they use the same batches.
    """
    b = max(int(batch_size), 1)
    while b > 1 and (backward_bytes(model, b, seq_len) > budget
                     or held + backward_bytes(model, b, seq_len) > pass_budget):
        b -= 1
    return b


def gradient_pass_held(model: nn.Module, targets: list[Target], needs: set[str] | frozenset[str]) -> int:
    """What a gradient pass holds besides its backward: the model and every target's gradient statistics."""
    return model_bytes(model) + sum(gradient_bytes(targets, set(needs)).values())


def activation_cache_bytes(model: nn.Module, windows: int, seq_len: int) -> int:
    """Block-by-block runs: one layer's inputs and the next layer's, for every calibration window."""
    cfg = getattr(model, "config", None)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 1024)
    return 2 * windows * seq_len * hidden * next(model.parameters()).element_size()


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


@dataclass
class Estimate:
    """Peak memory of one mode beyond the loaded model (``extra``), its parts, and the disk it spills."""

    mode: str
    extra: int
    parts: dict[str, int] = field(default_factory=dict)
    spill: int = 0

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "extra_gib": round(self.extra / 2**30, 3), "spill_gib": round(self.spill / 2**30, 3),
                **{f"{k}_gib": round(v / 2**30, 3) for k, v in self.parts.items()}}


def estimate(mode: str, model: nn.Module, targets: list[Target], needs: set[str], windows: int, seq_len: int,
             batch_size: int, fisher_windows: int, sequential: bool = False) -> Estimate:
    """Peak beyond the model for ``mode`` (``whole``, ``bounded``; ``sequential``: activation bases block by block)."""
    from .bounded import GRADIENT_NEEDS

    stats = statistics_bytes(targets, needs)
    grads = gradient_bytes(targets, needs)
    facs = sum(factor_bytes(t) for t in targets)
    work = max((decompose_bytes(t) for t in targets), default=0)
    has_grad = bool(set(needs) & set(GRADIENT_NEEDS))
    grad_batch = gradient_batch_size(model, min(batch_size, fisher_windows), seq_len,
                                     held=gradient_pass_held(model, targets, needs))
    backward = backward_bytes(model, grad_batch, seq_len) if has_grad else 0
    blocks: dict[int, list[Target]] = {}
    for t in targets:
        blocks.setdefault(t.block, []).append(t)
    one_block = max((sum(stats[t.name] - grads[t.name] + factor_bytes(t) for t in ts) for ts in blocks.values()),
                    default=0)
    cache = activation_cache_bytes(model, windows, seq_len)
    all_grads = sum(grads.values())
    if mode == "whole":
        parts = {"statistics": sum(stats.values()), "factors": facs, "factorization": work, "backward": backward}
        peak = max(parts["statistics"] + facs + work, parts["statistics"] + backward)
        return Estimate(mode, peak, parts)
    if mode == "bounded":
        parts = {"gradient_statistics": all_grads, "activation_cache": cache, "block": one_block,
                 "factorization": work, "backward": backward}
        peak = max(all_grads + backward, all_grads + cache + one_block + work)
        return Estimate(mode, peak, parts, spill=facs)
    if sequential:  # activation bases, block by block: all factorizations kept for the allocator
        parts = {"activation_cache": cache, "block": one_block, "factors": facs, "factorization": work}
        return Estimate("sequential", cache + one_block + facs + work, parts)
    raise ValueError(f"unknown memory mode {mode!r}")


def _advice(mode: str, bounded_ok: bool) -> str:
    tips = ["fewer --calib-windows or --fisher-windows", "--batch-size 1", "--device-map auto (offload)"]
    if mode == "whole" and bounded_ok:
        tips.insert(0, "--memory-mode bounded (the same result, one block at a time)")
    return "try " + ", ".join(tips)


@dataclass
class MemoryChoice:
    """The mode chosen by the preflight and what it estimated (recorded in ranklm.json as artifacts.memory)."""

    bounded: bool
    estimate: Estimate | None
    available: int | None
    source: str
    note: str = ""

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": "bounded" if self.bounded else "whole", "available_source": self.source}
        if self.available is not None:
            out["available_gib"] = round(self.available / 2**30, 3)
        if self.estimate is not None:
            out["estimate"] = self.estimate.record()
        if self.note:
            out["note"] = self.note
        return out


def choose_mode(requested: str, model: nn.Module, targets: list[Target], base: Any, allocator: Any, windows: int,
                seq_len: int, batch_size: int, fisher_windows: int, sequential: bool = False) -> MemoryChoice:
    """The statistics mode for this run (module docstring), or one ``RanklmError`` line when it cannot fit."""
    from .bounded import can_bound

    needs = set(base.needs)
    bounded_ok = can_bound(base, allocator) and not sequential
    if requested == "bounded" and not bounded_ok:
        raise RanklmError(f"--memory-mode bounded needs a base with activation statistics and an allocator that reads "
                          f"only spectra (kfac or whiten with global, uniform, energy or loss); {base.name} with "
                          f"{getattr(allocator, 'name', allocator)} runs whole-model: drop --memory-mode bounded")
    available, source = available_memory()
    device = next(model.parameters()).device
    if not needs:
        return MemoryChoice(False, None, available, source)
    if sequential:
        est = estimate("whole", model, targets, needs, windows, seq_len, batch_size, fisher_windows, sequential=True)
        _check(est, available, source, model, False)
        return MemoryChoice(False, est, available, source)
    whole = estimate("whole", model, targets, needs, windows, seq_len, batch_size, fisher_windows)
    bounded = estimate("bounded", model, targets, needs, windows, seq_len, batch_size, fisher_windows) if bounded_ok else None
    if requested == "whole" or bounded is None:
        _check(whole, available, source, model, bounded_ok, bounded)
        return MemoryChoice(False, whole, available, source)
    _check(bounded, available, source, model, False)
    _check_disk(bounded)
    note = ""
    if requested == "auto":
        fits = available is not None and whole.extra <= HEADROOM * available
        note = (f"statistics block by block (bounded: about {gib(bounded.extra)} beyond the model, estimate; factors "
                f"spilled to disk, {gib(bounded.spill)}); whole-model would need about {gib(whole.extra)}, "
                f"{gib(available or 0)} available ({source}): " + ("it would fit, --memory-mode whole for it"
                                                                  if fits else "it would not fit"))
        log.info(f"memory: {note}")
    del device
    return MemoryChoice(True, bounded, available, source, note)


def _check(est: Estimate, available: int | None, source: str, model: nn.Module, bounded_ok: bool,
           bounded: Estimate | None = None) -> None:
    if available is None or est.extra <= HEADROOM * available:
        return
    alt = f" (--memory-mode bounded: about {gib(bounded.extra)})" if bounded is not None and bounded_ok else ""
    raise RanklmError(
        f"not enough memory: the {est.mode} statistics need about {gib(est.extra)} beyond the model's "
        f"{gib(model_bytes(model))} (estimate from the shapes), {gib(available)} available ({source}); "
        f"{_advice(est.mode, bounded_ok)}{alt}")


def _check_disk(est: Estimate) -> None:
    from .spill import SPILL_DIR_ENV, spill_parent

    parent = spill_parent()
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if est.spill > free:
        raise RanklmError(f"not enough disk for the spilled factors: about {gib(est.spill)} in {parent}, "
                          f"{gib(free)} free; set {SPILL_DIR_ENV} to a folder with room")


def check_device(model: nn.Module, targets: list[Target], needs: set[str], batch_size: int, seq_len: int,
                 fisher_windows: int, stats_on_device: bool = False) -> int | None:
    """On a GPU: one backward pass and the largest factorization (with its statistics) must fit its free memory,
    plus, with running sums on the device (``--stats-dtype float32``, auto on a GPU), the gradient statistics
    of every target and one block's activation statistics in float32. Returns the estimate (None on the CPU)."""
    device = next(model.parameters()).device
    free = device_free_memory(device)
    if free is None or not needs:
        return None
    stats = statistics_bytes(targets, needs)
    held = 0
    if stats_on_device:  # float32 sums: half the float64 sizes, the gradient ones for the whole run
        grads = gradient_bytes(targets, needs)
        blocks: dict[int, int] = {}
        for t in targets:
            blocks[t.block] = blocks.get(t.block, 0) + stats[t.name] - grads[t.name]
        held = (sum(grads.values()) + max(blocks.values(), default=0)) // 2
    grad_batch = gradient_batch_size(model, min(batch_size, fisher_windows), seq_len,
                                     held=gradient_pass_held(model, targets, needs))
    need = held + max(backward_bytes(model, grad_batch, seq_len),
                      max((stats[t.name] + decompose_bytes(t) for t in targets), default=0))
    if need > HEADROOM * free:
        raise RanklmError(f"not enough GPU memory on {device}: about {gib(need)} needed beyond the model (estimate), "
                          f"{gib(free)} free; try --batch-size 1, --device-map auto, or --device cpu")
    return need


@contextlib.contextmanager
def out_of_memory_as_error(choice: MemoryChoice | None) -> Iterator[None]:
    """Out of memory while collecting statistics or factorizing becomes one ``RanklmError`` line."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as e:
        est = choice.estimate if choice is not None else None
        said = f" (estimate {gib(est.extra)} beyond the model, mode {est.mode})" if est is not None else ""
        kind = "GPU" if isinstance(e, torch.OutOfMemoryError) else "RAM"
        raise RanklmError(f"out of {kind} memory during calibration{said}: "
                          f"{_advice(est.mode if est else 'whole', True)}") from None


__all__ = ["Estimate", "MODES", "MemoryChoice", "check_device", "choose_mode", "estimate", "out_of_memory_as_error",
           "statistics_bytes"]


def preflight(plan: Any, model: nn.Module, targets: list[Target], windows: torch.Tensor | None,
              cache: Any) -> MemoryChoice | None:
    """``choose_mode`` for a plan (and ``check_device``), once per base and shared cache: a bench's cells
    reuse the first cell's choice, so they reuse its factorizations."""
    if windows is None or not plan.needs_pass1 or not plan.base.needs:
        return None
    chosen = getattr(cache, "memory", None)
    if chosen is not None and plan.base.name in chosen:
        return chosen[plan.base.name]
    calib = plan.calibration
    choice = choose_mode(plan.memory_mode, model, targets, plan.base, plan.allocator, len(windows), int(windows.shape[1]),
                         calib.batch_size, calib.fisher_windows, plan.sequential)
    on_device = calib.stats_dtype == "float32" or (calib.stats_dtype == "auto" and next(model.parameters()).is_cuda)
    check_device(model, targets, set(plan.base.needs), calib.batch_size, int(windows.shape[1]), calib.fisher_windows,
                 stats_on_device=on_device)
    if chosen is not None:
        chosen[plan.base.name] = choice
    return choice
