"""Stage 5b: block-level refit with accumulated-error correction (``--block-refit``; issue 27).

Every base fits each matrix alone, on the *dense* model's activations, so each compressed layer sees
inputs that earlier compressed layers have already bent and nothing corrects for it. This stage
walks the blocks in order with two streams of calibration activations, the dense model's and the
compressed model's, and for every factored target solves, in closed form, for factors whose outputs
on the *compressed* inputs ``X~`` match the *dense* layer's outputs on the dense inputs ``X``:

    min_M ||X~ M^T - X W^T||_F^2   (rows are tokens; M = A B of the target's rank k)

With ``C = X~^T X~`` (damped by ``damping`` times its mean diagonal) and ``S = X^T X~``, the
unconstrained optimum is ``M* = W P`` with ``P = S C^-1``, and the error splits as
``||X~ (M* - M)^T||^2 + const``, so (SVD-LLM's whitening applied to the corrected weight; the
accumulated-error correction of SAES-SVD):

* ``full``: the best rank-k ``M`` in that metric: the truncated SVD of ``W S L^-T`` (``C = L L^T``),
  mapped back by ``L^-1``. It replaces the base's own trade-offs (kfac's output-gradient weighting)
  by plain output error;
* ``output``: keep ``A`` (the base's output subspace: kfac's curvature-weighted choice) and solve for
  ``B`` by least squares, ``B = A^+ W P``;
* ``drift``: keep the base's factors and undo only the input drift, ``B <- B P``: the compressed layer
  maps ``X~`` to what it mapped ``X`` to (no change where nothing upstream was compressed).

Targets of a block are refit in the order the block calls them, each group that reads the same input
(q/k/v; gate/up) on the outputs of the groups refit before it. Memory: the model, one dense copy of
the current block, the two activation streams (``windows x seq_len x hidden`` each) and two
``in x in`` float64 matrices per group; the dense weights of the factored targets wait in a temporary
safetensors folder (one file per block), not in memory. The record gives every target's relative output
error ``||X~ M^T - X W^T||^2 / ||X W^T||^2`` before and after, on the calibration windows.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..budget import DENSE, RankMap
from ..calibration.sequential import _hidden, _Stop, _with_hidden, capture_block_inputs
from ..config import check_block_refit
from ..decompose.base import split_sqrt, thin_svd
from ..decompose.psd import psd_factor, solve_left, solve_right
from ..errors import RanklmError
from ..layers import LowRankLinear, replace_module
from ..targets import Target, find_blocks, weight_matrix
from .spill import SPILL_DIR_ENV, spill_folder


class DenseStash:
    """The dense weights of the targets about to be factored, one safetensors file per block in a temporary
    folder (removed by ``close()`` or when garbage-collected): the refit's reference without a second model."""

    def __init__(self, model: nn.Module, targets: list[Target], rank_map: RankMap) -> None:
        from safetensors.torch import save_file

        self.dir, self._finalizer = spill_folder(self, "ranklm-dense-", "the dense weights")
        by_block: dict[int, dict[str, torch.Tensor]] = {}
        for t in targets:
            if rank_map.get(t.name, DENSE) != DENSE:
                w = weight_matrix(model.get_submodule(t.name)).detach()
                by_block.setdefault(int(t.block), {})[t.name] = w.to("cpu").contiguous()
        self.blocks = set(by_block)
        for b, tensors in by_block.items():
            try:
                save_file(tensors, str(self.dir / f"block-{b:05d}.safetensors"))
            except OSError as e:
                raise RanklmError(f"cannot write dense weights to {self.dir}: {e.strerror or e} "
                                  f"(set {SPILL_DIR_ENV} to a folder with room)") from None

    def block(self, b: int) -> dict[str, torch.Tensor]:
        if b not in self.blocks:
            return {}
        from safetensors.torch import load_file

        return load_file(str(self.dir / f"block-{b:05d}.safetensors"))

    def close(self) -> None:
        self._finalizer()


def _relative(name: str, block_prefix: str) -> str:
    return name[len(block_prefix) + 1:]


