"""``ranklm info --diagnose``: every usable base compared by its estimated loss increase, a recipe recommended."""

from __future__ import annotations

import json

import pytest
import torch

from ranklm.calibration.fisher import collect_curvature, collect_fisher
from ranklm.calibration.output_grads import collect_output_grams
from ranklm.calibration.stats import collect_activation_stats
from ranklm.decompose import get_base
from ranklm.decompose.fwsvd import FWSVDBase
from ranklm.decompose.svd import SVDBase
from ranklm.decompose.tfwsvd import weighted_error
from ranklm.diagnose import BASES, RECIPE_FOR_BASE, base_sides, diagnose, truncation, truncation_losses, uniform_rank
from ranklm.targets import find_targets, weight_matrix

from conftest import make_model, random_ids
from test_tasks import task_file, tiny_bert_dir  # noqa: F401 (fixtures)

torch.set_num_threads(1)


def _anisotropic_llama(tmp_path=None, tokenizer=None):
    """Tiny Llama whose RMSNorm gains span 1e-1.5 .. 1e1.5: every target's input channels differ ~1000x in scale."""
    model = make_model("llama")
    g = torch.Generator().manual_seed(0)
    gains = torch.logspace(-1.5, 1.5, 64)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(gains[torch.randperm(64, generator=g)])
            layer.post_attention_layernorm.weight.mul_(gains[torch.randperm(64, generator=g)])
    if tmp_path is not None:
        model.save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)
    return model


