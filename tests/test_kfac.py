"""``--base kfac``: Kronecker-factored Fisher SVD (issue 13)."""

from __future__ import annotations

import json

import pytest
import torch

import ranklm
from ranklm.budget import meets_budget
from ranklm.calibration.fisher import lm_loss
from ranklm.calibration.output_grads import collect_output_grams
from ranklm.config import CompressConfig
from ranklm.decompose import get_base
from ranklm.targets import find_targets

from conftest import make_model, outputs, random_ids

torch.set_num_threads(1)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _psd(n, seed):
    x = _rand(n, 3 * n, seed=seed) * torch.logspace(-1, 1, n, dtype=torch.float64)[:, None]
    return x @ x.T / (3 * n)


def test_identity_output_factor_is_whitening():
    w, x = _rand(10, 8), _rand(8, 200, seed=1) * torch.logspace(-2, 1, 8, dtype=torch.float64)[:, None]
    gram = x @ x.T
    stats = {"gram": gram, "tokens": 200, "out_gram": torch.eye(10, dtype=torch.float64) * 50, "out_tokens": 50}
    kfac = get_base("kfac", damping=0.0).decompose(w, stats, max_rank=5)
    whiten = get_base("whiten").decompose(w, {"gram": gram}, max_rank=5)
    for k in (1, 3, 5):
        torch.testing.assert_close(kfac.approx(k).double(), whiten.approx(k).double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kfac.s.double() * 200**0.5, whiten.s.double(), atol=1e-4, rtol=1e-5)
    assert kfac.meta["loss_scale"] == 0.5 and kfac.meta["numerics"]["output"]["method"] == "cholesky"


def _objective(w, wk, a, g):
    d = w - wk
    return float(torch.trace(d @ a @ d.T @ g))  # vec(d)^T (A ⊗ G) vec(d)


def test_kfac_is_the_exact_optimum_of_the_kronecker_objective():
    m, n, k = 6, 5, 2
    w, a, g = _rand(m, n, seed=3), _psd(n, 4), _psd(m, 5)
    f = get_base("kfac", damping=0.0).decompose(w, {"gram": a, "tokens": 1, "out_gram": g, "out_tokens": 1}, max_rank=4)
    best = _objective(w, f.approx(k).double(), a, g)
    assert best == pytest.approx(float((f.s.double()[k:] ** 2).sum()), rel=1e-5)  # Eckart-Young in the weighted space
    for seed in range(4):  # brute force: L-BFGS on A B from random starts never does better
        fa = _rand(m, k, seed=10 + seed).requires_grad_(True)
        fb = _rand(k, n, seed=20 + seed).requires_grad_(True)
        opt = torch.optim.LBFGS([fa, fb], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            d = w - fa @ fb
            loss = torch.trace(d @ a @ d.T @ g)
            loss.backward()
            return loss

        opt.step(closure)
        assert _objective(w, (fa @ fb).detach(), a, g) >= best * (1 - 1e-6)


def test_diagonal_output_factor_equals_dense_diagonal_g():
    w, a = _rand(7, 5, seed=6), _psd(5, 7)
    gdiag = torch.rand(7, generator=torch.Generator().manual_seed(8), dtype=torch.float64) + 0.1
    base = get_base("kfac", damping=0.0)
    dense = base.decompose(w, {"gram": a, "tokens": 1, "out_gram": torch.diag(gdiag), "out_tokens": 1}, max_rank=3)
    diag = base.decompose(w, {"gram": a, "tokens": 1, "out_sq": gdiag, "out_tokens": 1}, max_rank=3)
    torch.testing.assert_close(dense.approx(2), diag.approx(2), atol=1e-5, rtol=1e-5)
    assert diag.meta["numerics"]["output"] == {"method": "diagonal", "jitter": 0.0}


def test_output_gradient_gram_is_the_per_token_gradient_second_moment():
    """G collected with hooks equals sum_t g_t g_t^T from autograd (g = dL/dy, L the summed token NLL)."""
    model, ids = make_model("llama"), random_ids(4, 16)
    flags = [p.requires_grad for p in model.parameters()]
    targets = [t for t in find_targets(model, [], []) if t.name.endswith(("layers.0.mlp.down_proj", "layers.1.self_attn.q_proj"))]
    got = collect_output_grams(model, targets, ids, batch_size=2, progress=False)
    got_diag = collect_output_grams(model, targets, ids, batch_size=4, progress=False, dense_max=0)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    for t in targets:
        captured = []

        def keep(module, args, y):
            y.retain_grad()
            captured.append(y)

        h = model.get_submodule(t.name).register_forward_hook(keep)
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        he = emb.register_forward_hook(lambda m, a, y: y.requires_grad_(True))  # returns y itself: unchanged
        (lm_loss(model, ids) * ids.shape[0] * (ids.shape[1] - 1)).backward()
        h.remove()
        he.remove()
        g = captured[0].grad.reshape(-1, t.out_features).double()
        ref = g.T @ g  # float32 per-batch products: compare at 1e-5 of the largest entry
        torch.testing.assert_close(got[t.name]["out_gram"], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        torch.testing.assert_close(got_diag[t.name]["out_sq"], ref.diagonal(), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        assert got[t.name]["out_tokens"] == ids.numel()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kfac_global_compresses_records_and_round_trips(family, tmp_path):
    model, ids = make_model(family), random_ids(8, 32)
    cfg = CompressConfig(keep=0.6, base="kfac", allocator="global", fisher_windows=4)
    ranklm.compress(model, None, cfg, data=ids, progress=False)
    st = model.ranklm
    assert meets_budget(st.keep_achieved, 0.6)
    rec = st.artifacts["global"]
    assert rec["loss_scale"] == 0.5 and rec["loss_exact"] <= rec["loss_greedy"]
    num = st.artifacts["numerics"]
    assert set(num) == {t.name for t in st.targets} and all("output" in r for r in num.values())
    ckpt = ranklm.save(model, None, tmp_path / "ckpt")
    meta = json.loads((ckpt / "ranklm.json").read_text())
    assert meta["artifacts"]["numerics"].keys() == num.keys()
    loaded, _ = ranklm.load(ckpt)
    assert torch.equal(outputs(model, ids), outputs(loaded, ids))


def test_kfac_refuses_sequential_and_bad_options():
    from ranklm import RanklmError
    from ranklm.pipeline import make_plan

    with pytest.raises(RanklmError, match="sequential"):
        make_plan(CompressConfig(base="kfac", sequential=True))
    with pytest.raises(RanklmError, match="shrink of base kfac must lie in"):
        CompressConfig(base="kfac", base_options={"shrink": 2})


def test_cli_kfac_global(capsys, tiny_llama_dir, text_file, tmp_path):
    from ranklm.cli import main

    fast = ["--calib-windows", "4", "--seq-len", "32", "--batch-size", "2", "--fisher-windows", "4", "--no-eval", "--json"]
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(text_file), "--keep", "0.7", "--base", "kfac",
                 "--allocator", "global", *fast, "--output", str(tmp_path / "ckpt")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert meets_budget(json.loads(out)["keep_achieved"], 0.7)


def test_encoder_without_a_task_loss_is_one_error():
    from ranklm import RanklmError

    model = make_model("bert")
    with pytest.raises(RanklmError, match="needs a loss|no LM head"):
        ranklm.compress(model, None, CompressConfig(keep=0.6, base="kfac"), data=random_ids(4, 16), progress=False)