def _dense_copy(block: nn.Module, block_prefix: str, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``block`` whose factored targets are dense ``nn.Linear`` again (their stashed weights)."""
    dense = copy.deepcopy(block)
    for name, w in weights.items():
        rel = _relative(name, block_prefix)
        low = dense.get_submodule(rel)  # a LowRankLinear (block_refit passes only those)
        bias = low.A.bias
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=low.A.weight.device, dtype=low.A.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        replace_module(dense, rel, lin)
    return dense


def _call_groups(block: nn.Module, rels: list[str], args: tuple, kwargs: dict) -> list[list[str]]:
    """``rels`` in the order ``block`` calls them, consecutive modules that read the same input tensor grouped."""
    order: list[tuple[str, torch.Tensor]] = []  # the tensors themselves: ids of freed ones are reused
    handles = [block.get_submodule(r).register_forward_pre_hook(
        lambda m, a, r=r: order.append((r, a[0]))) for r in rels]
    try:
        with torch.no_grad():
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last = None
    for r, inp in order:
        if r in seen:
            continue
        seen.add(r)
        if groups and inp is last:
            groups[-1].append(r)
        else:
            groups.append([r])
        last = inp
    return groups + [[r] for r in rels if r not in seen]  # never called: refit alone (no data: skipped below)


def _input_of(block: nn.Module, rel: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The input ``block`` gives module ``rel`` (the forward stops there)."""
    got: list[torch.Tensor] = []

    def hook(m: nn.Module, a: tuple) -> None:
        got.append(a[0].detach())
        raise _Stop

    h = block.get_submodule(rel).register_forward_pre_hook(hook)
    try:
        block(*args, **kwargs)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0] if got else None


def _group_statistics(dense_block: nn.Module, block: nn.Module, rel: str, dense_in: list, comp_in: list,
                      weights: list[torch.Tensor]) -> dict[str, Any]:
    """``C = X~^T X~`` and ``S = X^T X~`` of module ``rel``'s inputs over every batch, and ``||X W^T||^2`` for each
    of ``weights`` (the group's dense weights). Float32 products per batch, float64 running sums (as calibration)."""
    c = s = None
    dense_out = [0.0] * len(weights)
    tokens = 0
    for (da, dk), (ca, ck) in zip(dense_in, comp_in):
        x = _input_of(dense_block, rel, da, dk)
        xt = _input_of(block, rel, ca, ck)
        if x is None or xt is None:
            return {}
        x = x.reshape(-1, x.shape[-1]).float()
        xt = xt.reshape(-1, xt.shape[-1]).float()
        if c is None:
            n = x.shape[1]
            c, s = (torch.zeros(n, n, dtype=torch.float64, device=x.device) for _ in range(2))
        c += xt.mT @ xt
        s += x.mT @ xt
        for i, w in enumerate(weights):
            dense_out[i] += float((x @ w.to(device=x.device, dtype=torch.float32).mT).double().square().sum())
        tokens += x.shape[0]
    return {"C": c, "S": s, "dense_out": dense_out, "tokens": tokens}


def _rel_error(w: torch.Tensor, m: torch.Tensor, st: dict[str, Any], dense_out: float) -> float:
    """``||X~ M^T - X W^T||^2 / ||X W^T||^2`` from the group's statistics (``dense_out`` = ``||X W^T||^2``)."""
    wd = torch.tensor(dense_out, dtype=torch.float64)
    cross = (w @ st["S"] * m).sum()
    mc = (m @ st["C"] * m).sum()
    return float((wd - 2 * cross + mc) / wd.clamp_min(1e-300))


def _times_inverse(x: torch.Tensor, L: torch.Tensor, method: str) -> torch.Tensor:
    """``x C^{-1}`` with ``C = L L^T`` (symmetric), without forming the inverse."""
    if method == "cholesky":
        return torch.cholesky_solve(x.mT, L).mT
    return torch.linalg.solve(L @ L.mT, x.mT).mT


