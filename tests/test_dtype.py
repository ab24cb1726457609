"""``--dtype``: a bf16 model is compressed, saved and reloaded in bf16 (never a larger checkpoint), statistics
stay float32/float64, and an explicit dtype overrides the folder's own."""

import json

import pytest
import safetensors
import torch

from ranklm.cli import main
from ranklm.io import load
from ranklm.models import load_model, parse_dtype

from conftest import make_model, outputs, random_ids

FAST = ["--calib-windows", "4", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--batch-size", "2"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def bf16_llama_dir(tmp_path, tiny_tokenizer):
    d = tmp_path / "tiny-llama-bf16"
    make_model("llama").to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def _weights_dtypes(folder) -> set[str]:
    """Dtypes of the weight tensors; the int32 rank markers (``<target>.weight``, one element each,
    the guard that makes plain loading refuse) are checked to be exactly that and left out."""
    dtypes = set()
    with safetensors.safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():
            dtype = str(f.get_slice(k).get_dtype())
            if dtype == "I32":
                assert k.endswith(".weight") and f.get_slice(k).get_shape() == [1], k
                continue
            dtypes.add(dtype)
    return dtypes


def _weights_bytes(folder) -> int:
    return (folder / "model.safetensors").stat().st_size


def test_parse_dtype():
    assert parse_dtype("auto") == "auto" and parse_dtype(None) == "auto"
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    assert parse_dtype("FLOAT32") is torch.float32
    with pytest.raises(Exception, match="unknown --dtype 'int8'"):
        parse_dtype("int8")


@pytest.mark.parametrize("recipe", ["svd-llm", "kfac-global"])
def test_bf16_model_round_trips_in_bf16(capsys, bf16_llama_dir, text_file, tmp_path, recipe):
    out_dir = tmp_path / "ckpt"
    # a separate evaluation file, so that `evaluate` below scores exactly the windows compress scored
    # (without --eval-data compress evaluates a held-out part of --data, evaluate the whole file)
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(text_file.read_text()[:3000])
    code, out, err = run(capsys, "compress", "--model", bf16_llama_dir, "--data", text_file, "--eval-data", eval_file,
                         "--keep", "0.8", "--recipe", recipe, "--output", out_dir, *FAST, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert "bfloat16" in err  # the load line says which dtype the model runs in
    assert torch.isfinite(torch.tensor([s["ppl_dense"], s["ppl_compressed"]])).all()
    meta = json.loads((out_dir / "ranklm.json").read_text())
    assert meta["dtype"] == "bfloat16"
    assert _weights_dtypes(out_dir) == {"BF16"}
    assert _weights_bytes(out_dir) < _weights_bytes(bf16_llama_dir)  # never larger than the original
    model, _ = load(out_dir)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = random_ids(2, 16)
    first = outputs(model, ids)
    again, _ = load(out_dir)
    assert torch.equal(first, outputs(again, ids))
    # its perplexity evaluated from the checkpoint is the one compress reported
    code, out, err = run(capsys, "evaluate", out_dir, "--data", eval_file, "--seq-len", "32", "--windows", "2",
                         "--batch-size", "2", "--json")
    assert code == 0, err
    ev = json.loads(out)
    assert ev["dtype"] == "bfloat16"
    assert ev["tokens"] == s["eval_tokens"] and ev["windows"] == s["eval_windows"]
    recorded = meta["evaluation"]["compressed"]["ppl"]
    assert recorded == pytest.approx(s["ppl_compressed"], rel=1e-12)  # what ranklm.json records is what was printed
    assert ev["ppl"] == pytest.approx(s["ppl_compressed"], rel=1e-6), (ev["ppl"], s["ppl_compressed"])
    assert ev["ppl"] != pytest.approx(s["ppl_dense"], rel=1e-6)  # the compressed model, not the dense one


def test_explicit_dtype_overrides_the_folder(capsys, bf16_llama_dir, text_file, tmp_path):
    out_dir = tmp_path / "ckpt32"
    code, out, err = run(capsys, "compress", "--model", bf16_llama_dir, "--data", text_file, "--keep", "0.8",
                         "--dtype", "float32", "--output", out_dir, *FAST, "--json")
    assert code == 0, err
    assert json.loads((out_dir / "ranklm.json").read_text())["dtype"] == "float32"
    assert _weights_dtypes(out_dir) == {"F32"}
    # a checkpoint loads in its saved dtype unless one is asked for
    m, _, info = load_model(str(out_dir), dtype="auto")
    assert info["dtype"] == "float32"
    m, _, info = load_model(str(out_dir), dtype="bfloat16")
    assert info["dtype"] == "bfloat16" and next(m.parameters()).dtype == torch.bfloat16


def test_bad_dtype_is_one_line(capsys, tiny_llama_dir, text_file, tmp_path):
    code, out, err = run(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--dtype", "int8",
                         "--output", tmp_path / "x", *FAST)
    assert code == 2 and "unknown --dtype 'int8'" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_statistics_stay_wide_on_a_bf16_model():
    from ranklm.calibration.stats import collect_activation_stats
    from ranklm.targets import find_targets

    model = make_model("llama").to(torch.bfloat16)
    targets = find_targets(model)
    stats = collect_activation_stats(model, targets, random_ids(4, 16), batch_size=2)
    gram = next(iter(stats.values()))["gram"]
    assert gram.dtype == torch.float64


def test_evaluate_on_a_missing_cuda_device_is_one_line(capsys, tiny_llama_dir, text_file, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, on any machine
    code, out, err = run(capsys, "evaluate", tiny_llama_dir, "--data", text_file, "--device", "cuda")
    assert code == 2 and "no CUDA device" in err and "Traceback" not in err
