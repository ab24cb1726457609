"""float32 running sums (the default on a GPU, --stats-dtype float32) against float64 ones (the CPU default)."""

import copy

import pytest
import torch

from conftest import make_model, random_ids
from ranklm.calibration import collect_stats
from ranklm.calibration.accumulate import running_sums
from ranklm.config import CompressConfig
from ranklm.errors import RanklmError
from ranklm.pipeline import make_plan, run
from ranklm.targets import find_targets

# Stated tolerance: each running sum within this relative Frobenius error of the float64 one. A float32 sum of
# B batch products loses about B * 6e-8 relative in the worst case; measured here ~1e-7 on 24 batches.
TOLERANCE = 1e-5


def _stats(model, ids, dtype):
    targets = find_targets(model)
    with running_sums(dtype, on_device=dtype == torch.float32):
        return collect_stats(model, targets, ids, frozenset({"gram", "out_gram"}), batch_size=1, progress=False,
                             fisher_windows=len(ids))


def test_float32_statistics_match_float64():
    model, ids = make_model("llama"), random_ids(24, 32)
    f64, f32 = _stats(model, ids, torch.float64), _stats(model, ids, torch.float32)
    worst = 0.0
    for name, ref in f64.items():
        for key in ("gram", "out_gram", "out_sq"):
            if key in ref:
                got = f32[name][key]
                assert got.dtype == torch.float32 and ref[key].dtype == torch.float64
                err = float((got.double() - ref[key]).norm() / ref[key].norm())
                worst = max(worst, err)
        assert f32[name]["tokens"] == ref["tokens"] and f32[name]["out_tokens"] == ref["out_tokens"]
    assert 0.0 < worst <= TOLERANCE  # not bit-identical (the sums really were float32), within the stated tolerance


def test_float32_statistics_through_compress_give_the_same_ranks():
    dense, ids = make_model("llama"), random_ids(12, 32)
    maps = {}
    for dtype in ("float64", "float32"):
        m = copy.deepcopy(dense)
        config = CompressConfig(keep=0.6, stats_dtype=dtype, calib_windows=12, seq_len=32, fisher_windows=8, batch_size=3)
        run(m, None, make_plan(config, m), data=ids, progress=False)
        maps[dtype] = m.ranklm.rank_map
    assert maps["float32"] == maps["float64"]


def test_bad_stats_dtype_is_one_line():
    with pytest.raises(RanklmError, match="unknown stats dtype"):
        CompressConfig(stats_dtype="float16")


def test_compress_on_a_missing_cuda_device_is_one_line(capsys, tiny_llama_dir, text_file, tmp_path, monkeypatch):
    from ranklm.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, on any machine
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(text_file), "--device", "cuda",
                 "--no-eval", "--output", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    assert code == 2 and [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: --device cuda: no CUDA device is available here"]
    assert "Traceback" not in err and not (tmp_path / "ckpt").exists()