def refit_target(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, st: dict[str, Any], mode: str,
                 damping: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """New ``(A, B)`` of the same rank for one target (module docstring), float64; and the damped ``C``'s record."""
    w, a, b = w.to(torch.float64), a.to(torch.float64), b.to(torch.float64)
    L, info = psd_factor(st["C"], damping=damping)  # C + damping * mean(diag C) = L L^T
    method = info["method"]
    if mode == "full":
        z = solve_left(L, (w @ st["S"]).mT, method).mT  # W S L^-T = M* L: the corrected weight, whitened
        u, sv, vt = thin_svd(z)
        a_new, y = split_sqrt(u, sv, vt, a.shape[1])
        return a_new, solve_right(L, y, method), info  # M = a y L^-1
    if mode == "output":  # A kept; B = A^+ W P, P = S C^-1
        return a, torch.linalg.lstsq(a, _times_inverse(w @ st["S"], L, method)).solution, info
    return a, _times_inverse(b @ st["S"], L, method), info  # drift: B P


@torch.no_grad()
def block_refit(model: nn.Module, targets: list[Target], stash: DenseStash, windows: torch.Tensor, batch_size: int,
                mode: str, damping: float = 0.01, progress: bool = True) -> dict[str, Any]:
    """Refit every installed ``LowRankLinear`` target block by block (module docstring); returns the stage's record."""
    check_block_refit(mode)
    if windows is None:
        raise RanklmError("--block-refit needs calibration windows")
    found = find_blocks(model)
    if found is None:
        raise RanklmError("--block-refit works block by block: no repeated transformer blocks found in this model")
    prefix, blocks = found
    t0 = time.perf_counter()
    comp_in = capture_block_inputs(model, blocks, windows, batch_size)
    dense_in = list(comp_in)  # block 0 reads the embeddings: the same in both streams
    per_target: dict[str, dict[str, Any]] = {}
    for bi in tqdm(range(len(blocks)), desc=f"block refit ({mode})", disable=not progress, unit="block"):
        block, block_prefix = blocks[bi], f"{prefix}.{bi}"
        weights = {n: w for n, w in stash.block(bi).items()
                   if isinstance(model.get_submodule(n), LowRankLinear)}
        dense_block = _dense_copy(block, block_prefix, weights) if weights else block
        if weights:
            rels = {_relative(n, block_prefix): n for n in weights}
            a0, k0 = comp_in[0]
            for group in _call_groups(block, list(rels), a0, k0):
                st = _group_statistics(dense_block, block, group[0], dense_in, comp_in, [weights[rels[r]] for r in group])
                for gi, rel in enumerate(group):
                    name = rels[rel]
                    layer = block.get_submodule(rel)
                    if not st:
                        per_target[name] = {"skipped": "not called by its block"}
                        continue
                    w = weights[name].to(device=st["C"].device, dtype=torch.float64)
                    a, b = layer.A.weight.to(torch.float64), layer.B.weight.to(torch.float64)
                    before = _rel_error(w, a @ b, st, st["dense_out"][gi])
                    a_new, b_new, info = refit_target(w, a, b, st, mode, damping)
                    after = _rel_error(w, a_new @ b_new, st, st["dense_out"][gi])
                    if not (torch.isfinite(a_new).all() and torch.isfinite(b_new).all()) or after > before:
                        per_target[name] = {"before": before, "after": before, "kept": "the refit did not lower the error"}
                        continue
                    layer.A.weight.copy_(a_new.to(layer.A.weight.dtype))
                    layer.B.weight.copy_(b_new.to(layer.B.weight.dtype))
                    per_target[name] = {"before": before, "after": after, "tokens": st["tokens"],
                                        **({"numerics": info} if info["method"] != "cholesky" or info["jitter"] else {})}
                del st
        if bi + 1 < len(blocks):
            dense_in = [_with_hidden(a, k, _hidden(dense_block(*a, **k))) for a, k in dense_in]
            comp_in = [_with_hidden(a, k, _hidden(block(*a, **k))) for a, k in comp_in]
        del dense_block
    done = [r for r in per_target.values() if "after" in r and "kept" not in r]
    mean = (lambda key: sum(r[key] for r in done) / len(done)) if done else (lambda key: None)
    return {"mode": mode, "damping": damping, "targets": len(per_target), "refit": len(done),
            "kept": sum(1 for r in per_target.values() if "kept" in r),
            "mean_rel_error_before": mean("before"), "mean_rel_error_after": mean("after"),
            "seconds": round(time.perf_counter() - t0, 2), "per_target": per_target}


__all__ = ["DenseStash", "block_refit", "refit_target"]
