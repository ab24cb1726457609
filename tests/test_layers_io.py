import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import ranklm
from conftest import FAMILIES, make_model, outputs, random_ids
from ranklm import CompressConfig, LowRankLinear, RanklmError
from ranklm.budget import DENSE


def test_low_rank_linear_forward_and_dense_roundtrip():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6)
    a, b = torch.randn(6, 3), torch.randn(3, 8)
    layer = LowRankLinear.from_factors(lin, a, b)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), x @ (a @ b).T + lin.bias)
    assert (layer.in_features, layer.out_features, layer.rank) == (8, 6, 3)
    dense = layer.to_dense()
    assert isinstance(dense, torch.nn.Linear)
    torch.testing.assert_close(dense(x), layer(x))


def test_low_rank_replaces_conv1d_with_same_semantics():
    torch.manual_seed(0)
    conv = Conv1D(6, 8)  # nf=out 6, nx=in 8; weight stored 8 x 6
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    w = conv.weight.T  # out x in
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    layer = LowRankLinear.from_factors(conv, u * s, vt)  # full rank: exact
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)
    back = layer.to_dense()
    assert isinstance(back, Conv1D)
    torch.testing.assert_close(back(x), conv(x), atol=1e-5, rtol=1e-5)


def test_dtype_is_kept():
    lin = torch.nn.Linear(8, 6).to(torch.bfloat16)
    layer = LowRankLinear.from_factors(lin, torch.randn(6, 2), torch.randn(2, 8))
    assert layer.A.weight.dtype == torch.bfloat16 and layer.B.weight.dtype == torch.bfloat16


def _column_major(layer):
    """A.weight (out x k) is a transposed view of a contiguous k x out tensor (docs in ranklm.layers)."""
    w = layer.A.weight
    return w.stride() == (1, w.shape[0])


def test_second_factor_is_stored_column_major_and_stays_so():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6)
    a, b = torch.randn(6, 3), torch.randn(3, 8)
    layer = LowRankLinear.from_factors(lin, a, b)
    assert _column_major(layer) and layer.B.weight.is_contiguous()
    assert torch.equal(layer.A.weight, a)  # same values, other layout
    assert _column_major(copy.deepcopy(layer).to(torch.float64))
    # a load that assigns the saved (contiguous) tensors gets the fast layout back, same outputs
    saved = {k: v.contiguous() for k, v in layer.state_dict().items()}
    assert saved["A.weight"].is_contiguous()
    fresh = LowRankLinear(8, 6, 3, device="meta")
    fresh.load_state_dict(saved, assign=True)
    assert _column_major(fresh)
    x = torch.randn(4, 8)
    assert torch.equal(fresh(x), layer(x))
    # training keeps working: gradients reach A in its own layout
    fresh(x).sum().backward()
    assert fresh.A.weight.grad is not None and fresh.A.weight.grad.shape == (6, 3)


