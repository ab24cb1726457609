"""Honest numerics (issue 13): how each target's Gram was factored is recorded and warned about.

Also the ``shrink`` option of whiten (robust calibration).
"""

from __future__ import annotations

import json

import pytest
import torch

import ranklm
from ranklm.config import CompressConfig
from ranklm.decompose import get_base
from ranklm.decompose.psd import psd_factor
from ranklm.pipeline import numerics_warning

from conftest import make_model, random_ids

torch.set_num_threads(1)
FAST = ["--calib-windows", "8", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--batch-size", "4"]


def _rank_deficient_llama():
    """Tiny Llama whose o_proj inputs have dead channels: v_proj row 3 zeroed (one KV head dim)."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[3].zero_()
    return model


def test_psd_factor_records_jitter_and_eigh():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64)
    healthy = x @ x.T
    _, info = psd_factor(healthy)
    assert info == {"method": "cholesky", "jitter": 0.0}
    singular = torch.block_diag(healthy, torch.zeros(2, 2, dtype=torch.float64))
    L, info = psd_factor(singular)
    assert info["method"] == "cholesky" and 0 < info["jitter"] < 1
    torch.testing.assert_close(L @ L.T, singular + info["jitter"] * float(singular.diagonal().mean()) * torch.eye(8, dtype=torch.float64))
    _, info = psd_factor(torch.diag(torch.tensor([1.0, 2.0, -5.0], dtype=torch.float64)))
    assert info["method"] == "eigh" and info["clamped"] == 1


def test_rank_deficient_gram_is_recorded_saved_and_warned(tmp_path):
    model = _rank_deficient_llama()
    # the input-Gram route (the default factors o_proj from its output side, which needs no jitter: below)
    cfg = CompressConfig(keep=0.6, recipe="svd-llm", calib_windows=8, seq_len=32, base_options={"output_side": False})
    ranklm.compress(model, None, cfg, data=random_ids(8, 32), progress=False)
    rec = model.ranklm.artifacts["numerics"]
    assert set(rec) == {t.name for t in model.ranklm.targets}
    o = rec["model.layers.0.self_attn.o_proj"]
    assert o["method"] == "cholesky" and o["jitter"] > 0
    assert rec["model.layers.1.self_attn.o_proj"] == {"method": "cholesky", "jitter": 0.0}
    line = numerics_warning(model.ranklm)
    assert line.startswith("warning: ") and "\n" not in line and "model.layers.0.self_attn.o_proj" in line
    ckpt = ranklm.save(model, None, tmp_path / "ckpt")
    meta = json.loads((ckpt / "ranklm.json").read_text())
    assert meta["artifacts"]["numerics"]["model.layers.0.self_attn.o_proj"]["jitter"] == o["jitter"]
    default = _rank_deficient_llama()
    ranklm.compress(default, None, CompressConfig(keep=0.6, recipe="svd-llm", calib_windows=8, seq_len=32),
                    data=random_ids(8, 32), progress=False)
    assert default.ranklm.artifacts["numerics"]["model.layers.0.self_attn.o_proj"]["method"] == "output-eigh"
    assert numerics_warning(default.ranklm) is None


def _cli(capsys, *args):
    from ranklm.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("broken", [False, True])
def test_cli_warns_once_only_when_needed(broken, capsys, tiny_llama_dir, tiny_tokenizer, text_file, tmp_path):
    model_dir = tiny_llama_dir
    if broken:
        model_dir = tmp_path / "broken"
        _rank_deficient_llama().save_pretrained(model_dir)
        tiny_tokenizer.save_pretrained(model_dir)
    # The MLP's down_proj reads 160 channels: 8 x 32 tokens keep its Gram full rank when healthy.
    code, out, err = _cli(capsys, "compress", "--model", model_dir, "--data", text_file, "--keep", "0.6", *FAST,
                          "--recipe", "svd-llm", "--base-opt", "output_side=false", "--no-eval", "--json", "--output", tmp_path / "ckpt")
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == (1 if broken else 0), err
    meta = json.loads((tmp_path / "ckpt" / "ranklm.json").read_text())
    methods = {(r["method"], r["jitter"] > 0) for r in meta["artifacts"]["numerics"].values()}
    assert (("cholesky", True) in methods) == broken and all(m == "cholesky" for m, _ in methods)


def test_kfac_damping_absorbs_a_rank_deficient_gram(capsys, tiny_tokenizer, text_file, tmp_path):
    """The default kfac-global adds damping x mean diagonal to both factors before Cholesky, so the
    rank-deficient Gram that makes whitening jitter factors cleanly: no warning, damping recorded."""
    model_dir = tmp_path / "broken"
    _rank_deficient_llama().save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    code, out, err = _cli(capsys, "compress", "--model", model_dir, "--data", text_file, "--keep", "0.6", *FAST,
                          "--no-eval", "--json", "--output", tmp_path / "ckpt")
    assert code == 0, err
    assert json.loads(out)["method"] == "kfac-global"
    assert not [ln for ln in err.splitlines() if ln.startswith("warning:")], err
    records = json.loads((tmp_path / "ckpt" / "ranklm.json").read_text())["artifacts"]["numerics"].values()
    assert records and all(r["method"] == "cholesky" and r["jitter"] == 0 and r["damping"] > 0 for r in records)


def _weights_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 200, generator=g, dtype=torch.float64)
    return torch.randn(10, 8, generator=g, dtype=torch.float64), x


def test_shrink_zero_is_todays_whiten_and_one_is_column_norm_weighted_svd():
    w, x = _weights_inputs()
    gram = x @ x.T
    plain = get_base("whiten").decompose(w, {"gram": gram}, max_rank=4)
    zero = get_base("whiten", shrink=0.0).decompose(w, {"gram": gram}, max_rank=4)
    assert torch.equal(plain.A, zero.A) and torch.equal(plain.B, zero.B)
    one = get_base("whiten", shrink=1.0).decompose(w, {"gram": gram}, max_rank=4)
    c = gram.diagonal().sqrt()  # column norms of X
    u, s, vt = torch.linalg.svd(w * c, full_matrices=False)
    for k in (1, 3):
        expected = (u[:, :k] * s[:k]) @ vt[:k] / c
        torch.testing.assert_close(one.approx(k).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.s.double(), s, atol=1e-5, rtol=1e-5)
    assert one.meta["numerics"]["shrink"] == 1.0


@pytest.mark.parametrize("value", ["1.5", "-0.1", "abc"])
def test_bad_shrink_is_one_error_line(value, capsys, tiny_llama_dir, text_file, tmp_path):
    code, out, err = _cli(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--base", "whiten",
                          "--base-opt", f"shrink={value}", *FAST, "--output", tmp_path / "ckpt")
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "shrink" in lines[0], err
    assert not (tmp_path / "ckpt").exists()
