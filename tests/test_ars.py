"""ARS (learned masks from a hypernetwork) on tiny random models: budget, prefix form, resume, importance, I/O."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import ranklm
from ranklm.allocate import AllocationContext, get_allocator
from ranklm.api import decompose_targets
from ranklm.budget import TOLERANCE, keep_ratio
from ranklm.calibration import collect_stats
from ranklm.config import CompressConfig
from ranklm.decompose import get_base
from ranklm.errors import RanklmError
from ranklm.layers import LowRankLinear
from ranklm.targets import find_targets

from conftest import make_model, outputs, random_ids

torch.set_num_threads(1)


def _ars(model, keep, ids, base="svd", seed=0, **opts):
    """Run the ARS allocator directly; returns (rank_map, artifacts, targets)."""
    targets = find_targets(model)
    b = get_base(base)
    stats = collect_stats(model, targets, ids, b.needs, 4, progress=False) if b.needs else {}
    facts = decompose_targets(model, targets, b, stats, progress=False)
    ctx = AllocationContext(model=model, windows=ids, batch_size=4, seed=seed, progress=False)
    rank_map = get_allocator("ars", **opts).allocate(targets, facts, keep, 1, ctx)
    return rank_map, ctx.artifacts, targets


@pytest.mark.parametrize("keep", [0.7, 0.45])
def test_masks_learn_the_budget_themselves_and_end_as_prefixes(keep):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rank_map, art, targets = _ars(model, keep, random_ids(16, 32), steps=150)  # the CLI defaults otherwise
    h = art["ars"]["history"]
    assert len(h["keep"]) == 150
    assert h["keep"][0] > 0.9  # b = 3 starts near "keep all"
    # the masks themselves moved to the target (before any fit) and hold it
    assert abs(art["ars"]["keep_learned"] - keep) <= 0.03, art["ars"]["keep_learned"]
    assert max(h["keep"][-20:]) <= keep + 0.04
    assert art["ars"]["prefix_fraction_final"] == 1.0  # monotone logits (the default): every mask a top-k prefix
    # exact budget after fitting
    achieved = keep_ratio(targets, rank_map)
    assert keep * (1 - TOLERANCE) <= achieved <= keep
    # model restored untouched: same modules, same weights, weights trainable again
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_two_targets_learn_different_rank_maps():
    ids = random_ids(16, 32)
    maps = {k: _ars(make_model("llama"), k, ids, steps=100)[1]["ars"]["ranks_learned"] for k in (0.7, 0.45)}
    assert maps[0.7] != maps[0.45]
    assert sum(maps[0.7].values()) > sum(maps[0.45].values())


def test_monotone_logits_give_prefix_masks_by_construction():
    from ranklm.allocate.ars import monotone_logits

    o = torch.randn(50)
    lg = monotone_logits(o, 20.0)
    assert bool((lg[1:] <= lg[:-1] + 1e-6).all()) and float(lg[0] - lg[-1]) <= 20.0 + 1e-4


def test_paper_log_budget_term_is_still_available():
    _, art, _ = _ars(make_model("llama"), 0.6, random_ids(16, 32), steps=20, budget_loss="log", lr=1e-3)
    assert art["ars"]["options"]["budget_loss"] == "log"


def test_alignment_term_drives_masks_to_prefix_form():
    # b = 0 starts from random (non-prefix) masks; the alignment term must sort them, gamma = 0 must not
    runs = {}
    for gamma in (10.0, 0.0):
        _, art, _ = _ars(make_model("llama"), 0.6, random_ids(16, 32), steps=150, lr=1e-2, bias=0.0, gamma=gamma,
                         monotone=False, lr_schedule="constant", schedule=0.0)
        runs[gamma] = art["ars"]["history"]["prefix"]
    assert runs[10.0][0] <= 0.2 and runs[0.0][0] <= 0.2
    assert runs[10.0][-1] >= 0.8
    assert runs[10.0][-1] >= runs[0.0][-1] + 0.4


def test_resume_gives_the_same_rank_map(tmp_path):
    ids = random_ids(16, 32)
    opts = dict(lr=1e-2, batch_size=2)
    full_map, full_art, _ = _ars(make_model("llama"), 0.5, ids, steps=40, **opts)
    again_map, _, _ = _ars(make_model("llama"), 0.5, ids, steps=40, **opts)
    assert again_map == full_map  # deterministic with the seed
    other_seed, _, _ = _ars(make_model("llama"), 0.5, ids, steps=40, seed=1, **opts)
    assert other_seed != full_map  # the seed matters (noise, z, batches)

    state = tmp_path / "ars_state.safetensors"

    class Interrupt(Exception):
        pass

    calls = {"n": 0}

    def loss_fn(m, batch):  # interrupted at step 23 of 40: the state of step 20 is on disk
        calls["n"] += 1
        if calls["n"] == 23:
            raise Interrupt
        return m(input_ids=batch, labels=batch).loss

    with pytest.raises(Interrupt):
        _ars(make_model("llama"), 0.5, ids, steps=40, state_file=state, save_every=10, loss_fn=loss_fn, **opts)
    assert state.is_file()
    res_map, res_art, _ = _ars(make_model("llama"), 0.5, ids, steps=40, state_file=state, resume=True, loss_fn=loss_fn, **opts)
    assert res_map == full_map
    assert res_art["ars"]["history"]["keep"] == full_art["ars"]["history"]["keep"]
    for k, v in full_art.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, res_art[k]), k
    with pytest.raises(RanklmError, match="different run"):
        _ars(make_model("gpt2"), 0.5, ids, steps=40, state_file=state, resume=True, **opts)


def _important_layer_model(important: str, scale: float = 30.0):
    """Every target but one is exactly rank 4 (its other components are free to drop); ``important`` is
    full rank and scaled up; the LM head is sharpened. Calibration text = the model's own greedy
    continuations, so the dense model predicts it well and losing components of ``important`` hurts."""
    model = make_model("llama")
    with torch.no_grad():
        for t in find_targets(model):
            w = model.get_submodule(t.name).weight
            if t.name == important:
                w.mul_(scale)
            else:
                u, s, vt = torch.linalg.svd(w, full_matrices=False)
                w.copy_((u[:, :4] * s[:4]) @ vt[:4])
        model.lm_head.weight.mul_(20)
        ids = random_ids(32, 1, seed=5)
        for _ in range(31):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return model, ids


@pytest.mark.parametrize("base", ["svd", "whiten"])
def test_important_layer_gets_more_rank_than_uniform(base):
    important = "model.layers.1.mlp.down_proj"
    model, ids = _important_layer_model(important)
    results = {}
    for alloc, opts in (("uniform", {}), ("ars", dict(steps=150, lr=1e-2, batch_size=4))):
        m = copy.deepcopy(model)
        cfg = CompressConfig(keep=0.3, base=base, allocator=alloc, allocator_options=opts)
        ranklm.compress(m, None, cfg, data=ids, progress=False)
        with torch.no_grad():
            loss = float(m(input_ids=ids, labels=ids).loss)
        results[alloc] = (m.ranklm.rank_map[important], loss, m.ranklm.keep_achieved)
    # the layer that matters gets more rank (much more on plain SVD, where uniform ranks hurt it most)
    assert results["ars"][0] > results["uniform"][0] + (5 if base == "svd" else 0), results
    assert results["ars"][1] <= results["uniform"][1] + 1e-3, results  # and the LM loss is no worse
    assert 0.3 * (1 - TOLERANCE) <= results["ars"][2] <= 0.3


def test_compress_save_load_bit_identical(tmp_path):
    ids = random_ids(8, 32)
    model = make_model("llama")
    cfg = CompressConfig(keep=0.6, base="whiten", allocator="ars", allocator_options=dict(steps=15, lr=1e-2))
    ranklm.compress(model, None, cfg, data=ids, progress=False)
    factored = [k for k, v in model.ranklm.rank_map.items() if v != "dense"]
    assert factored and sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(factored)
    from ranklm.io import load, save

    ckpt = save(model, None, tmp_path / "ckpt2")
    meta = json.loads((ckpt / "ranklm.json").read_text())
    assert "allocator.safetensors" in meta["files"]
    ars_meta = meta["artifacts"]["ars"]
    assert ars_meta["step"] == 15 and len(ars_meta["history"]["keep"]) == 15
    assert ars_meta["ranks_learned"].keys() == meta["rank_map"].keys()
    loaded, _ = load(ckpt)
    assert torch.equal(outputs(model, ids), outputs(loaded, ids))
    masks = {k: v for k, v in loaded.ranklm.artifacts.items() if k.startswith("ars.mask.")}
    assert len(masks) == 14
    assert any(k.startswith("ars.hyper.heads.") for k in loaded.ranklm.artifacts)
    rec = meta["training"][0]
    assert meta["recipe"]["training"] == "ars" and rec["trainer"] == "ars" and rec["steps"] == 15
    assert {"keep_learned", "keep_after_fit", "prefix_fraction", "final_loss", "options"} <= set(rec)
    assert rec["keep_after_fit"] == meta["keep_achieved"]


def test_gpt2_conv1d_and_options():
    model = make_model("gpt2")
    ids = random_ids(8, 32)
    ref = outputs(model, ids)
    rank_map, art, targets = _ars(model, 0.5, ids, steps=5, lr=1e-2, tau=1.0, lam=4.0, gamma=1.0, batch_size=2,
                                  train_seq_len=16)
    assert art["ars"]["options"]["tau"] == 1.0 and art["ars"]["options"]["train_seq_len"] == 16
    assert torch.equal(outputs(model, ids), ref)  # original Conv1D modules restored
    assert 0.5 * (1 - TOLERANCE) <= keep_ratio(targets, rank_map) <= 0.5
    with pytest.raises(RanklmError):
        get_allocator("ars", tau=0.0)


def test_encoder_default_loss_is_hidden_state_distillation():
    from ranklm.train.distill import hidden_state_distillation

    model = make_model("bert")
    ids = random_ids(8, 32)
    loss = hidden_state_distillation(model, ids)
    assert float(loss(model, ids[:2])) == 0.0  # the dense model matches itself
    rank_map, art, targets = _ars(model, 0.5, ids, steps=3)
    assert len(art["ars"]["history"]["loss"]) == 3 and all(v > 0 for v in art["ars"]["history"]["loss"])
    assert 0.5 * (1 - TOLERANCE) <= keep_ratio(targets, rank_map) <= 0.5

    def loss_fn(m, batch):  # e.g. a probe/MLM loss supplied by the caller
        return m(input_ids=batch).last_hidden_state.pow(2).mean()

    rank_map, art, targets = _ars(model, 0.5, ids, steps=3, loss_fn=loss_fn)
    assert len(art["ars"]["history"]["loss"]) == 3
    assert keep_ratio(targets, rank_map) <= 0.5


def test_finetune_factors_lowers_the_loss():
    from ranklm.train import finetune_factors

    ids = random_ids(8, 32)
    model = make_model("llama")
    ranklm.compress(model, None, CompressConfig(keep=0.5, recipe="svd"), progress=False)
    with torch.no_grad():
        before = float(model(input_ids=ids, labels=ids).loss)
    hist = finetune_factors(model, ids, steps=30, lr=1e-2, batch_size=8, progress=False)
    with torch.no_grad():
        after = float(model(input_ids=ids, labels=ids).loss)
    assert len(hist) == 30 and after < before - 0.1


def test_plot_rank_map(tmp_path):
    from ranklm.io import save
    from ranklm.report import plot_rank_map
    from ranklm.report.plot import rank_series

    model = make_model("llama")
    ranklm.compress(model, None, CompressConfig(keep=0.5, recipe="svd"), progress=False)
    ckpt = save(model, None, tmp_path / "ckpt")
    meta = json.loads((ckpt / "ranklm.json").read_text())
    series = rank_series(meta)
    assert set(series) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert [p[0] for p in series["mlp.up_proj"]] == [0, 1]
    png = plot_rank_map(meta, tmp_path / "ranks.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_ars_finetune_and_plot(capsys, tiny_llama_dir, text_file, tmp_path):
    from ranklm.cli import main

    fast = ["--calib-windows", "4", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--batch-size", "2"]
    out_dir = tmp_path / "ckpt"
    args = ["compress", "--model", tiny_llama_dir, "--data", text_file, "--keep", "0.6", "--base", "whiten",
            "--allocator", "ars", "--alloc-opt", "steps=6", "--alloc-opt", "lr=0.01", "--state-dir", tmp_path / "state",
            "--trainer", "finetune", "--train-opt", "steps=3", "--output", out_dir, *fast, "--json"]
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["allocator"] == "ars" and 0.6 * (1 - TOLERANCE) <= summary["keep_achieved"] <= 0.6
    meta = json.loads((out_dir / "ranklm.json").read_text())
    assert meta["artifacts"]["ars"]["options"]["steps"] == 6
    assert [r["trainer"] for r in meta["training"]] == ["ars", "finetune"] and meta["recipe"]["training"] == "ars+finetune"
    assert len(meta["training"][1]["history"]["loss"]) == 3 and meta["training"][1]["final_loss"] is not None
    assert {"keep_learned", "prefix_fraction"} <= set(summary)
    assert "learned keep" in err
    assert (tmp_path / "state" / "ars.safetensors").is_file() and (tmp_path / "state" / "finetune.safetensors").is_file()

    code = main(["plot", str(out_dir), "--output", str(tmp_path / "r.png")])
    capsys.readouterr()
    assert code == 0 and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(text_file), "--train-opt", "steps=3", *fast])
    _, err = capsys.readouterr()
    assert code == 2 and "--trainer" in err


def test_finetune_resume_reproduces_the_uninterrupted_run(tmp_path):
    from ranklm.train import finetune_factors

    ids = random_ids(8, 32)

    def fresh(keep=0.5):
        m = make_model("llama")
        ranklm.compress(m, None, CompressConfig(keep=keep, recipe="svd"), progress=False)
        return m

    full = fresh()
    hist_full = finetune_factors(full, ids, steps=6, lr=1e-2, batch_size=4, progress=False)
    half, state = fresh(), tmp_path / "ft.safetensors"
    finetune_factors(half, ids, steps=3, lr=1e-2, batch_size=4, progress=False, save_state=state)
    resumed = fresh()  # a new process would start from the freshly compressed model
    hist = finetune_factors(resumed, ids, steps=6, lr=1e-2, batch_size=4, progress=False, resume=state)
    assert hist == hist_full
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(RanklmError, match="different run.*params"):
        finetune_factors(fresh(keep=0.3), ids, steps=6, lr=1e-2, batch_size=4, progress=False, resume=state)
    with pytest.raises(RanklmError, match="different run.*lr"):
        finetune_factors(fresh(), ids, steps=6, lr=1e-3, batch_size=4, progress=False, resume=state)