def _compress(family, base="whiten", allocator="uniform", keep=0.5):
    model = make_model(family)
    ids = random_ids(8, 32)
    cfg = CompressConfig(keep=keep, base=base, allocator=allocator, seq_len=32, calib_windows=8)
    return ranklm.compress(model, None, cfg, data=ids, progress=False), ids


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_bit_identical(family, tmp_path):
    model, ids = _compress(family)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    ckpt = ranklm.save(model, None, tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "ranklm.json"} <= {p.name for p in ckpt.iterdir()}
    assert not list(tmp_path.glob("*.tmp-*"))
    loaded, _ = ranklm.load(ckpt)
    assert torch.equal(outputs(model, ids), outputs(loaded, ids))
    assert all(_column_major(m) for m in loaded.modules() if isinstance(m, LowRankLinear))
    meta = json.loads((ckpt / "ranklm.json").read_text())
    for key in ("keep_requested", "keep_achieved", "keep_achieved_model", "rank_map", "files", "recipe",
                "torch_version", "transformers_version", "ranklm_version", "calibration"):
        assert key in meta
    assert meta["keep_requested"] == 0.5 and meta["keep_achieved"] <= 0.5
    assert meta["recipe"]["base"] == "whiten"
    names = set(__import__("safetensors.torch").torch.load_file(ckpt / "model.safetensors"))
    assert any(n.endswith(".A.weight") for n in names) and any(n.endswith(".B.weight") for n in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_export_loads_with_plain_transformers(family, tmp_path):
    model, ids = _compress(family, base="svd", allocator="energy")
    ranklm.save(model, None, tmp_path / "ckpt")
    ranklm.export_dense(tmp_path / "ckpt", tmp_path / "dense")
    cls = AutoModel if family == "bert" else AutoModelForCausalLM
    plain = cls.from_pretrained(tmp_path / "dense").eval()
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    torch.testing.assert_close(outputs(plain, ids), outputs(model, ids), atol=1e-4, rtol=1e-4)


def test_compressed_output_is_close_at_high_keep_and_rank_map_records_dense():
    model = make_model("llama")
    ids = random_ids(8, 32)
    ref = outputs(model, ids)
    model = ranklm.compress(model, None, CompressConfig(keep=0.99, recipe="svd-llm", seq_len=32, calib_windows=8), data=ids, progress=False)
    assert DENSE in model.ranklm.rank_map.values()
    rel = (outputs(model, ids) - ref).norm() / ref.norm()
    assert float(rel) < 0.2


def test_compressing_twice_is_refused():
    model, _ = _compress("llama")
    with pytest.raises(RanklmError, match="already compressed"):
        ranklm.compress(model, None, CompressConfig(keep=0.5, seq_len=32), data=random_ids())


def test_keep_one_is_refused():
    with pytest.raises(RanklmError, match="nothing to compress"):
        ranklm.compress(make_model("llama"), None, CompressConfig(keep=1.0, seq_len=32), data=random_ids())


def test_nan_weight_is_named():
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(RanklmError, match="non-finite weights.*layers.1.mlp.up_proj"):
        ranklm.compress(model, None, CompressConfig(keep=0.5, seq_len=32), data=random_ids())


@pytest.fixture()
def saved(tmp_path):
    model, ids = _compress("llama")
    return ranklm.save(model, None, tmp_path / "ckpt")


def test_save_refuses_existing_output_and_overwrite_replaces(saved):
    model, _ = _compress("llama", keep=0.4)
    with pytest.raises(RanklmError, match="already exists"):
        ranklm.save(model, None, saved)
    ranklm.save(model, None, saved, overwrite=True)
    assert json.loads((saved / "ranklm.json").read_text())["keep_requested"] == 0.4
    assert not list(saved.parent.glob("*.tmp-*")) and not list(saved.parent.glob("*.old-*"))


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_checkpoint_modes_follow_the_umask_like_save_pretrained(tmp_path, umask, dir_mode, file_mode):
    import os
    import stat

    model, _ = _compress("llama")
    old = os.umask(umask)
    try:
        ckpt = ranklm.save(model, None, tmp_path / "ckpt")
        ranklm.save(model, None, ckpt, overwrite=True)  # the swapped-in folder too
        dense = ranklm.export_dense(ckpt, tmp_path / "dense")
    finally:
        os.umask(old)
    for folder in (ckpt, dense):
        assert stat.S_IMODE(folder.stat().st_mode) == dir_mode, folder  # mkdtemp alone gives 0700
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == file_mode, f


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model, _ = _compress("llama")
    import ranklm.checkpoint.writing as writing

    def boom(*a, **k):  # interrupted after the weights are written, before ranklm.json
        raise KeyboardInterrupt

    monkeypatch.setattr(writing, "sha256_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ranklm.save(model, None, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights_are_detected(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(RanklmError, match="hash mismatch"):
        ranklm.load(saved)
    with pytest.raises(RanklmError, match="corrupt or truncated"):
        ranklm.load(saved, verify=False)


def test_edited_weights_are_detected(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-8:] = bytes(8) if data[-8:] != bytes(8) else b"\x01" * 8  # same size, one value changed
    f.write_bytes(bytes(data))
    with pytest.raises(RanklmError, match="hash mismatch"):
        ranklm.load(saved)


def _edit_meta(ckpt: Path, fn):
    from conftest import edit_compression

    edit_compression(ckpt, fn)


def _load_both_ways(ckpt: Path, match: str) -> None:
    """ranklm.load and transformers' own from_pretrained (ranklm imported) refuse with the same cause."""
    with pytest.raises(RanklmError, match=match):
        ranklm.load(ckpt)
    with pytest.raises(Exception, match=match):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_rank_map_naming_a_missing_module(saved):
    def add(meta):
        meta["rank_map"]["model.layers.9.mlp.up_proj"] = 3
        meta["modules"]["model.layers.9.mlp.up_proj"] = {"out": 160, "in": 64, "kind": "linear"}

    _edit_meta(saved, add)
    _load_both_ways(saved, "does not (fit the model|match).*layers.9")


def test_rank_map_with_wrong_shape(saved):
    _edit_meta(saved, lambda m: m["modules"]["model.layers.0.mlp.up_proj"].update({"out": 99}))
    _load_both_ways(saved, "does not (fit the model|match).*up_proj")


def test_rank_map_with_wrong_rank(saved):
    def bump(meta):
        name = next(n for n, r in meta["rank_map"].items() if r != "dense")
        meta["rank_map"][name] += 1

    _edit_meta(saved, bump)
    _load_both_ways(saved, r"does not match its quantization_config: \S+\.A\.weight is \[\d+, \d+\] in the weights, rank")


def test_records_that_disagree_are_refused(saved):
    """ranklm.json and config.json's quantization_config must describe the same ranks."""
    meta = json.loads((saved / "ranklm.json").read_text())
    name = next(n for n, r in meta["rank_map"].items() if r != "dense")
    meta["rank_map"][name] += 1
    (saved / "ranklm.json").write_text(json.dumps(meta))
    with pytest.raises(RanklmError, match=f"ranklm.json gives {name} rank"):
        ranklm.load(saved)


def test_unknown_format_versions_and_missing_records(saved):
    _edit_meta(saved, lambda m: m.update({"format_version": 99}))
    with pytest.raises(RanklmError, match="format version 99"):
        ranklm.load(saved)
    (saved / "ranklm.json").unlink()  # what save_pretrained writes: loads from config.json alone
    model, _ = ranklm.load(saved)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["format_version"] = 7
    (saved / "config.json").write_text(json.dumps(config))
    _load_both_ways(saved, "format_version 7")
    del config["quantization_config"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(RanklmError, match="not a ranklm checkpoint"):
        ranklm.load(saved)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_with_dense_propagation_equals_whole_model(family):
    ids = random_ids(8, 32)
    outs = {}
    for sequential in (False, True):
        model = make_model(family)
        # the input-Gram route on both sides (the whole-model pass has no output route): this test is about propagation
        cfg = CompressConfig(keep=0.5, recipe="svd-llm", seq_len=32, calib_windows=8, sequential=sequential, propagate="dense",
                             base_options={"output_side": False})
        ranklm.compress(model, None, cfg, data=ids, progress=False)
        outs[sequential] = (outputs(model, ids), model.ranklm.rank_map)
    assert outs[True][1] == outs[False][1]
    torch.testing.assert_close(outs[True][0], outs[False][0], atol=1e-5, rtol=1e-5)


def test_sequential_compressed_propagation_meets_budget_and_differs():
    ids = random_ids(8, 32)
    model = make_model("llama")
    ref = make_model("llama")
    ranklm.compress(ref, None, CompressConfig(keep=0.5, recipe="svd-llm", seq_len=32, calib_windows=8, sequential=False), data=ids, progress=False)
    cfg = CompressConfig(keep=0.5, recipe="svd-llm", seq_len=32, calib_windows=8, sequential=True, propagate="compressed")
    ranklm.compress(model, None, cfg, data=ids, progress=False)
    assert 0.5 * 0.995 <= model.ranklm.keep_achieved <= 0.5
    assert not torch.allclose(outputs(model, ids), outputs(ref, ids))  # block 2 saw block 1's compressed outputs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sequential_whiten_factors_wide_targets_from_outputs_with_the_same_result(family):
    """svd-llm's default: targets with out <= in (down projection, k/v, q/o) from their output covariance; the
    compressed model matches the all-input-Gram route (output_side=False) and records the route."""
    ids = random_ids(8, 32)
    models = {}
    for side in (True, False):
        model = make_model(family)
        cfg = CompressConfig(keep=0.5, recipe="svd-llm", seq_len=32, calib_windows=8, sequential=True,
                             base_options={"output_side": side})
        ranklm.compress(model, None, cfg, data=ids, progress=False)
        models[side] = model
    numerics = models[True].ranklm.artifacts["numerics"]
    wide = {t.name for t in models[True].ranklm.targets if t.out_features <= t.in_features}
    assert wide and {n for n, r in numerics.items() if r["method"] == "output-eigh"} == wide
    assert all(r["method"] != "output-eigh" for r in models[False].ranklm.artifacts["numerics"].values())
    assert models[True].ranklm.rank_map == models[False].ranklm.rank_map
    torch.testing.assert_close(outputs(models[True], ids), outputs(models[False], ids), atol=1e-4, rtol=1e-4)
    t = models[True].ranklm.timings  # where the block-by-block pass spent its time (ranklm.json)
    split = [t["refit_statistics_s"], t["refit_on_block_s"], t["refit_propagate_s"]]
    assert all(v > 0 for v in split) and sum(split) <= t["refit_install_s"]


def test_sequential_refuses_gradient_bases():
    with pytest.raises(RanklmError, match="drop --sequential"):
        ranklm.compress(make_model("llama"), None, CompressConfig(keep=0.5, recipe="fwsvd", seq_len=32, sequential=True), data=random_ids())


def test_same_seed_same_result_bit_identical():
    results = []
    for _ in range(2):
        model = make_model("llama")
        ids = random_ids(16, 32, seed=4)
        cfg = CompressConfig(keep=0.6, recipe="svd-llm-v2", seq_len=32, calib_windows=6, seed=7)
        ranklm.compress(model, None, cfg, data=ids, progress=False)
        results.append((model.ranklm.rank_map, {k: v.clone() for k, v in model.state_dict().items()}))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


def test_sequential_is_automatic_for_activation_bases():
    from ranklm.pipeline import make_plan

    def plan(**kw):
        p = make_plan(CompressConfig(keep=0.5, **kw))
        return p.sequential, p.refit, p.needs_pass1

    assert plan(recipe="svd-llm") == (True, True, False)  # uniform reads shapes only: one block-by-block pass
    assert plan(base="whiten", allocator="energy", recipe=None) == (True, True, True)  # spectra first, then refit
    assert plan(recipe="svd-llm", propagate="dense") == (True, False, True)  # factor once, dense propagation
    assert plan(recipe="fwsvd") == (False, False, True)  # Fisher needs end-to-end gradients
    assert plan(recipe="svd") == (False, False, True)  # no statistics at all
    assert plan(recipe="svd-llm", sequential=False) == (False, False, True)
    with pytest.raises(RanklmError, match="sequential"):
        make_plan(CompressConfig(keep=0.5, recipe="fwsvd", sequential=True))