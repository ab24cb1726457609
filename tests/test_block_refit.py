"""Stage 5b, the block-level refit (``--block-refit``): closed-form optima, lower error, any base, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import ranklm
from ranklm.config import CompressConfig
from ranklm.errors import RanklmError
from ranklm.layers import LowRankLinear
from ranklm.pipeline.block_refit import _rel_error, refit_target

from conftest import make_model, outputs, random_ids

torch.set_num_threads(1)


def _stats(n_tok: int = 400, n_in: int = 12, drift: float = 0.3, seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, n_in, generator=g, dtype=torch.float64) @ torch.randn(n_in, n_in, generator=g, dtype=torch.float64)
    xt = x + drift * torch.randn(n_tok, n_in, generator=g, dtype=torch.float64)  # compressed inputs: drifted
    return {"C": xt.T @ xt, "S": x.T @ xt, "tokens": n_tok}, x, xt


def _direct_error(w, m, x, xt) -> float:
    y = x @ w.T
    return float(((xt @ m.T - y) ** 2).sum() / (y**2).sum())


def test_full_mode_is_the_best_rank_k_fit():
    """``full`` beats every other rank-k matrix on ||X~ M^T - X W^T||: the base's factors, random ones and
    small perturbations of its own answer; the statistics-based error equals the direct computation."""
    st, x, xt = _stats()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 12, generator=g, dtype=torch.float64)
    u, s, vt = torch.linalg.svd(w)
    a0, b0 = u[:, :4] * s[:4], vt[:4]
    a, b, info = refit_target(w, a0, b0, st, "full", damping=0.0)
    assert info["method"] == "cholesky"
    best = _direct_error(w, a @ b, x, xt)
    assert abs(_rel_error(w, a @ b, st, float(((x @ w.T) ** 2).sum())) - best) < 1e-9
    assert best < _direct_error(w, a0 @ b0, x, xt)
    for trial in range(20):
        da = 1e-3 * torch.randn(a.shape, generator=g, dtype=torch.float64)
        db = 1e-3 * torch.randn(b.shape, generator=g, dtype=torch.float64)
        assert _direct_error(w, (a + da) @ (b + db), x, xt) >= best - 1e-12
        ra, rb = torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randn(4, 12, generator=g, dtype=torch.float64)
        assert _direct_error(w, ra @ rb, x, xt) > best


def test_output_and_drift_modes_keep_the_output_subspace():
    st, x, xt = _stats(seed=2)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, 12, generator=g, dtype=torch.float64)
    u, s, vt = torch.linalg.svd(w)
    a0, b0 = u[:, :4] * s[:4], vt[:4]
    a, b, _ = refit_target(w, a0, b0, st, "output", damping=0.0)
    assert torch.equal(a, a0)
    err = _direct_error(w, a @ b, x, xt)
    assert err < _direct_error(w, a0 @ b0, x, xt)
    for _ in range(10):  # the least-squares B: no perturbation of it does better
        db = 1e-3 * torch.randn(b.shape, generator=g, dtype=torch.float64)
        assert _direct_error(w, a @ (b + db), x, xt) >= err - 1e-12
    a, b, _ = refit_target(w, a0, b0, st, "drift", damping=0.0)
    assert torch.equal(a, a0)
    y0 = x @ (a0 @ b0).T  # drift: the compressed layer maps X~ to what it mapped X to, in least squares
    ls = torch.linalg.lstsq(xt, y0).solution.T
    assert torch.allclose(a @ b, ls, atol=1e-8)
    st_same = {"C": x.T @ x, "S": x.T @ x}  # nothing upstream changed: drift changes nothing
    a, b, _ = refit_target(w, a0, b0, st_same, "drift", damping=0.0)
    assert torch.allclose(a @ b, a0 @ b0, atol=1e-8)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("recipe", ["svd", "kfac-global"])
def test_block_refit_brings_outputs_closer_to_dense(family, recipe):
    """On a tiny model, ``full`` lowers every refit target's output error and the logits' distance to the dense
    model on the calibration windows; rank map and keep ratio are the same as without it."""
    ids = random_ids(8, 32)
    dense = make_model(family)
    ref = outputs(dense, ids)
    runs = {}
    for mode in ("off", "full"):
        model = make_model(family)
        cfg = CompressConfig(keep=0.5, recipe=recipe, calib_windows=8, seq_len=32, batch_size=4, fisher_windows=4,
                             block_refit=mode)
        ranklm.compress(model, None, cfg, data=ids, progress=False)
        runs[mode] = (model, float(((outputs(model, ids) - ref) ** 2).mean()))
    off, full = runs["off"][0], runs["full"][0]
    assert off.ranklm.rank_map == full.ranklm.rank_map
    assert off.ranklm.keep_achieved == full.ranklm.keep_achieved
    rec = full.ranklm.artifacts["block_refit"]
    assert rec["mode"] == "full" and rec["refit"] > 0
    assert rec["refit"] + rec["kept"] == sum(isinstance(m, LowRankLinear) for m in full.modules())
    for r in rec["per_target"].values():
        if "kept" not in r:
            assert r["after"] <= r["before"] + 1e-12
    assert rec["mean_rel_error_after"] < rec["mean_rel_error_before"]
    assert runs["full"][1] < runs["off"][1]
    assert "block_refit" not in runs["off"][0].ranklm.artifacts


def test_block_refit_cli_and_bad_input(capsys, tiny_llama_dir, text_file, tmp_path):
    from ranklm.cli import main

    with pytest.raises(RanklmError, match="block-refit"):
        CompressConfig(block_refit="sometimes")
    with pytest.raises(RanklmError, match="block-refit-damping"):
        CompressConfig(block_refit="full", block_refit_damping=-1.0)
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(text_file), "--keep", "0.6", "--recipe", "svd",
                 "--calib-windows", "4", "--seq-len", "32", "--batch-size", "2", "--block-refit", "output", "--no-eval",
                 "--output", str(tmp_path / "out"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "ranklm.json").read_text())
    assert meta["recipe"]["config"]["block_refit"] == "output"
    assert meta["artifacts"]["block_refit"]["refit"] > 0
    code = main(["compress", "--model", str(tiny_llama_dir), "--keep", "0.6", "--block-refit", "everything",
                 "--output", str(tmp_path / "bad")])
    out, err = capsys.readouterr()
    assert code != 0 and "--block-refit" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_block_refit_runs_after_learned_factors_and_before_healing(monkeypatch):
    """Learned factors (an allocator that hands back trained factors) are refit too, and ``heal`` trains on the
    refit model: the heal's step-0 validation is the refit model's."""
    from test_pipeline import _TrainedFactorsAllocator

    from ranklm.allocate import ALLOCATORS

    alloc = _TrainedFactorsAllocator()
    monkeypatch.setitem(ALLOCATORS, "trained-test", lambda **_: alloc)
    ids = random_ids(8, 32)
    model = make_model("llama")
    cfg = CompressConfig(keep=0.5, base="svd", allocator="trained-test", calib_windows=8, seq_len=32, batch_size=4,
                         block_refit="full", trainer="heal", trainer_options={"steps": 2, "eval_every": 1, "val_windows": 2})
    ranklm.compress(model, None, cfg, data=ids, progress=False, validation=ids[:2])
    rec = model.ranklm.artifacts["block_refit"]
    assert rec["refit"] == len(alloc.factors)  # random trained factors: the refit always improves on them
    for name, (a, b) in alloc.factors.items():
        assert not torch.equal(model.get_submodule(name).A.weight, a)
    assert model.ranklm.training[-1]["trainer"] == "heal"
    assert model.ranklm.timings["block_refit_s"] > 0
