"""SVD-drop predictor (TFWSVD paper, docs/design.md §4): will plain SVD hurt badly here?

Plain SVD treats every weight as equally important. When the Fisher importance
of a matrix is spread very unevenly, the components SVD keeps are the wrong
ones and the loss jumps; a Fisher-weighted base then wins. Two per-matrix
scores, both computed from calibration Fisher before compressing:

- ``cv_rows``: coefficient of variation (std/mean) of the row-summed Fisher
  ``sum_j F_ij`` (the paper's intuition: uneven row importance);
- ``fisher_error_ratio``: Fisher-weighted error of the rank-k plain SVD divided
  by that of FWSVD at the same rank (k from the keep ratio). It is >= 1 (up to
  the row-vs-element approximation) and says directly how much importance SVD
  throws away that FWSVD keeps.

The model-level score is the parameter-weighted mean. The benchmark
``benchmarks/svd_drop_predictor.py`` measures how well each predicts the
perplexity gap between ``svd`` and ``fwsvd``; see benchmarks/README.md.
"""

from __future__ import annotations

from typing import Any

import torch

from .decompose.fwsvd import FWSVDBase
from .decompose.svd import SVDBase
from .decompose.tfwsvd import weighted_error
from .targets import Target

CV_THRESHOLD = 1.0
RATIO_THRESHOLD = 1.5


def matrix_scores(weight: torch.Tensor, fisher: torch.Tensor, keep: float) -> dict[str, float]:
    m, n = weight.shape
    row = fisher.double().sum(1)
    cv_rows = float(row.std() / row.mean().clamp_min(1e-30))
    col = fisher.double().sum(0)
    cv_cols = float(col.std() / col.mean().clamp_min(1e-30))
    k = max(1, int(keep * m * n // (m + n)))
    k = min(k, min(m, n))
    svd = SVDBase().decompose(weight, {}, k).approx(k)
    fw = FWSVDBase().decompose(weight, {"fisher": fisher}, k).approx(k)
    e_svd = weighted_error(fisher, weight, svd)
    e_fw = weighted_error(fisher, weight, fw)
    return {"cv_rows": cv_rows, "cv_cols": cv_cols, "rank": k, "fisher_error_ratio": e_svd / max(e_fw, 1e-300)}


def diagnose(model: torch.nn.Module, targets: list[Target], fisher: dict[str, torch.Tensor], keep: float) -> dict[str, Any]:
    from .targets import weight_matrix

    per = {t.name: matrix_scores(weight_matrix(model.get_submodule(t.name)).detach(), fisher[t.name], keep) for t in targets}
    total = sum(t.dense_params for t in targets)
    overall = {
        key: sum(per[t.name][key] * t.dense_params for t in targets) / total for key in ("cv_rows", "cv_cols", "fisher_error_ratio")
    }
    return {"keep": keep, "targets": per, "overall": overall, "recommendation": recommend(overall)}


def recommend(scores: dict[str, float]) -> str:
    if scores["fisher_error_ratio"] >= RATIO_THRESHOLD or scores["cv_rows"] >= CV_THRESHOLD:
        return "plain SVD is likely to lose badly here: use a weighted base (fwsvd/tfwsvd) or whitening (svd-llm)"
    return "Fisher importance is even: plain SVD should be close to Fisher-weighted SVD"
