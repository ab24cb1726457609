"""Calibration Grams: per-batch products in float32, accumulated in float64, match the all-float64 path."""

from __future__ import annotations

import pytest
import torch

from ranklm.calibration import stats
from ranklm.calibration.stats import collect_activation_stats, product_dtype
from ranklm.decompose.whiten import WhitenBase
from ranklm.targets import find_targets, weight_matrix

from conftest import make_model, random_ids

GRAM_RTOL = 1e-5  # relative Frobenius error of each Gram (measured 1.4e-7 here)
FACTOR_RTOL = 1e-4  # relative Frobenius error of the whitened rank-k reconstruction A_k B_k (measured 4.6e-6)


def _stats(monkeypatch, force64: bool):
    monkeypatch.setattr(stats, "FLOAT64_PRODUCTS", force64)
    model = make_model("llama")
    targets = find_targets(model)
    windows = random_ids(12, 64)  # 3 batches of 4 x 64 tokens
    return model, targets, collect_activation_stats(model, targets, windows, 4, progress=False, abs_mean=True)


def test_product_dtype(monkeypatch):
    assert product_dtype(torch.bfloat16) == product_dtype(torch.float32) == torch.float32
    assert product_dtype(torch.float64) == torch.float64
    monkeypatch.setattr(stats, "FLOAT64_PRODUCTS", True)
    assert product_dtype(torch.float32) == torch.float64


def test_float32_products_give_the_float64_grams_and_factors(monkeypatch):
    model, targets, fast = _stats(monkeypatch, False)
    _, _, ref = _stats(monkeypatch, True)
    assert any(not torch.equal(fast[t.name]["gram"], ref[t.name]["gram"]) for t in targets)  # two different paths
    base = WhitenBase()
    for t in targets:
        f, r = fast[t.name], ref[t.name]
        assert f["gram"].dtype == torch.float64 and f["tokens"] == r["tokens"] == 12 * 64
        assert torch.linalg.norm(f["gram"] - r["gram"]) <= GRAM_RTOL * torch.linalg.norm(r["gram"])
        torch.testing.assert_close(f["abs_mean"], r["abs_mean"], rtol=GRAM_RTOL, atol=0)
        w = weight_matrix(model.get_submodule(t.name))
        k = min(w.shape) // 2
        a, b = base.decompose(w, f, k).factors(k)
        a64, b64 = base.decompose(w, r, k).factors(k)
        approx, approx64 = (a.double() @ b.double()), (a64.double() @ b64.double())
        assert torch.linalg.norm(approx - approx64) <= FACTOR_RTOL * torch.linalg.norm(approx64), t.name


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_output_covariance_is_w_gram_wt_without_the_bias(family):
    """out_cov of a target = W G W^T (its input Gram seen through W; the bias is not part of it)."""
    model = make_model(family)
    targets = find_targets(model)
    wide = [t for t in targets if t.out_features < t.in_features]
    assert wide
    windows = random_ids(8, 32)
    ref = collect_activation_stats(model, targets, windows, 4, progress=False)
    got = collect_activation_stats(model, targets, windows, 4, progress=False, out_cov={t.name for t in wide})
    for t in targets:
        if t in wide:
            assert "gram" not in got[t.name] and got[t.name]["tokens"] == ref[t.name]["tokens"] == 8 * 32
            w = weight_matrix(model.get_submodule(t.name)).double()
            expected = w @ ref[t.name]["gram"] @ w.T
            assert torch.linalg.norm(got[t.name]["out_cov"] - expected) <= 1e-5 * torch.linalg.norm(expected), t.name
        else:
            torch.testing.assert_close(got[t.name]["gram"], ref[t.name]["gram"], rtol=0, atol=0)
    if family != "llama":  # biased outputs: the bias must have been taken off
        assert any(getattr(model.get_submodule(t.name), "bias", None) is not None for t in wide)
