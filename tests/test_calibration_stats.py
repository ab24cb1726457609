"""Calibration Grams: per-batch products in float32, accumulated in float64, match the all-float64 path."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, random_ids

from ranklm.calibration import accumulate
from ranklm.calibration.accumulate import product_dtype
from ranklm.calibration.stats import collect_activation_stats
from ranklm.decompose.whiten import WhitenBase
from ranklm.targets import find_targets, weight_matrix

GRAM_RTOL = 1e-5  # relative Frobenius error of each Gram (measured 1.4e-7 here)
FACTOR_RTOL = 1e-4  # relative Frobenius error of the whitened rank-k reconstruction A_k B_k (measured 4.6e-6)


def _stats(monkeypatch, force64: bool):
    monkeypatch.setattr(accumulate, "FLOAT64_PRODUCTS", force64)
    model = make_model("llama")
    targets = find_targets(model)
    windows = random_ids(12, 64)  # 3 batches of 4 x 64 tokens
    return model, targets, collect_activation_stats(model, targets, windows, 4, progress=False, abs_mean=True)


def test_product_dtype(monkeypatch):
    assert product_dtype(torch.bfloat16) == product_dtype(torch.float32) == torch.float32
    assert product_dtype(torch.float64) == torch.float64
    monkeypatch.setattr(accumulate, "FLOAT64_PRODUCTS", True)
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


def test_statistics_are_registered_objects_with_their_kind():
    """Every statistic a base reads is a registered class; kinds decide the passes and block-by-block collection."""
    from ranklm.calibration import (
        ACTIVATION,
        GRADIENT,
        StatisticNames,
        blockwise,
        collection_passes,
        get_statistic,
    )
    from ranklm.decompose import BASES

    acts, grads = StatisticNames(ACTIVATION), StatisticNames(GRADIENT)
    assert {"gram", "abs_mean", "out_cov"} <= acts and {"fisher", "out_gram"} <= grads and not acts & grads
    for cls in BASES.values():  # every statistic a built-in base needs is registered
        assert set(getattr(cls, "needs", ())) <= acts | grads, cls
    assert get_statistic("out_cov").replaces == "gram" and get_statistic("fisher").per_example
    assert blockwise({"gram", "abs_mean"}) and not blockwise({"gram", "out_gram"})
    assert collection_passes({"out_gram", "gram", "fisher", "abs_mean"}) == [
        ("act", frozenset({"gram", "abs_mean"})), ("fisher", frozenset({"fisher"})), ("out_gram", frozenset({"out_gram"}))]
    with pytest.raises(ValueError, match="unknown statistics.*nope"):
        collection_passes({"gram", "nope"})


def test_collect_stats_shares_accumulators_of_one_input():
    """q/k/v and gate/up read one tensor: one Gram object each (memory: one accumulator per distinct input)."""
    from ranklm.calibration import collect_stats

    model = make_model("llama")
    targets = find_targets(model)
    got = collect_stats(model, targets, random_ids(4, 16), {"gram", "abs_mean"}, 2, progress=False)
    qkv = [got[f"model.layers.0.self_attn.{p}_proj"]["gram"] for p in "qkv"]
    assert qkv[0] is qkv[1] is qkv[2] and got["model.layers.0.mlp.gate_proj"]["gram"] is got["model.layers.0.mlp.up_proj"]["gram"]
    assert len({id(e["gram"]) for e in got.values()}) == 4 * 2  # per block: qkv, o, gate/up, down
