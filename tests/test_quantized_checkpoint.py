"""Quantized checkpoints (issue 29) save and load with the in-memory model's logits everywhere a ranklm checkpoint
loads: ``ranklm.load``, ``from_pretrained`` with ranklm imported, ``trust_remote_code=True`` without ranklm;
plain transformers refuses; the codes on disk are packed; a damaged checkpoint is one clear error."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import ranklm
from conftest import make_model, outputs, random_ids
from ranklm import CompressConfig, LowRankLinear, RanklmError
from ranklm.hf import QuantizedLinear, RanklmQuantizationConfig
from ranklm.layers import replace_module
from ranklm.pipeline import run
from ranklm.quantize.apply import quantize_targets
from ranklm.targets import find_targets
from test_transformers_native import remote_code_load

BITS, GROUP = 4, 16
DENSE_TARGET = {"llama": "model.layers.1.mlp.up_proj", "gpt2": "transformer.h.1.attn.c_proj"}


def _quantized(family: str, bits: int = BITS, seed: int = 0) -> torch.nn.Module:
    """A tiny model, compressed (svd, keep 0.6), one target merged back to dense, every target quantized."""
    model = make_model(family)
    targets = find_targets(model)
    run(model, None, CompressConfig(keep=0.6, recipe="svd", seed=seed), random_ids(), progress=False)
    name = DENSE_TARGET[family]
    replace_module(model, name, model.get_submodule(name).to_dense())
    model.ranklm.rank_map[name] = "dense"
    quantize_targets(model, targets, {t.name: bits for t in targets}, GROUP)
    ranklm.hf.attach(model)  # refresh the quantization config (the pipeline does this for --quantize)
    return model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def saved(request, tmp_path_factory):
    family = request.param
    model = _quantized(family)
    path = tmp_path_factory.mktemp(f"q-{family}") / "ckpt"
    ranklm.save(model, None, path)
    return family, model, path


def _kinds(model: torch.nn.Module, family: str) -> tuple[type, type]:
    dense = model.get_submodule(DENSE_TARGET[family])
    factored = next(m for m in model.modules() if hasattr(m, "A") and hasattr(m, "B"))
    return type(dense), type(factored.A)


def test_ranklm_load_gives_the_same_logits(saved):
    family, model, path = saved
    ids = random_ids(2, 16)
    loaded, _ = ranklm.load(path)
    assert torch.equal(outputs(loaded, ids), outputs(model, ids))
    assert _kinds(loaded, family) == (QuantizedLinear, QuantizedLinear)
    dense = loaded.get_submodule(DENSE_TARGET[family])
    assert dense.source_kind == ("conv1d" if family == "gpt2" else "linear") and dense.bits == BITS
    assert isinstance(loaded.get_submodule(next(n for n, r in model.ranklm.rank_map.items() if r != "dense")),
                      LowRankLinear)
    assert ranklm.io.check_checkpoint(path)["rank_map"] == model.ranklm.rank_map


def test_config_markers_and_packed_codes_on_disk(saved):
    family, model, path = saved
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 3
    assert all(i["bits"] == BITS and i["group_size"] == GROUP for i in qc["modules"].values())
    dense_name = DENSE_TARGET[family]
    assert qc["modules"][dense_name]["rank"] == "dense"
    tensors = safetensors.torch.load_file(str(path / "model.safetensors"))
    assert tensors[f"{dense_name}.weight"].tolist() == [BITS]  # the guard of a quantized dense target
    info = qc["modules"][dense_name]
    assert tuple(tensors[f"{dense_name}.qweight"].shape) == (info["out"], math.ceil(info["in"] * BITS / 8))
    name, info = next((n, i) for n, i in qc["modules"].items() if i["rank"] != "dense")
    assert tensors[f"{name}.weight"].tolist() == [info["rank"]]  # rank marker
    b = tensors[f"{name}.B.qweight"]
    assert b.dtype == torch.uint8 and tuple(b.shape) == (info["rank"], math.ceil(info["in"] * BITS / 8))
    # A (out x rank): the group size divides out, not the rank, so A is grouped along its output (stored as A^T)
    assert info["rank"] % GROUP and not info["out"] % GROUP
    assert tuple(tensors[f"{name}.A.qweight"].shape) == (info["rank"], info["out"] * BITS // 8)
    a_scale = tensors[f"{name}.A.scale"]
    assert a_scale.dtype == torch.int16 and tuple(a_scale.shape) == (info["rank"], info["out"] // GROUP)
    assert tensors[f"{name}.A.zero"].dtype == torch.int8
    assert not any(k.endswith(".B.weight") or k.endswith(".A.weight") for k in tensors)
    card = (path / "README.md").read_text()
    assert f"int{BITS}" in card


def test_from_pretrained_with_ranklm_and_dtypes(saved, tmp_path):
    family, model, path = saved
    ids = random_ids(2, 16)
    ref = outputs(model, ids)
    native = AutoModelForCausalLM.from_pretrained(path)
    assert _kinds(native, family) == (QuantizedLinear, QuantizedLinear)
    assert torch.equal(outputs(native, ids), ref)
    saved_codes = {k: v for k, v in safetensors.torch.load_file(str(path / "model.safetensors")).items()
                   if k.endswith((".qweight", ".scale", ".zero"))}
    for dtype in (torch.bfloat16, torch.float32):
        cast = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        state = cast.state_dict()
        for k, v in saved_codes.items():  # integer buffers: untouched by dtype=
            assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
        assert all(p.dtype == dtype for p in cast.parameters())
    # save_pretrained of the loaded model keeps config, codes and markers: it reloads identically
    native.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(outputs(again, ids), ref)
    again, _ = ranklm.load(tmp_path / "again")
    assert torch.equal(outputs(again, ids), ref)
    mapped, _ = ranklm.load(path, device_map="cpu")
    assert torch.equal(outputs(mapped, ids), ref)


def test_without_ranklm_remote_code_loads_and_plain_loading_refuses(saved, tmp_path):
    family, model, path = saved
    ids = random_ids(2, 16)
    ref = outputs(model, ids)
    proc, got = remote_code_load(path, ids, "AutoModelForCausalLM", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PLAIN REFUSED" in proc.stdout and "PLAIN LOADED" not in proc.stdout
    assert not got["ranklm"] and {"FactoredLinear", "QuantizedLinear"} <= set(got["kinds"])
    assert torch.equal(got["out"], ref)


def _rewrite(path, edit) -> None:
    """Apply ``edit`` to the checkpoint's tensors (a damaged or hand-edited file)."""
    f = path / "model.safetensors"
    tensors = safetensors.torch.load_file(str(f))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(f), metadata={"format": "pt"})


