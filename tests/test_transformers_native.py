"""A ranklm checkpoint loads in transformers itself: with ranklm imported, with remote code, or refuses; never random layers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

import ranklm
from conftest import VOCAB, make_model, outputs, random_ids
from ranklm import CompressConfig, LowRankLinear, RanklmError

AUTO = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "opt": AutoModelForCausalLM, "bert": AutoModel}


def _compressed(family: str) -> torch.nn.Module:
    model = make_model(family)
    cfg = CompressConfig(keep=0.5, base="whiten", allocator="uniform", seq_len=32, calib_windows=8)
    return ranklm.compress(model, None, cfg, data=random_ids(8, 32), progress=False)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=["llama", "gpt2", "opt", "bert"])
def saved(request, tmp_path_factory):
    family = request.param
    model = _compressed(family)
    path = tmp_path_factory.mktemp(family) / "ckpt"
    ranklm.save(model, None, path)
    return family, model, path


def test_from_pretrained_equals_ranklm_load(saved):
    family, model, path = saved
    ids = random_ids(2, 16)
    loaded, _ = ranklm.load(path)
    native = AUTO[family].from_pretrained(path)
    assert any(isinstance(m, LowRankLinear) for m in native.modules())
    ref = outputs(loaded, ids)
    assert _rel_err(outputs(native, ids), ref) <= 1e-6
    assert torch.equal(ref, outputs(model, ids))


def test_config_json_carries_the_compression(saved):
    family, model, path = saved
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "ranklm" and qc["format_version"] == 2
    ranks = {n: i["rank"] for n, i in qc["modules"].items()}
    assert ranks == json.loads((path / "ranklm.json").read_text())["rank_map"]
    assert (path / "modeling_ranklm.py").is_file() and config["auto_map"]
    card = (path / "README.md").read_text()
    assert card.startswith("---") and "library_name: transformers" in card and "ranklm" in card


def test_save_pretrained_round_trip_and_dtype(saved, tmp_path):
    family, model, path = saved
    native = AUTO[family].from_pretrained(path)
    native.save_pretrained(tmp_path / "again")
    again = AUTO[family].from_pretrained(tmp_path / "again")
    ids = random_ids(2, 16)
    assert torch.equal(outputs(again, ids), outputs(native, ids))
    half = AUTO[family].from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    mapped, _ = ranklm.load(path, device_map="cpu")
    assert torch.equal(outputs(mapped, ids), outputs(native, ids))


def _without_ranklm(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that refuses to import ranklm."""
    guard = textwrap.dedent("""
        import sys
        class _NoRanklm:
            def find_spec(self, name, path=None, target=None):
                if name == "ranklm" or name.startswith("ranklm."):
                    raise ImportError("ranklm is not installed in this process")
        sys.meta_path.insert(0, _NoRanklm())
    """)
    return subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=1200)  # a fresh venv compiles lm-eval and datasets on first import


def remote_code_load(path, ids, auto_name: str, tmp_path) -> tuple[subprocess.CompletedProcess, dict]:
    """Load checkpoint ``path`` in a process without ranklm: plain ``from_pretrained`` (which must refuse), then
    ``trust_remote_code=True``; returns the process and {"kinds": module class names, "ranklm": imported?,
    "out": logits or hidden states on ``ids``} (float32 values survive JSON exactly)."""
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    code = f"""
        import json, sys, torch
        from transformers import {auto_name} as Auto
        ids = torch.tensor(json.loads(open({str(tmp_path / 'ids.json')!r}).read()))
        try:
            Auto.from_pretrained({str(path)!r})
            print("PLAIN LOADED")
        except Exception as e:
            print("PLAIN REFUSED", type(e).__name__)
        m = Auto.from_pretrained({str(path)!r}, trust_remote_code=True)
        kinds = sorted({{type(x).__name__ for x in m.modules()}})
        with torch.no_grad():
            out = m(input_ids=ids)
        t = out.logits if hasattr(out, "logits") else out.last_hidden_state
        json.dump({{"kinds": kinds, "ranklm": any(k.startswith("ranklm") for k in sys.modules), "out": t.tolist()}},
                  open({str(tmp_path / 'out.json')!r}, "w"))
    """
    proc = _without_ranklm(code)
    got = json.loads((tmp_path / "out.json").read_text()) if proc.returncode == 0 else {}
    if got:
        got["out"] = torch.tensor(got["out"])
    return proc, got