def _stats(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(n, 60, generator=g, dtype=torch.float64) * torch.logspace(0, 2, n, dtype=torch.float64)[:, None]
    y = torch.randn(m, 90, generator=g, dtype=torch.float64) * torch.logspace(0, 1.5, m, dtype=torch.float64)[:, None]
    stats = {"gram": x @ x.T, "tokens": 60, "abs_mean": x.abs().mean(1), "out_gram": y @ y.T, "out_tokens": 90, "name": "t"}
    return w, stats, torch.rand(m, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
@pytest.mark.parametrize("base", BASES)
def test_fast_truncation_is_each_bases_own_rank_k_optimum(base, shape):
    w, stats, fisher = _stats(*shape)
    k = 3
    given = {**stats, "fisher": fisher}
    if base == "whiten":
        given.pop("out_gram")  # the input-Gram route (the output side is the same optimum)
    ref = w - get_base(base).decompose(w, given, k).approx(k).double()
    z, y, flip = truncation(w, *base_sides(base, stats, fisher), k)
    dw = (z @ y.mT).mT if flip else z @ y.mT
    torch.testing.assert_close(dw, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    # the estimates (shared per-target products) are those of the base's own ΔW
    a, g = stats["gram"] / stats["tokens"], stats["out_gram"] / stats["out_tokens"]
    est = truncation_losses(w, k, fisher, a, g, *base_sides(base, stats, fisher), cache={})
    assert est["loss"] == pytest.approx(0.5 * float(torch.trace(g @ ref @ a @ ref.T)), rel=1e-4)
    assert est["fisher_loss"] == pytest.approx(float((fisher * ref.square()).sum()), rel=1e-4)


def test_collect_curvature_equals_the_separate_collectors():
    """One set of forward/backward passes gives what collect_fisher, collect_activation_stats and
    collect_output_grams give with three (the same windows, one window per pass)."""
    model = make_model("llama")
    targets = find_targets(model)
    ids = random_ids(3, 16)
    fisher, stats = collect_curvature(model, targets, ids, progress=False)
    ref_f = collect_fisher(model, targets, ids, progress=False)
    acts = collect_activation_stats(model, targets, ids, batch_size=1, progress=False, abs_mean=True)
    outs = collect_output_grams(model, targets, ids, batch_size=1, progress=False)
    for t in targets:
        torch.testing.assert_close(fisher[t.name], ref_f[t.name])
        s = stats[t.name]
        torch.testing.assert_close(s["gram"], acts[t.name]["gram"], rtol=1e-5, atol=1e-6 * float(s["gram"].abs().max()))
        torch.testing.assert_close(s["abs_mean"], acts[t.name]["abs_mean"], rtol=1e-5, atol=1e-8)
        assert s["tokens"] == acts[t.name]["tokens"] and s["out_tokens"] == outs[t.name]["out_tokens"]
        g = outs[t.name]["out_gram"]
        torch.testing.assert_close(s["out_gram"], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


def test_estimates_recommend_the_lowest_and_whitening_beats_svd_on_anisotropic_activations():
    model = _anisotropic_llama()
    targets = find_targets(model)
    fisher, stats = collect_curvature(model, targets, random_ids(4, 32), progress=False)
    r = diagnose(model, targets, fisher, 0.6, stats)
    loss = r["overall"]["loss"]
    assert r["bases"] == list(BASES) and set(loss) == set(BASES)
    for b in BASES:
        assert loss[b] == pytest.approx(sum(r["targets"][t.name]["loss"][b] for t in targets), rel=1e-12)
    assert r["best_base"] == min(loss, key=loss.get) and r["recommended_recipe"] == RECIPE_FOR_BASE[r["best_base"]]
    assert f"--recipe {r['recommended_recipe']}" in r["recommendation"]
    # kfac minimises this very estimate per target (damping 1e-6 aside): a check on the estimate's arithmetic
    for t in targets:
        per = r["targets"][t.name]["loss"]
        assert per["kfac"] <= min(per.values()) * (1 + 1e-4) + 1e-12, t.name
    # ~1000x anisotropic inputs: curvature-aware bases lose far less than plain SVD, on both estimates
    assert loss["kfac"] < loss["whiten"] < 0.25 * loss["svd"]
    fl = r["overall"]["fisher_loss"]
    assert fl["whiten"] < 0.5 * fl["svd"] and fl["kfac"] < 0.5 * fl["svd"]


def test_fisher_error_ratio_is_the_bases_own_weighted_errors():
    """Replaces ``fisher_error_ratio >= 0.99`` (>= 1 by construction): the ratio must equal
    svd's over fwsvd's per-element Fisher error, each from the base's own decompose at the uniform rank."""
    model = _anisotropic_llama()
    targets = find_targets(model)
    fisher = collect_fisher(model, targets, random_ids(3, 32), progress=False)
    r = diagnose(model, targets, fisher, 0.5)
    ratios = []
    for t in targets:
        w = weight_matrix(model.get_submodule(t.name)).detach()
        k = uniform_rank(*w.shape, 0.5)
        e_svd = weighted_error(fisher[t.name], w, SVDBase().decompose(w, {}, k).approx(k))
        e_fw = weighted_error(fisher[t.name], w, FWSVDBase().decompose(w, {"fisher": fisher[t.name]}, k).approx(k))
        assert r["targets"][t.name]["rank"] == k
        assert r["targets"][t.name]["fisher_error_ratio"] == pytest.approx(e_svd / e_fw, rel=1e-4), t.name
        ratios.append(e_svd / e_fw)
    assert max(ratios) > 1.05  # uneven importance here: the ratio is informative, not stuck at 1


def _cli(capsys, *args):
    from ranklm.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_diagnose_table_and_json_agree(capsys, tiny_tokenizer, text_file, tmp_path):
    model_dir = tmp_path / "aniso"
    _anisotropic_llama(model_dir, tiny_tokenizer)
    args = ["info", "--diagnose", model_dir, "--data", text_file, "--windows", "2", "--seq-len", "32", "--keep", "0.6"]
    code, out, err = _cli(capsys, *args, "--json")
    assert code == 0, err
    r = json.loads(out)
    loss = r["overall"]["loss"]
    assert r["best_base"] == min(loss, key=loss.get) and r["best_base"] in ("kfac", "whiten")
    assert loss["whiten"] < loss["svd"] and loss["kfac"] < loss["svd"]
    assert "LM loss" in r["fisher_data"] and "plain SVD" in r["svd_drop"]
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.startswith("module"))
    assert all(b in header.split() for b in BASES)
    rec = next(ln for ln in lines if ln.startswith("recommendation:"))
    assert rec.startswith(f"recommendation: {r['best_base']} loses least") and f"--recipe {r['recommended_recipe']}" in rec


def test_cli_diagnose_encoder_compares_bases_on_the_task_loss(capsys, tiny_bert_dir, task_file):  # noqa: F811
    code, out, err = _cli(capsys, "info", "--diagnose", tiny_bert_dir, "--data", task_file, "--windows", "4",
                          "--seq-len", "64", "--keep", "0.5", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert "task loss" in r["fisher_data"] and r["bases"] == list(BASES)
    loss = r["overall"]["loss"]
    assert r["best_base"] == min(loss, key=loss.get)
    assert all(v >= 0 for v in loss.values()) and loss["kfac"] <= loss["svd"]