def test_damaged_quantized_tensors_are_one_clear_error(tmp_path):
    model = _quantized("llama")
    name = next(n for n, r in model.ranklm.rank_map.items() if r != "dense")
    dense = DENSE_TARGET["llama"]
    cases = {
        "shape": (lambda t: t.__setitem__(f"{name}.A.qweight", t[f"{name}.A.qweight"][:, :-1].contiguous()),
                  rf"{name}\.A\.qweight is \[\d+, 31\] in the weights, rank \d+ at 4 bits, group size 16, of {name} needs"),
        "missing": (lambda t: t.pop(f"{dense}.zero"), rf"{dense}\.zero is missing from the weights"),
        "unexpected": (lambda t: t.__setitem__(f"{name}.A.extra", torch.zeros(3)), r"1 unexpected.*A\.extra"),
    }
    for case, (edit, message) in cases.items():
        path = tmp_path / case
        ranklm.save(model, None, path)
        _rewrite(path, edit)
        with pytest.raises(RanklmError, match=message) as err:
            ranklm.load(path, verify=False)
        assert "\n" not in str(err.value)
        if case != "unexpected":
            with pytest.raises(RanklmError, match=message):
                ranklm.io.check_checkpoint(path, verify=False)
            with pytest.raises(ValueError, match=message):
                AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unload_and_dense_export_restore_the_module_types(family, tmp_path):
    model = _quantized(family)
    ids = random_ids(2, 16)
    ref = outputs(model, ids)
    ranklm.save(model, None, tmp_path / "ck")
    kind = Conv1D if family == "gpt2" else torch.nn.Linear
    dense = ranklm.merge_and_unload(model)
    assert not any(isinstance(m, (LowRankLinear, QuantizedLinear)) for m in dense.modules())
    assert type(dense.get_submodule(DENSE_TARGET[family])) is kind
    assert all(p.dtype == torch.float32 for p in dense.parameters())
    torch.testing.assert_close(outputs(dense, ids), ref, rtol=1e-4, atol=1e-4)
    ranklm.io.export_dense(tmp_path / "ck", tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(outputs(plain, ids), ref, rtol=1e-4, atol=1e-4)
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    native.dequantize()  # transformers' own name: into the loaded dtype
    assert all(p.dtype == torch.bfloat16 for p in native.parameters())
    assert type(native.get_submodule(DENSE_TARGET[family])) is kind


def test_codes_cache_follows_loaded_weights():
    """A quantized model that already ran computes with new codes once they change: in place, or loaded
    (copied in, or assigned as new tensors)."""
    reference = _quantized("llama", bits=3)
    ids = random_ids(2, 16)
    want = outputs(reference, ids)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    for assign in (False, True):
        model = _quantized("llama", bits=3)
        assert torch.equal(outputs(model, ids), want)  # fills the caches
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, QuantizedLinear):
                    m.qweight.zero_()
        assert not torch.equal(outputs(model, ids), want)
        model.load_state_dict(state, assign=assign)
        assert torch.equal(outputs(model, ids), want)