def test_without_ranklm_remote_code_loads_and_plain_loading_refuses(saved, tmp_path):
    family, model, path = saved
    ids = random_ids(2, 16)
    ref = outputs(model, ids)
    proc, got = remote_code_load(path, ids, AUTO[family].__name__, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PLAIN REFUSED" in proc.stdout and "PLAIN LOADED" not in proc.stdout
    assert not got["ranklm"] and "FactoredLinear" in got["kinds"]
    assert _rel_err(got["out"], ref) <= 1e-6


def test_sharded_save_and_load(tmp_path):
    model = _compressed("llama")
    ranklm.save(model, None, tmp_path / "ck", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "ck").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "ck" / "model.safetensors.index.json").is_file()
    files = json.loads((tmp_path / "ck" / "ranklm.json").read_text())["files"]
    assert set(shards) <= set(files)  # a hash per shard
    ids = random_ids(2, 16)
    loaded, _ = ranklm.load(tmp_path / "ck")
    assert torch.equal(outputs(loaded, ids), outputs(model, ids))
    assert torch.equal(outputs(AutoModelForCausalLM.from_pretrained(tmp_path / "ck"), ids), outputs(model, ids))
    shard = tmp_path / "ck" / shards[1]
    shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))
    with pytest.raises(RanklmError, match="hash mismatch"):
        ranklm.load(tmp_path / "ck")


def test_merge_and_unload_gives_a_plain_dense_model(tmp_path):
    model = _compressed("llama")
    ids = random_ids(2, 16)
    ref = outputs(model, ids)
    dense = ranklm.merge_and_unload(model)
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    assert not hasattr(dense.config, "quantization_config") and not hasattr(dense, "ranklm")
    torch.testing.assert_close(outputs(dense, ids), ref, rtol=1e-4, atol=1e-5)
    dense.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


def test_encoder_classifier_loads_with_its_auto_class(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                                     num_attention_heads=4, vocab_size=VOCAB, num_labels=2)).eval()
    cfg = CompressConfig(keep=0.5, base="svd", allocator="uniform")
    ranklm.compress(model, None, cfg, progress=False)
    ranklm.save(model, None, tmp_path / "ck")
    assert "AutoModelForSequenceClassification" in json.loads((tmp_path / "ck" / "config.json").read_text())["auto_map"]
    native = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ck")
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(native(input_ids=ids).logits, model(input_ids=ids).logits)


def test_packaged_model_loads_natively(tmp_path):
    """The real packaged model (SmolLM2-135M), a few compressed projections: same logits both ways."""
    from ranklm.models import load_model

    model, tok, _ = load_model(None)
    cfg = CompressConfig(keep=0.5, base="svd", allocator="uniform", include=["layers.0.self_attn.*"])
    ranklm.compress(model, tok, cfg, progress=False)
    ranklm.save(model, tok, tmp_path / "ck")
    ids = tok("To be, or not to be, that is the question", return_tensors="pt").input_ids
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    loaded, _ = ranklm.load(tmp_path / "ck")
    with torch.no_grad():
        a, b, c = native(ids).logits, loaded(ids).logits, model(ids).logits
    assert _rel_err(a, b) <= 1e-6 and torch.equal(b, c)


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_llama_dir):
    from ranklm.models import load_model

    model, tok, _ = load_model(str(tiny_llama_dir))
    ranklm.compress(model, tok, CompressConfig(keep=0.5, recipe="svd"), progress=False)
    ranklm.save(model, tok, tmp_path / "svd-0.5")
    return tmp_path / "svd-0.5"


