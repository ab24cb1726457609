"""Truth on the packaged SmolLM2-135M with real text: whitening must beat plain SVD."""

import pytest
import torch

import ranklm
from ranklm import CompressConfig
from ranklm.calibration import default_corpus, token_windows
from ranklm.eval import perplexity
from ranklm.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    model, tok, info = load_model(None)
    calib_src, eval_src = default_corpus()
    calib = token_windows(tok, calib_src, 256, 16, seed=0)
    evalw = token_windows(tok, eval_src, 256, 6)
    return tok, info, calib, evalw


def test_whiten_beats_svd_and_both_lose_to_dense(smol, tmp_path):
    tok, info, calib, evalw = smol
    dense_model, _, _ = load_model(None)
    dense = perplexity(dense_model, evalw, progress=False).ppl
    del dense_model
    ppl = {}
    for recipe in ("svd", "svd-llm"):
        model, _, _ = load_model(None)
        cfg = CompressConfig(keep=0.8, recipe=recipe, seq_len=256, calib_windows=16)
        ranklm.compress(model, tok, cfg, data=calib, progress=False, base_model=info)
        assert model.ranklm.keep_achieved <= 0.8 and model.ranklm.keep_achieved >= 0.8 * 0.995
        ppl[recipe] = perplexity(model, evalw, progress=False).ppl
        if recipe == "svd-llm":  # real checkpoint round trip
            ckpt = ranklm.save(model, tok, tmp_path / "ckpt")
            loaded, tok2 = ranklm.load(ckpt)
            ids = evalw[:1, :64]
            with torch.no_grad():
                assert torch.equal(model(ids).logits, loaded(ids).logits)
            assert tok2 is not None
        del model
    assert 10 < dense < 60, dense
    assert dense < ppl["svd-llm"] < ppl["svd"], (dense, ppl)
    assert ppl["svd-llm"] < 5 * dense  # whitening keeps the model usable at keep 0.8


@pytest.mark.parametrize(
    "recipe, base_options, allocator_options, include",
    [
        ("fwsvd", {}, {}, []),
        ("svd-llm-v2", {}, {}, []),
        # the two costly ones on the first 6 blocks only, to keep the suite short
        ("tfwsvd", {"adam_steps": 5, "sgd_steps": 3}, {}, [r"re:layers\.[0-5]\."]),
        ("asvd", {}, {"grid": [0.5], "windows": 1, "cache": False}, [r"re:layers\.[0-5]\."]),
    ],
)
def test_every_recipe_end_to_end_on_the_real_model(smol, tmp_path, recipe, base_options, allocator_options, include):
    tok, info, calib, evalw = smol
    model, _, _ = load_model(None)
    cfg = CompressConfig(keep=0.7, recipe=recipe, seq_len=128, calib_windows=8, fisher_windows=4, batch_size=4,
                         include=include, base_options=base_options, allocator_options=allocator_options)
    ranklm.compress(model, tok, cfg, data=calib[:8, :128], progress=False, base_model=info)
    assert 0.7 * 0.995 <= model.ranklm.keep_achieved <= 0.7
    ckpt = ranklm.save(model, tok, tmp_path / "ckpt")
    loaded, _ = ranklm.load(ckpt)
    ids = evalw[:1, :64]
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, loaded(ids).logits)
    assert torch.isfinite(logits).all()
    if recipe == "tfwsvd":
        rep = model.ranklm.artifacts["base_report"]
        factored = {n: r for n, r in model.ranklm.rank_map.items() if r != "dense"}
        assert len(rep) == len(factored) > 30  # each factored target solved once, at its allocated rank
        assert sorted(r["rank"] for r in rep.values()) == sorted(factored.values())
        ratios = sorted(r["weighted_error_tfwsvd"] / r["weighted_error_fwsvd"] for r in rep.values())
        assert ratios[-1] <= 1 + 1e-5  # never worse than the FWSVD start (by construction)
        # real per-element Fisher is not separable: even 5 + 3 steps improve on FWSVD (measured: median 0.88,
        # 40 of 42 targets below 0.96, the worst 0.9996); a solve that returns its start gives 1.0 everywhere
        assert ratios[len(ratios) // 2] < 0.95, ratios
        assert sum(x < 0.98 for x in ratios) >= 0.75 * len(ratios), ratios
