"""``ranklm info --diagnose``: which base loses least on this model, and will plain SVD hurt badly?

Two kinds of measurement, both from calibration statistics gathered before compressing, on the
same windows (``calibration.fisher.collect_curvature``: one forward/backward per window):

**Estimated loss increase per base** (the recommendation). For every target and every base the
model can use (``svd``, ``asvd``, ``fwsvd``, ``whiten``, ``kfac``), truncate the target to the
uniform rank of the requested keep, ``k = keep·m·n/(m+n)``, and estimate the increase of the
mean per-token loss to second order with the Kronecker-factored Fisher (``decompose/kfac.py``):
``½·tr(G ΔW A ΔWᵀ)``, ``A = E[x xᵀ]`` (input Gram), ``G = E[g gᵀ]`` (output-gradient Gram), both
means over tokens and undamped. The model-level number is the sum over targets (each truncation
estimated alone, as the ``global`` allocator adds them up). Caveat, stated with the numbers: kfac
minimises exactly this estimate per target (up to its damping), so kfac's number is the
curvature optimum at uniform ranks; what the table says is how much more every other base
loses. Each truncation is also scored with the per-element (diagonal) Fisher, ``Σ F_ij ΔW_ij²``
(``fisher_loss``, JSON only), but that score does not choose: on SmolLM2 (keep 0.6; blocks 0 and 15,
2 x 256 tokens) it put svd, asvd, fwsvd, whiten and kfac within ~3x of each other (kfac highest) while
their measured perplexities differ by orders of magnitude (svd in the millions, svd-llm ~117,
kfac + global ~55; benchmarks/README.md). The Kronecker estimate ranks them as measured (whole
model, defaults 8 x 256 tokens): kfac 0.39, whiten 1.45, asvd 4.4, svd 57, fwsvd 82 nats/token summed (second-order numbers this large rank
the bases; they are not predicted loss increases). ``tfwsvd`` is not scored (it starts from
``fwsvd`` and never ends worse on the diagonal-Fisher error). The recommended recipe is the
named method over the winning base (``kfac`` → ``kfac-global``, whose exact global knapsack
spends the budget where this estimate says it matters; ``whiten`` → ``svd-llm``).

**SVD-drop predictor** (TFWSVD paper, docs/design.md §4), kept per target: ``cv_rows`` /
``cv_cols``, the coefficient of variation of the row-/column-summed Fisher, and
``fisher_error_ratio``, the diagonal-Fisher error of the rank-k plain SVD over that of FWSVD.
The benchmark ``benchmarks/svd_drop_predictor.py`` measures how well each predicts the
perplexity gap between ``svd`` and ``fwsvd``; see benchmarks/README.md.

Speed: every base is a transform ``M = Lᵀ W R`` of the weight followed by a truncated SVD, so its
rank-k optimum is ``W_k = W R V_k V_kᵀ R⁻¹`` with ``V_k`` the top eigenvectors of
``MᵀM = Rᵀ (Wᵀ L Lᵀ W) R`` (on the smaller side; the transpose otherwise). One small symmetric
eigendecomposition per base replaces the base's full SVD, and the estimates need only
``min(m, n)``-sized products; the transforms themselves are the bases' own (``fisher_weights``,
``ASVDBase.scales``, ``psd_factor``, ``diagonal_factor``), and tests check the truncations
against each base's ``decompose``.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from .decompose.asvd import ASVDBase
from .decompose.fwsvd import fisher_weights
from .decompose.kfac import KFACBase, diagonal_factor
from .decompose.psd import psd_factor, solve_left_transposed
from .targets import Target

CV_THRESHOLD = 1.0
RATIO_THRESHOLD = 1.5
BASES = ("svd", "asvd", "fwsvd", "whiten", "kfac")
RECIPE_FOR_BASE = {"svd": "svd", "asvd": "asvd", "fwsvd": "fwsvd", "whiten": "svd-llm", "kfac": "kfac-global"}

# A side transform: None (identity), a vector (diagonal), or (matrix L, psd method) with L Lᵀ = the metric.
Side = Union[None, torch.Tensor, tuple]


def _left_t(side: Side, w: torch.Tensor) -> torch.Tensor:
    """``Lᵀ W``."""
    if side is None:
        return w
    if torch.is_tensor(side):
        return side[:, None] * w
    return side[0].mT @ w


def _right(w: torch.Tensor, side: Side) -> torch.Tensor:
    """``W R``."""
    if side is None:
        return w
    if torch.is_tensor(side):
        return w * side[None, :]
    return w @ side[0]


def _inv_t(side: Side, v: torch.Tensor) -> torch.Tensor:
    """``R⁻ᵀ V`` (solves, no inverse)."""
    if side is None:
        return v
    if torch.is_tensor(side):
        return v / side[:, None]
    return solve_left_transposed(side[0], v, side[1])


def _tail(w: torch.Tensor, left: Side, right: Side, k: int, cache: dict | None = None) -> torch.Tensor:
    """``V_t``: eigenvectors of ``MᵀM = Rᵀ (Wᵀ L Lᵀ W) R`` past the top k, for ``W`` with ``n <= m``.

    ``cache`` keeps ``WᵀW`` between the bases of one target that have no left transform."""
    n = w.shape[1]
    if left is None:
        if cache is None or "wtw" not in cache:
            wtw = w.mT @ w
            if cache is not None:
                cache["wtw"] = wtw
        k_mat = wtw if cache is None else cache["wtw"]
    else:
        lw = _left_t(left, w)
        k_mat = lw.mT @ lw
    mtm = _right(_right(k_mat, right).mT, right)  # Rᵀ K R
    mtm = (mtm + mtm.mT) / 2
    _, vecs = torch.linalg.eigh(mtm)  # ascending: the tail is the first n - k
    return vecs[:, : max(n - k, 0)]


def truncation(w: torch.Tensor, left: Side, right: Side, k: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The base's rank-k truncation error as ``ΔW = W − W_k = Z Yᵀ`` (module docstring).

    Returns ``(Z, Y, transposed)``: for ``n <= m`` ``ΔW = (W R V_t)(R⁻ᵀ V_t)ᵀ``, ``V_t`` the eigenvectors of
    ``MᵀM`` past the top k; for ``n > m`` the same on ``Wᵀ`` (sides swapped) and ``ΔWᵀ = Z Yᵀ``.
    """
    flip = w.shape[1] > w.shape[0]
    if flip:
        w, left, right = w.mT, right, left
    tail = _tail(w, left, right, k)
    return _right(w, right) @ tail, _inv_t(right, tail), flip


