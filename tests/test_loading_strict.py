"""Every first run works: model paths, strict weight loading, tokenizers, model kinds, positions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    RobertaConfig,
)

import ranklm
import ranklm.loading.paths as model_paths
import ranklm.models as models
from conftest import make_model, random_ids
from ranklm import CompressConfig, RanklmError
from ranklm.architectures import has_lm_head, is_causal_lm, is_causal_lm_config, max_positions
from ranklm.eval.perplexity import perplexity
from ranklm.models import check_loading_info, config_is_encoder, load_classifier, load_model, resolve_model_path


def _no_probe(repo_id):
    raise AssertionError(f"the hub was asked about {repo_id}")


@pytest.fixture()
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    model_paths._HUB_PROBES.clear()
    return cache


# --------------------------------------------------------------------------- 1. model paths


def test_relative_path_typo_fails_at_once_naming_it(tmp_path, monkeypatch, empty_hub_cache):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(model_paths, "_hub_probe", _no_probe)
    with pytest.raises(RanklmError, match=r"models/nope does not exist"):
        resolve_model_path("models/nope")
    with pytest.raises(RanklmError, match="does not exist"):
        resolve_model_path("./models/nope")


def test_uncached_hub_id_offline_fails_without_asking_the_hub(tmp_path, monkeypatch, empty_hub_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_paths, "_hub_probe", _no_probe)
    with pytest.raises(RanklmError, match=r"org/name is not a local folder and not in the Hugging Face cache \(HF_HUB_OFFLINE"):
        resolve_model_path("org/name")


def test_uncached_hub_id_probe_decides(tmp_path, monkeypatch, empty_hub_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(model_paths, "_hub_probe", lambda repo: "the hub is unreachable: ConnectError")
    with pytest.raises(RanklmError, match=r"not in the Hugging Face cache \(the hub is unreachable"):
        load_model("org/name")
    monkeypatch.setattr(model_paths, "_hub_probe", lambda repo: None)  # online, the hub has it: transformers downloads it
    assert resolve_model_path("org/name") == ("org/name", False)


def test_hub_probe_makes_one_request_and_reports_unreachable(monkeypatch, empty_hub_cache):
    import huggingface_hub

    calls = []

    def model_info(self, repo_id, timeout=None, **kw):
        calls.append((repo_id, timeout))
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    assert model_paths._hub_probe("org/x") == "the hub is unreachable: ConnectionError"
    assert model_paths._hub_probe("org/x") == "the hub is unreachable: ConnectionError"
    assert calls == [("org/x", model_paths.HUB_PROBE_TIMEOUT)]


def test_cached_hub_id_resolves_to_its_snapshot(tmp_path, monkeypatch, empty_hub_cache, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(model_paths, "_hub_probe", _no_probe)
    repo = empty_hub_cache / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for f in tiny_llama_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    path, local = resolve_model_path("org/tiny")
    assert Path(path) == snap and local
    m, tok, info = load_model("org/tiny")
    assert info["name_or_path"] == "org/tiny" and tok is not None and "model.safetensors" in info["weights_sha256"]


# --------------------------------------------------------------------------- 2. strict weights


def _compressed(family: str):
    model = make_model(family)
    cfg = CompressConfig(keep=0.5, base="whiten", allocator="uniform", seq_len=32, calib_windows=8)
    return ranklm.compress(model, None, cfg, data=random_ids(8, 32), progress=False)


def _without_quantization_config(folder: Path) -> None:
    """What ``save_pretrained`` wrote before checkpoint format 2: factors, and a config without the compression."""
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))


def test_save_pretrained_of_a_compressed_model_loads_back(tmp_path, tiny_tokenizer):
    d = tmp_path / "uploaded"
    model = _compressed("llama")
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    assert not (d / "ranklm.json").exists()
    loaded, tok, info = load_model(str(d))
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert info["checkpoint"] and tok is not None


def test_factors_without_any_compression_record_are_refused(tmp_path, monkeypatch, tiny_tokenizer):
    d = tmp_path / "uploaded"
    _compressed("llama").save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    _without_quantization_config(d)
    with pytest.raises(RanklmError, match=r"ranklm-compressed weights \(factors such as model\.layers\.0\.\S+\.A\.weight\).* missing its ranklm.json"):
        load_model(str(d))
    # without that check, the rank markers (<target>.weight, int32 [rank]) stop transformers' own loader
    monkeypatch.setattr(models, "refuse_factored_folder", lambda path: None)
    with pytest.raises(RanklmError, match="cannot load the model weights.*ignore_mismatched_sizes"):
        load_model(str(d))


def test_factors_without_any_compression_record_are_refused_as_classifier(tmp_path):
    d = tmp_path / "bert-compressed"
    _compressed("bert").save_pretrained(d)
    _without_quantization_config(d)
    with pytest.raises(RanklmError, match="missing its ranklm.json"):
        load_classifier(str(d), ["neg", "pos"])


def _drop_and_add(folder: Path, drop: str | None = None, add: str | None = None) -> None:
    f = folder / "model.safetensors"
    state = safetensors.torch.load_file(str(f))
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    safetensors.torch.save_file(state, str(f), metadata={"format": "pt"})


def test_missing_or_unexpected_weights_are_errors_naming_keys(tmp_path):
    d = tmp_path / "llama"
    make_model("llama").save_pretrained(d)
    load_model(str(d))  # complete: loads
    _drop_and_add(d, drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(RanklmError, match=r"1 missing .*model.layers.1.mlp.up_proj.weight"):
        load_model(str(d))
    d2 = tmp_path / "llama2"
    make_model("llama").save_pretrained(d2)
    _drop_and_add(d2, add="model.layers.0.extra.weight")
    with pytest.raises(RanklmError, match=r"1 unexpected .*model.layers.0.extra.weight"):
        load_model(str(d2))


def test_tied_weights_are_not_missing(tmp_path):
    d = tmp_path / "gpt2"
    g = make_model("gpt2")
    assert g.lm_head.weight is g.transformer.wte.weight
    g.save_pretrained(d)
    m, _, _ = load_model(str(d))
    assert m.lm_head.weight is m.transformer.wte.weight
    # what default_model_dir checks after load_state_dict(strict=False): the tied head is fine, a block weight is not
    check_loading_info("x", g, {"missing_keys": ["lm_head.weight"], "unexpected_keys": []})
    with pytest.raises(RanklmError, match="transformer.h.0.attn.c_attn.weight"):
        check_loading_info("x", g, {"missing_keys": ["transformer.h.0.attn.c_attn.weight"], "unexpected_keys": []})


def test_classifier_new_head_is_allowed_but_not_a_missing_encoder_weight(tmp_path):
    d = tmp_path / "bert"
    make_model("bert").save_pretrained(d)
    m, tok, info = load_classifier(str(d), ["neg", "pos"])  # a new head: fine
    assert m.config.id2label == {0: "neg", 1: "pos"}
    _drop_and_add(d, drop="encoder.layer.1.output.dense.weight")
    with pytest.raises(RanklmError, match="encoder.layer.1.output.dense.weight"):
        load_classifier(str(d), ["neg", "pos"])


def test_classifier_with_its_own_head_must_load_completely(tmp_path):
    d = tmp_path / "cls"
    cfg = BertConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                     num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    BertForSequenceClassification(cfg).save_pretrained(d)
    load_classifier(str(d), ["neg", "pos"])  # same labels, own head: loads
    load_classifier(str(d), ["a", "b", "c"])  # other labels: a new head (resized), fine
    _drop_and_add(d, drop="classifier.weight")
    with pytest.raises(RanklmError, match="classifier.weight"):
        load_classifier(str(d), ["neg", "pos"])


# --------------------------------------------------------------------------- 3. tokenizers


def test_tokenizer_files_that_do_not_load_are_an_error(tmp_path, tiny_llama_dir):
    d = tmp_path / "broken-tok"
    d.mkdir()
    for f in tiny_llama_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "tokenizer.json").write_text("{ not json")
    with pytest.raises(RanklmError, match=rf"cannot load the tokenizer in {d}: "):
        load_model(str(d))
    nothing = tmp_path / "no-tok"
    make_model("llama").save_pretrained(nothing)
    assert load_model(str(nothing))[1] is None  # no tokenizer files: None, "tokenizer missing" later


def test_checkpoint_with_a_corrupt_tokenizer_is_an_error(tmp_path, tiny_tokenizer):
    ckpt = ranklm.save(_compressed("llama"), tiny_tokenizer, tmp_path / "ckpt")
    assert ranklm.load(ckpt)[1] is not None
    (ckpt / "tokenizer.json").write_text("{ not json")
    with pytest.raises(RanklmError, match="cannot load the tokenizer in"):
        ranklm.load(ckpt)


# --------------------------------------------------------------------------- 4. encoder detection


def _mlm() -> BertForMaskedLM:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                     max_position_embeddings=256)
    return BertForMaskedLM(cfg).eval()


def test_config_is_encoder(tmp_path, tiny_llama_dir, monkeypatch):
    mlm = tmp_path / "mlm"
    _mlm().save_pretrained(mlm)
    assert config_is_encoder(str(mlm)) and not config_is_encoder(str(tiny_llama_dir)) and not config_is_encoder(None)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{ oops")
    (bad / "model.safetensors").write_bytes(b"")
    assert config_is_encoder(str(bad)) is False  # load_model reports the unreadable config itself
    with pytest.raises(RanklmError, match="does not exist"):
        config_is_encoder(str(tmp_path / "missing"))

    def boom(*a, **k):
        raise RuntimeError("a bug, not a bad config")

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        config_is_encoder(str(tiny_llama_dir))


# --------------------------------------------------------------------------- 5. masked LMs


def test_masked_lm_is_not_a_causal_lm():
    mlm = _mlm()
    assert not has_lm_head(mlm) and not is_causal_lm(mlm)
    assert all(is_causal_lm(make_model(f)) for f in ("llama", "gpt2", "opt"))
    with pytest.raises(RanklmError, match="perplexity needs a causal language model; BertForMaskedLM has a masked-LM head"):
        perplexity(mlm, random_ids(2, 16), progress=False)
    assert CompressConfig(keep=0.5).for_model(mlm).recipe == "svd-llm"  # the encoder route
    from ranklm.calibration.fisher import lm_loss

    with pytest.raises(RanklmError):
        lm_loss(mlm, random_ids(2, 16))
    assert not is_causal_lm_config(BertConfig(architectures=["BertForMaskedLM"]))
    assert not is_causal_lm_config(BertConfig(architectures=["BertForPreTraining"]))
    assert is_causal_lm_config(BertConfig(architectures=["BertLMHeadModel"]))
    assert is_causal_lm_config(LlamaConfig(architectures=["LlamaForCausalLM"]))


# --------------------------------------------------------------------------- 8. positions


def test_max_positions():
    assert max_positions(GPT2Config(n_positions=128, n_layer=1, n_embd=32, n_head=2)) == 128
    assert max_positions(LlamaConfig(max_position_embeddings=4096)) == 4096
    assert max_positions(BertConfig(max_position_embeddings=512)) == 512
    assert max_positions(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert max_positions(make_model("llama").config) == 256

    class NoLimit:
        model_type = "custom"

    assert max_positions(NoLimit()) is None


def test_ranklm_load_takes_a_cached_hub_id(tmp_path, monkeypatch, empty_hub_cache):
    """A checkpoint pushed to the hub and downloaded into the cache loads by its id, with dtype."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(model_paths, "_hub_probe", _no_probe)
    model = _compressed("llama")
    ranklm.save(model, None, tmp_path / "ck")
    repo = empty_hub_cache / "models--org--tiny-ranklm"
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    for f in (tmp_path / "ck").iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    loaded, _ = ranklm.load("org/tiny-ranklm")
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    half, _ = ranklm.load("org/tiny-ranklm", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(RanklmError, match="not in the Hugging Face cache"):
        ranklm.load("org/absent")
