"""The CLI end to end on a tiny local model, and every bad input: one line, exit 2, nothing written."""

import json
import shutil

import pytest

from ranklm.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--calib-windows", "4", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--batch-size", "2"]


def test_compress_info_evaluate_export(capsys, tiny_llama_dir, text_file, tmp_path):
    out_dir = tmp_path / "ckpt"
    code, out, err = run(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--keep", "0.6",
                         "--output", out_dir, *FAST, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["keep_requested"] == 0.6 and 0.6 * 0.995 <= summary["keep_achieved"] <= 0.6
    assert summary["ppl_dense"] > 1 and summary["ppl_compressed"] > 1
    assert (out_dir / "ranklm.json").is_file()

    code, out, err = run(capsys, "info", out_dir)
    assert code == 0 and "kfac-global" in out and "model.layers.0.mlp.up_proj" in out

    code, out, err = run(capsys, "evaluate", out_dir, "--data", text_file, "--seq-len", "32", "--windows", "3", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert {"ppl", "tokens", "windows", "seq_len", "params"} <= set(res)
    assert res["windows"] == 3 and res["seq_len"] == 32 and res["tokens"] == 3 * 31

    code, out, err = run(capsys, "export", out_dir, "--dense", tmp_path / "dense")
    assert code == 0, err
    code, out, err = run(capsys, "evaluate", tmp_path / "dense", "--data", text_file, "--seq-len", "32", "--windows", "3", "--json")
    assert code == 0 and json.loads(out)["ppl"] == pytest.approx(res["ppl"], rel=1e-3)


def test_remove_and_explicit_axes(capsys, tiny_llama_dir, text_file, tmp_path):
    code, out, err = run(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--remove", "0.5",
                         "--base", "svd", "--allocator", "energy", "--no-eval", *FAST, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["keep_requested"] == 0.5 and s["base"] == "svd" and s["allocator"] == "energy" and s["output"] is None


def _bad(capsys, tmp_path, *args, match):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, *args)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    return lines[0]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--keep", "1.5"], "bad ratio --keep 1.5"),
        (["--keep", "0"], "bad ratio --keep 0"),
        (["--keep", "-0.2"], "bad ratio"),
        (["--keep", "0.5", "--remove", "0.5"], "either --keep or --remove"),
        (["--remove", "1.0"], "bad ratio --remove"),
        (["--keep", "1.0"], "nothing to compress"),
        (["--recipe", "nope"], "unknown recipe 'nope'; valid recipes: "),
        (["--base", "nope"], "unknown base 'nope'; valid bases: asvd, fwsvd, kfac, svd, tfwsvd, whiten"),
        (["--allocator", "nope"], "unknown allocator 'nope'; valid allocators: "),
        (["--include", "*nothing*"], "match no target module"),
        (["--seq-len", "100000"], "--seq-len 100000 is longer than the 256 positions"),
    ],
)
def test_bad_compress_arguments(capsys, tiny_llama_dir, text_file, tmp_path, extra, match):
    out_dir = tmp_path / "out"
    _bad(capsys, tmp_path, "compress", "--model", tiny_llama_dir, "--data", text_file, "--output", out_dir,
         "--calib-windows", "2", "--eval-windows", "1", "--seq-len", "32", "--eval-seq-len", "32", *extra, match=match)


def test_output_exists(capsys, tiny_llama_dir, text_file, tmp_path):
    (tmp_path / "out").mkdir()
    _bad(capsys, tmp_path, "compress", "--model", tiny_llama_dir, "--data", text_file, "--output", tmp_path / "out",
         *FAST, match="already exists")


def test_eval_data_equal_to_calibration(capsys, tiny_llama_dir, text_file, tmp_path):
    _bad(capsys, tmp_path, "compress", "--model", tiny_llama_dir, "--data", text_file, "--eval-data", text_file,
         "--output", tmp_path / "o", *FAST, match="overlap calibration")


@pytest.mark.parametrize(
    "content, match",
    [(b"", "contains no text"), (b"\x00\x01\x02binary\xff" * 10, "binary"), (b"caf\xe9 au lait " * 50, "not UTF-8")],
)
def test_bad_text(capsys, tiny_llama_dir, tmp_path, content, match):
    data = tmp_path / "bad.txt"
    data.write_bytes(content)
    _bad(capsys, tmp_path, "compress", "--model", tiny_llama_dir, "--data", data, "--output", tmp_path / "o",
         *FAST, match=match)