def truncation_losses(
    w: torch.Tensor, k: int, fisher: torch.Tensor | None, a_mean: torch.Tensor | None, g_out: torch.Tensor | None,
    left: Side, right: Side, cache: dict | None = None,
) -> dict[str, float]:
    """``{"loss": ½ tr(G ΔW A ΔWᵀ), "fisher_loss": Σ F ΔW²}`` of one base's truncation (keys whose data is given).

    ``g_out`` is the output metric as a matrix or, for wide outputs, its diagonal (a vector). ``cache`` (one
    dict per target, shared by its bases) keeps the products that do not depend on the base.
    """
    cache = {} if cache is None else cache
    flip = w.shape[1] > w.shape[0]
    if flip:  # work on Wᵀ (rows >= columns): sides, metrics and Fisher swap
        w, left, right = w.mT, right, left
    tail = _tail(w, left, right, k, cache)
    y = _inv_t(right, tail)
    out: dict[str, float] = {}
    if fisher is not None:
        dw = (_right(w, right) @ tail) @ y.mT
        f = fisher.to(torch.float64)
        out["fisher_loss"] = float((f.mT if flip else f).mul(dw.square()).sum())
    if a_mean is not None and g_out is not None:
        # ΔW = Z Yᵀ with Z = W R V_t: tr(G ΔW A ΔWᵀ) = Σ (V_tᵀ Rᵀ C R V_t) ∘ (Yᵀ A Y), C = Wᵀ G W (once per target)
        row_metric, col_metric = (a_mean, g_out) if flip else (g_out, a_mean)
        if "c" not in cache:
            cache["c"] = _quad(row_metric, w)
        rcr = _right(_right(cache["c"], right).mT, right)
        zc = tail.mT @ rcr @ tail
        ya = _quad(col_metric, y)
        out["loss"] = 0.5 * float((zc * ya).sum())
    return out


