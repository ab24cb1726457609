"""The serving route that keeps the savings: a checkpoint exported to ONNX runs in onnxruntime with
the checkpoint's logits, in a smaller file than its dense twin's export; evaluate times both."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

import ranklm
from conftest import make_model, random_ids
from ranklm import CompressConfig, RanklmError
from ranklm.cli import main

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def ckpt(request, tmp_path_factory):
    model = make_model(request.param)
    cfg = CompressConfig(keep=0.5, base="whiten", allocator="uniform", seq_len=32, calib_windows=8)
    ranklm.compress(model, None, cfg, data=random_ids(8, 32), progress=False)
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    ranklm.save(model, None, path)
    return path


def _onnx_logits(folder, ids, mask):
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])


def _initializer_shapes(folder) -> list[tuple[int, ...]]:
    import onnx

    graph = onnx.load(str(folder / "model.onnx")).graph
    return [tuple(t.dims) for t in graph.initializer]


def test_export_onnx_keeps_the_factors_and_the_logits(capsys, ckpt, tmp_path):
    code, out, err = run(capsys, "export", ckpt, "--onnx", tmp_path / "onnx", "--dense", tmp_path / "dense")
    assert code == 0, err
    model, _ = ranklm.load(ckpt)
    ids = random_ids(3, 24, seed=5)  # another batch and length than the export traced
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    got = _onnx_logits(tmp_path / "onnx", ids, mask)
    real = mask.bool()  # padded positions attend to nothing: undefined in both runtimes
    assert float((got - ref)[real].abs().max() / ref[real].abs().max()) <= 1e-5
    # every factored target is in the graph as its two factors, not as a dense product
    shapes = _initializer_shapes(tmp_path / "onnx")
    factored = [m for m in model.modules() if isinstance(m, ranklm.LowRankLinear)]
    for m in factored:
        assert sum(s in ((m.rank, m.in_features), (m.in_features, m.rank)) for s in shapes) >= 1
        assert sum(s in ((m.out_features, m.rank), (m.rank, m.out_features)) for s in shapes) >= 1
    # and the file is smaller than the dense twin's ONNX export
    from ranklm.checkpoint.onnx import export_onnx, onnx_files_bytes

    dense = export_onnx(ckpt, tmp_path / "dense-onnx", dense=True)
    assert onnx_files_bytes(tmp_path / "onnx") < dense["bytes"]
    assert (tmp_path / "onnx" / "config.json").is_file()


def test_evaluate_latency_onnx_reports_sizes_and_speed(capsys, ckpt, tmp_path, text_file):
    model, _ = ranklm.load(ckpt)
    from ranklm.eval.onnx_latency import onnx_serving_report

    rep = onnx_serving_report(model, [(1, 16), (2, 32)], reps=2, warmup=1)
    assert rep["onnx_bytes"]["compressed"] < rep["onnx_bytes"]["dense"]
    assert rep["onnx_bytes_ratio"] == pytest.approx(rep["onnx_bytes"]["compressed"] / rep["onnx_bytes"]["dense"])
    assert max(rep["onnx_max_rel_err"].values()) <= 1e-4
    points = rep["onnx_latency"]["points"]
    assert [(p["batch"], p["seq_len"]) for p in points] == [(1, 16), (2, 32)]
    assert all(p["dense_ms"] > 0 and p["compressed_ms"] > 0 for p in points)


def test_evaluate_cli_with_onnx(capsys, tiny_llama_dir, text_file, tmp_path):
    from ranklm.models import load_model

    model, tok, _ = load_model(str(tiny_llama_dir))
    ranklm.compress(model, tok, CompressConfig(keep=0.5, recipe="svd"), progress=False)
    ranklm.save(model, tok, tmp_path / "ck")
    code, out, err = run(capsys, "evaluate", tmp_path / "ck", "--data", text_file, "--seq-len", "32", "--windows", "2",
                         "--latency", "--onnx", "--latency-shapes", "1x16", "--latency-reps", "2", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["onnx"]["onnx_bytes_ratio"] < 1 and res["speedup"] == res["onnx"]["onnx_speedup"] > 0
    assert "decode_speedup" not in res


def test_onnx_without_latency_or_without_the_extra_is_one_error_line(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    code, out, err = run(capsys, "evaluate", tiny_llama_dir, "--onnx")
    assert code == 2 and err.count("error:") == 1 and "--onnx needs --latency" in err
    code, out, err = run(capsys, "export", tiny_llama_dir)
    assert code == 2 and "export needs --dense DIR and/or --onnx DIR" in err
    real_import = builtins.__import__

    def no_onnxruntime(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    code, out, err = run(capsys, "export", tiny_llama_dir, "--onnx", tmp_path / "o")
    assert code == 2 and err.count("error:") == 1 and "ranklm[onnx]" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_an_export_that_does_not_reproduce_the_model_is_refused(tmp_path, monkeypatch):
    import ranklm.checkpoint.onnx as onnx_mod

    model = make_model("llama")
    ranklm.compress(model, None, CompressConfig(keep=0.5, recipe="svd"), progress=False)
    real = onnx_mod.write_onnx

    def write_a_different_model(m, folder, opset=None):
        other = make_model("llama")
        with torch.no_grad():
            other.lm_head.weight.mul_(2)
        return real(other, folder, opset)

    monkeypatch.setattr(onnx_mod, "write_onnx", write_a_different_model)
    with pytest.raises(RanklmError, match="does not reproduce the model"):
        onnx_mod.export_onnx_model(model, None, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_export_leaves_the_callers_model_in_its_dtype(tmp_path):
    """The export runs the float32 CPU graph, then puts the model back as it was (evaluate goes on with it)."""
    from ranklm.checkpoint.onnx import export_onnx_model

    model = make_model("llama")
    ranklm.compress(model, None, CompressConfig(keep=0.5, recipe="svd"), progress=False)
    model.to(torch.bfloat16)
    export_onnx_model(model, None, tmp_path / "o")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert (tmp_path / "o" / "model.onnx").is_file()