def test_short_text_says_how_many_tokens(capsys, tiny_llama_dir, tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("Just a few words.")
    line = _bad(capsys, tmp_path, "compress", "--model", tiny_llama_dir, "--data", data, "--seq-len", "64",
                "--eval-seq-len", "64", "--output", tmp_path / "o", match="too short")
    assert "needs 64 tokens" in line


def test_bad_model_paths(capsys, tmp_path, text_file):
    (tmp_path / "empty").mkdir()
    _bad(capsys, tmp_path, "compress", "--model", tmp_path / "empty", "--data", text_file, match="no config.json")
    _bad(capsys, tmp_path, "compress", "--model", tmp_path / "missing", "--data", text_file, match="does not exist")


def test_model_folder_without_weights(capsys, tiny_llama_dir, tmp_path, text_file):
    broken = tmp_path / "noweights"
    shutil.copytree(tiny_llama_dir, broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    _bad(capsys, tmp_path, "compress", "--model", broken, "--data", text_file, match="has no weights")


def test_missing_tokenizer(capsys, tiny_llama_dir, tmp_path, text_file):
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / f, notok / f)
    _bad(capsys, tmp_path, "compress", "--model", notok, "--data", text_file, *FAST, match="tokenizer missing")


@pytest.fixture()
def ckpt(capsys, tiny_llama_dir, text_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "ckpt"
    code, _, err = run(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--output", d, "--no-eval", *FAST)
    assert code == 0, err
    return d


def test_corrupt_checkpoint(capsys, ckpt, tmp_path):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    _bad(capsys, tmp_path, "evaluate", ckpt, "--windows", "1", "--seq-len", "32", match="hash mismatch")
    _bad(capsys, tmp_path, "export", ckpt, "--dense", tmp_path / "dense", match="hash mismatch")


def test_rank_map_that_does_not_fit(capsys, ckpt, tmp_path):
    from conftest import edit_compression

    def add(meta):
        meta["rank_map"]["model.layers.7.self_attn.q_proj"] = 4
        meta["modules"]["model.layers.7.self_attn.q_proj"] = {"out": 64, "in": 64, "kind": "linear"}

    edit_compression(ckpt, add)
    _bad(capsys, tmp_path, "evaluate", ckpt, "--windows", "1", "--seq-len", "32",
         match="rank map (quantization_config) does not fit the model: it names model.layers.7")


def test_info_on_a_non_checkpoint(capsys, tiny_llama_dir, tmp_path):
    _bad(capsys, tmp_path, "info", tiny_llama_dir, match="not a ranklm checkpoint")


@pytest.mark.parametrize("family", ["bert", "gpt2", "opt"])
def test_compress_any_local_folder(capsys, family, tiny_tokenizer, text_file, tmp_path):
    """Encoders and other decoder families work from a plain HF folder (encoders skip perplexity)."""
    from conftest import make_model

    folder = tmp_path / family
    make_model(family).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    code, out, err = run(capsys, "compress", "--model", folder, "--data", text_file, "--keep", "0.5",
                         "--output", tmp_path / "ck", *FAST, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert 0.5 * 0.995 <= s["keep_achieved"] <= 0.5
    assert ("ppl_compressed" in s) == (family != "bert")
    code, out, err = run(capsys, "info", tmp_path / "ck", "--json")
    assert code == 0 and json.loads(out)["rank_map"]


def test_device_map_auto_on_cpu(capsys, tiny_llama_dir, text_file, tmp_path):
    code, out, err = run(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--device-map", "auto",
                         "--keep", "0.5", *FAST, "--json")
    assert code == 0, err
    assert 0.5 * 0.995 <= json.loads(out)["keep_achieved"] <= 0.5


@pytest.mark.parametrize("sequential", [True, False])
def test_accelerate_offloaded_weights_are_onloaded_and_compress_like_in_memory(tmp_path, sequential):
    """A device_map that offloads a block (disk here; CPU offload on a GPU machine works the same way:
    meta weights behind an accelerate hook) compresses exactly like the model held in memory."""
    import torch
    from transformers import LlamaForCausalLM

    import ranklm
    from conftest import make_model, random_ids

    dense = make_model("llama")
    dense.save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = LlamaForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map, offload_folder=str(tmp_path / "off")).eval()
    assert offloaded.model.layers[0].mlp.down_proj.weight.is_meta
    ids = random_ids(8, 32)
    cfg = dict(keep=0.6, recipe="svd-llm", seq_len=32, calib_windows=8, sequential=sequential)
    ranklm.compress(dense, None, ranklm.CompressConfig(**cfg), data=ids, progress=False)
    ranklm.compress(offloaded, None, ranklm.CompressConfig(**cfg), data=ids, progress=False)
    assert not any(p.is_meta for p in offloaded.parameters())
    assert offloaded.ranklm.rank_map == dense.ranklm.rank_map
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    ranklm.save(offloaded, None, tmp_path / "ckpt")
    loaded, _ = ranklm.load(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_cli_device_map_json_with_disk_offload(capsys, tiny_llama_dir, text_file, tmp_path):
    dm = json.dumps({"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu",
                     "model.rotary_emb": "cpu", "lm_head": "cpu"})
    results = []
    for extra in ([], ["--device-map", dm]):
        code, out, err = run(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--keep", "0.5", *FAST,
                             "--json", *extra)
        assert code == 0, err
        results.append(json.loads(out))
    plain, offloaded = results
    assert offloaded["keep_achieved"] == plain["keep_achieved"]
    assert abs(offloaded["ppl_compressed"] - plain["ppl_compressed"]) < 1e-3 * plain["ppl_compressed"]
    code, _, err = run(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--device-map", "{oops", *FAST)
    assert code == 2 and "--device-map: not valid JSON" in err