def _quad(metric: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Xᵀ M X`` for a matrix metric, or a diagonal one given as a vector."""
    if metric.dim() == 1:
        return x.mT @ (metric[:, None] * x)
    return x.mT @ (metric @ x)


def uniform_rank(m: int, n: int, keep: float) -> int:
    return min(max(1, int(keep * m * n // (m + n))), min(m, n))


def base_sides(name: str, stats: dict[str, Any], fisher: torch.Tensor | None) -> tuple[Side, Side] | None:
    """``(L, R)`` of a base on one target from its statistics, the bases' own transforms; None if data is missing."""
    if name == "svd":
        return None, None
    if name == "fwsvd":
        return (fisher_weights(fisher, "out"), None) if fisher is not None else None
    if name == "asvd":
        return (None, ASVDBase().scales(stats["abs_mean"])) if "abs_mean" in stats else None
    if "gram" not in stats:
        return None
    if name == "whiten":
        L, info = psd_factor(stats["gram"], stats.get("name", ""))
        return None, (L, info["method"])
    if name == "kfac":
        kfac = KFACBase()
        L_a, info_a = psd_factor(_mean(stats, "gram", "tokens"), stats.get("name", ""), damping=kfac.damping)
        if "out_gram" in stats:
            L_g, info_g = psd_factor(_mean(stats, "out_gram", "out_tokens"), stats.get("name", ""), damping=kfac.damping)
            return (L_g, info_g["method"]), (L_a, info_a["method"])
        if "out_sq" in stats:
            return diagonal_factor(_mean(stats, "out_sq", "out_tokens"), kfac.damping)[0], (L_a, info_a["method"])
        return None
    raise ValueError(name)


def _mean(stats: dict[str, Any], key: str, count: str) -> torch.Tensor:
    return stats[key].to(torch.float64) / max(int(stats.get(count, 1)), 1)


def matrix_scores(weight: torch.Tensor, fisher: torch.Tensor, keep: float, stats: dict[str, Any] | None = None,
                  bases: tuple[str, ...] = BASES) -> dict[str, Any]:
    """One target's SVD-drop scores, and with ``stats`` each base's estimated loss increase at the uniform rank."""
    w = weight.detach().to(torch.float64)
    m, n = w.shape
    f64 = fisher.double()
    row, col = f64.sum(1), f64.sum(0)
    k = uniform_rank(m, n, keep)
    a_mean = g_out = None
    if stats is not None and "gram" in stats:
        a_mean = _mean(stats, "gram", "tokens")
        g_out = _mean(stats, "out_gram", "out_tokens") if "out_gram" in stats else (
            _mean(stats, "out_sq", "out_tokens") if "out_sq" in stats else None)
    names = bases if stats is not None else ("svd", "fwsvd")
    loss: dict[str, float] = {}
    fisher_loss: dict[str, float] = {}
    cache: dict[str, torch.Tensor] = {}
    for b in names:
        sides = base_sides(b, stats or {}, fisher)
        if sides is None:
            continue
        r = truncation_losses(w, k, fisher, a_mean, g_out, *sides, cache=cache)
        fisher_loss[b] = r["fisher_loss"]
        if "loss" in r:
            loss[b] = r["loss"]
    out: dict[str, Any] = {
        "cv_rows": float(row.std() / row.mean().clamp_min(1e-30)),
        "cv_cols": float(col.std() / col.mean().clamp_min(1e-30)),
        "rank": k,
        "fisher_error_ratio": fisher_loss["svd"] / max(fisher_loss["fwsvd"], 1e-300),
    }
    if stats is not None:
        out.update(loss=loss, fisher_loss=fisher_loss)
    return out


def diagnose(model: torch.nn.Module, targets: list[Target], fisher: dict[str, torch.Tensor], keep: float,
             stats: dict[str, dict[str, Any]] | None = None, progress: bool = False) -> dict[str, Any]:
    """Per target and overall scores; with ``stats`` (``collect_curvature``) every base's estimated loss and a recipe."""
    from tqdm.auto import tqdm

    from .targets import weight_matrix

    per = {t.name: matrix_scores(weight_matrix(model.get_submodule(t.name)).detach(), fisher[t.name], keep,
                                 None if stats is None else stats[t.name])
           for t in tqdm(targets, desc="diagnose", disable=not progress, unit="matrix")}
    total = sum(t.dense_params for t in targets)
    overall: dict[str, Any] = {
        key: sum(per[t.name][key] * t.dense_params for t in targets) / total for key in ("cv_rows", "cv_cols", "fisher_error_ratio")
    }
    report: dict[str, Any] = {"keep": keep, "targets": per, "overall": overall}
    if stats is None:
        report["recommendation"] = recommend(overall)
        return report
    bases = [b for b in BASES if all(b in per[t.name]["loss"] for t in targets)]
    overall["loss"] = {b: sum(per[t.name]["loss"][b] for t in targets) for b in bases}
    overall["fisher_loss"] = {b: sum(per[t.name]["fisher_loss"][b] for t in targets) for b in bases}
    best = min(bases, key=lambda b: overall["loss"][b])
    report.update(bases=bases, best_base=best, recommended_recipe=RECIPE_FOR_BASE[best],
                  svd_drop=recommend(overall), recommendation=recommend_base(overall, best, keep))
    return report


def recommend_base(overall: dict[str, Any], best: str, keep: float) -> str:
    loss = overall["loss"]
    ref = max(loss[best], 1e-300)
    others = ", ".join(f"{b} {loss[b]:.4g} ({loss[b] / ref:.3g}x)" for b in sorted(loss, key=loss.get) if b != best)
    text = (f"{best} loses least: estimated loss increase {loss[best]:.4g} nats/token summed over targets at uniform "
            f"keep {keep} (others: {others}); use --recipe {RECIPE_FOR_BASE[best]}")
    if best == "kfac":
        text += " (kfac minimises this estimate by construction; the ratios say what the others lose)"
    return text


def recommend(scores: dict[str, float]) -> str:
    if scores["fisher_error_ratio"] >= RATIO_THRESHOLD or scores["cv_rows"] >= CV_THRESHOLD:
        return "plain SVD is likely to lose badly here: use a weighted base (fwsvd/tfwsvd) or whitening (svd-llm)"
    return "Fisher importance is even: plain SVD should be close to Fisher-weighted SVD"