def test_quantization_config_validation():
    base = {"rank": 4, "out": 8, "in": 8, "kind": "linear", "bias": False, "block": 0}
    assert RanklmQuantizationConfig({"x": base}).format_version == 2
    assert RanklmQuantizationConfig({"x": {**base, "bits": 4, "group_size": 8}}).format_version == 3
    for bad, message in (({"bits": 9, "group_size": 8}, "bad bits 9"), ({"bits": 4}, "bad group_size None"),
                         ({"bits": 1, "group_size": 8}, "bad bits 1")):
        with pytest.raises(ValueError, match=message):
            RanklmQuantizationConfig({"x": {**base, **bad}})
    with pytest.raises(ValueError, match="format_version 2 cannot describe"):
        RanklmQuantizationConfig({"x": {**base, "bits": 4, "group_size": 8}}, format_version=2)
    with pytest.raises(ValueError, match="format_version 4"):
        RanklmQuantizationConfig({"x": base}, format_version=4)


def test_quantized_weights_without_any_compression_record_are_refused(tmp_path):
    """A quantized folder whose config lost its quantization_config (and has no ranklm.json) is refused
    before any weights are read, as float factors are: never random layers."""
    from ranklm.loading.strict import ranklm_factor_names
    from ranklm.models import load_model
    from test_loading_strict import _without_quantization_config

    model = _quantized("llama")
    model.save_pretrained(tmp_path / "uploaded")
    _without_quantization_config(tmp_path / "uploaded")
    with pytest.raises(RanklmError, match=r"factors such as \S+\.A\.qweight\).* missing its ranklm.json"):
        load_model(str(tmp_path / "uploaded"))
    dense = DENSE_TARGET["llama"]
    assert ranklm_factor_names([f"{dense}.qweight", f"{dense}.scale", f"{dense}.zero"]) == [f"{dense}.qweight"]


def test_onnx_export_of_a_quantized_checkpoint_is_refused(tmp_path):
    from ranklm.checkpoint.onnx import export_onnx_model

    model = _quantized("llama")
    with pytest.raises(RanklmError, match="ONNX export of quantized checkpoints is not supported yet") as err:
        export_onnx_model(model, None, tmp_path / "onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "onnx").exists()