def test_lm_eval_plain_hf_model_type_agrees_with_the_bridge(tiny_ckpt, tmp_path, monkeypatch):
    """``lm_eval --model hf --model_args pretrained=CKPT,trust_remote_code=True`` in a process without
    ranklm scores the checkpoint as ``ranklm evaluate --lm-eval`` (the in-memory bridge) does."""
    pytest.importorskip("lm_eval")
    from conftest import TEXT
    from ranklm.eval.lm_eval_bridge import lm_eval_tasks, write_local_task

    for var, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"),
                       ("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))):
        monkeypatch.setenv(var, value)
    task_dir = write_local_task([TEXT * 2, TEXT[100:] + TEXT], tmp_path / "tasks", name="ranklm_native_ppl")
    model, tok = ranklm.load(tiny_ckpt)
    bridge = lm_eval_tasks(model, tok, ["ranklm_native_ppl"], include_path=task_dir)["ranklm_native_ppl"]
    code = f"""
        import json, lm_eval
        from lm_eval.tasks import TaskManager
        res = lm_eval.simple_evaluate(model="hf", model_args="pretrained={tiny_ckpt},trust_remote_code=True",
                                      tasks=["ranklm_native_ppl"], task_manager=TaskManager(include_path={str(task_dir)!r}),
                                      bootstrap_iters=0, log_samples=False, device="cpu")
        import sys
        assert not any(k.startswith("ranklm") for k in sys.modules)
        print("RESULT", json.dumps(res["results"]["ranklm_native_ppl"]["bits_per_byte,none"]))
    """
    proc = _without_ranklm(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert plain == pytest.approx(bridge["bits_per_byte"], rel=1e-6)


def test_disk_offload_through_device_map(tmp_path):
    """A block offloaded to disk by accelerate (device_map) still gives the saved model's logits."""
    model = _compressed("llama")
    ranklm.save(model, None, tmp_path / "ck")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", device_map=device_map, offload_folder=tmp_path / "off")
    assert isinstance(native.model.layers[1].self_attn.q_proj, LowRankLinear)
    assert native.model.layers[1].self_attn.q_proj.B.weight.is_meta  # really offloaded, loaded per forward
    ids = random_ids(2, 16)
    assert torch.equal(outputs(native, ids), outputs(model, ids))
    loaded, _ = ranklm.load(tmp_path / "ck", device_map=device_map)
    assert torch.equal(outputs(loaded, ids), outputs(model, ids))


def test_model_card_names_the_command_and_the_perplexity(tiny_llama_dir, text_file, tmp_path, capsys):
    from ranklm.cli import main

    args = ["compress", str(tiny_llama_dir), "--data", str(text_file), "--keep", "0.6", "--recipe", "svd",
            "--calib-windows", "2", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2",
            "--output", str(tmp_path / "ck")]
    assert main(args) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "ck" / "ranklm.json").read_text())
    assert meta["command"].startswith("ranklm compress ") and "--keep 0.6" in meta["command"]
    card = (tmp_path / "ck" / "README.md").read_text()
    ppl = meta["evaluation"]["compressed"]["ppl"]
    assert f"| perplexity | {ppl:.3f}" in card and meta["command"] in card
    assert "keep requested / achieved (targets) | 0.6 /" in card


@pytest.mark.parametrize("first", ["import ranklm.hf", "import ranklm.checkpoint.onnx", "import ranklm; import transformers",
                                   "import transformers; import ranklm"])
def test_registration_whatever_imports_transformers_first(first):
    """A fresh process: whichever import brings transformers in, quant_method ranklm ends up registered."""
    code = (f"{first}\nfrom transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
            "assert 'ranklm' in AUTO_QUANTIZER_MAPPING, sorted(AUTO_QUANTIZER_MAPPING)\nprint('OK')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
