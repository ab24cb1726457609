"""kfac-global in bounded memory gives the whole-model result; the memory preflight switches or refuses in one line."""

import copy
import logging
from pathlib import Path

import pytest
import torch

from conftest import make_model, random_ids
from ranklm.cli import main
from ranklm.config import CompressConfig
from ranklm.errors import RanklmError
from ranklm.layers import LowRankLinear
from ranklm.pipeline import make_plan, run
from ranklm.pipeline import memory as memory_mod
from ranklm.targets import find_targets


def _compress(model, mode, ids, keep=0.6, **extra):
    config = CompressConfig(keep=keep, memory_mode=mode, calib_windows=len(ids), seq_len=ids.shape[1], fisher_windows=6,
                            batch_size=3, **extra)
    return run(model, None, make_plan(config, model), data=ids, progress=False)


def _factors(model):
    return {n: (m.A.weight.detach().clone(), m.B.weight.detach().clone())
            for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _spill_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("ranklm-factors-*"))


@pytest.mark.parametrize("keep", [0.8, 0.5])
def test_bounded_equals_whole_model(keep, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKLM_SPILL_DIR", str(tmp_path))
    dense, ids = make_model("llama"), random_ids(12, 32)
    whole = _compress(copy.deepcopy(dense), "whole", ids, keep)
    bounded = _compress(copy.deepcopy(dense), "bounded", ids, keep)
    assert whole.ranklm.artifacts["memory"]["mode"] == "whole"
    assert bounded.ranklm.artifacts["memory"]["mode"] == "bounded"
    per_block = bounded.ranklm.artifacts["memory"]["bounded"]["per_block"]
    assert [b["block"] for b in per_block] == [0, 1] and all(b["spill_mib"] > 0 for b in per_block)
    assert whole.ranklm.rank_map == bounded.ranklm.rank_map
    assert any(r != "dense" for r in whole.ranklm.rank_map.values())
    fw, fb = _factors(whole), _factors(bounded)
    assert fw.keys() == fb.keys() and fw
    for name in fw:
        for a, b in zip(fw[name], fb[name]):
            assert a.shape == b.shape
            assert float((a - b).norm() / a.norm()) <= 1e-6, name
    assert whole.ranklm.artifacts["numerics"] == bounded.ranklm.artifacts["numerics"]
    assert _spill_dirs(tmp_path) == []  # the spilled factors' folder is removed after installation


def test_bounded_spills_and_reads_prefixes(tmp_path):
    from ranklm.decompose import Factorization
    from ranklm.pipeline.spill import FactorStore

    store = FactorStore(tmp_path)
    a, b = torch.randn(7, 5), torch.randn(5, 9)
    f = Factorization(a, b, torch.linspace(5, 1, 5), meta={"loss_scale": 0.5})
    spilled = store.put({"x": f})["x"]
    assert spilled.max_rank == 5 and spilled.meta == {"loss_scale": 0.5}
    a3, b3 = spilled.factors(3)
    assert torch.equal(a3, a[:, :3]) and torch.equal(b3, b[:3])
    assert torch.equal(spilled.A, a) and torch.equal(spilled.B, b)
    with pytest.raises(ValueError):
        spilled.factors(6)
    store.close()
    assert _spill_dirs(tmp_path) == []


def _estimates(model, ids):
    targets = find_targets(model)
    plan = make_plan(CompressConfig(keep=0.6, calib_windows=len(ids), seq_len=ids.shape[1], fisher_windows=6,
                                    batch_size=3), model)
    args = (model, targets, set(plan.base.needs), len(ids), ids.shape[1], 3, 6)
    return memory_mod.estimate("whole", *args), memory_mod.estimate("bounded", *args)


def test_auto_mode_is_bounded_and_says_so_in_one_line(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("RANKLM_SPILL_DIR", str(tmp_path))
    dense, ids = make_model("llama"), random_ids(12, 32)
    whole, bounded = _estimates(dense, ids)
    assert bounded.extra < whole.extra  # the point of the mode, already on a 2-block model
    for room, said in ((whole.extra * 4, "it would fit"), ((whole.extra + bounded.extra) / 2 / memory_mod.HEADROOM,
                                                          "it would not fit")):
        monkeypatch.setattr(memory_mod, "available_memory", lambda room=room: (int(room), "test limit"))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ranklm"):
            model = _compress(copy.deepcopy(dense), "auto", ids)
        assert model.ranklm.artifacts["memory"]["mode"] == "bounded"
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory:")]
        assert len(lines) == 1 and "block by block" in lines[0] and "test limit" in lines[0] and said in lines[0]


def test_preflight_refuses_bounded_mode_that_cannot_fit(monkeypatch):
    dense, ids = make_model("llama"), random_ids(12, 32)
    whole, bounded = _estimates(dense, ids)
    monkeypatch.setattr(memory_mod, "available_memory", lambda: (int(bounded.extra / 2), "test limit"))
    with pytest.raises(RanklmError, match=r"not enough memory: the bounded statistics need about .* GiB.*test limit"):
        _compress(copy.deepcopy(dense), "auto", ids)


def test_preflight_refuses_whole_mode_that_cannot_fit(monkeypatch):
    dense, ids = make_model("llama"), random_ids(12, 32)
    whole, bounded = _estimates(dense, ids)
    limit = (whole.extra + bounded.extra) / 2 / memory_mod.HEADROOM
    monkeypatch.setattr(memory_mod, "available_memory", lambda: (int(limit), "test limit"))
    with pytest.raises(RanklmError, match=r"not enough memory: the whole statistics need about .* --memory-mode bounded"):
        _compress(copy.deepcopy(dense), "whole", ids)


def test_cli_refuses_a_model_that_cannot_fit_in_one_line(capsys, tiny_llama_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKLM_MEMORY_LIMIT", "1M")  # below this process's resident memory: nothing left
    out_dir = tmp_path / "ckpt"
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(text_file), "--calib-windows", "4",
                 "--seq-len", "32", "--no-eval", "--output", str(out_dir)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "not enough memory" in lines[0] and "GiB" in lines[0] and "RANKLM_MEMORY_LIMIT" in lines[0]
    assert "Traceback" not in err and not out_dir.exists()


def test_out_of_memory_during_calibration_is_one_line(monkeypatch):
    from ranklm.pipeline.factorize import FactorCache

    def boom(self, *a, **k):
        raise MemoryError()

    monkeypatch.setattr(FactorCache, "factorizations", boom)
    dense, ids = make_model("llama"), random_ids(6, 32)
    with pytest.raises(RanklmError, match=r"out of RAM memory during calibration \(estimate .* GiB"):
        _compress(dense, "auto", ids)


def test_bounded_mode_refused_where_it_does_not_apply():
    with pytest.raises(RanklmError, match="--memory-mode bounded"):
        make_plan(CompressConfig(recipe="svd-llm", memory_mode="bounded"))
    with pytest.raises(RanklmError, match="unknown memory mode"):
        CompressConfig(memory_mode="half")


def test_gpu_preflight_refuses_in_one_line(monkeypatch):
    dense = make_model("llama")
    monkeypatch.setattr(memory_mod, "device_free_memory", lambda device: 1000)  # a GPU with 1000 bytes free
    with pytest.raises(RanklmError, match=r"not enough GPU memory on cpu: about .* GiB needed .* --batch-size 1"):
        memory_mod.check_device(dense, find_targets(dense), {"gram", "out_gram"}, 4, 32, 8)
    args = (dense, find_targets(dense), {"gram", "out_gram"}, 4, 32, 8)
    monkeypatch.setattr(memory_mod, "device_free_memory", lambda device: 10**12)
    off, on = memory_mod.check_device(*args), memory_mod.check_device(*args, stats_on_device=True)
    assert on > off > 0  # float32 sums kept on the device need more of it
    monkeypatch.setattr(memory_mod, "device_free_memory", lambda device: int((off + on) / 2 / memory_mod.HEADROOM))
    memory_mod.check_device(*args)  # fits with the sums in CPU memory
    with pytest.raises(RanklmError, match="not enough GPU memory"):
        memory_mod.check_device(*args, stats_on_device=True)
    monkeypatch.setattr(memory_mod, "device_free_memory", lambda device: None)  # the CPU: nothing to check
    memory_mod.check_device(dense, find_targets(dense), {"gram", "out_gram"}, 4, 32, 8)


def test_gpu_out_of_memory_is_one_line():
    with pytest.raises(RanklmError, match="out of GPU memory during calibration"):
        with memory_mod.out_of_memory_as_error(None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_sigterm_during_the_bounded_pass_leaves_nothing(tiny_llama_dir, text_file, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    spill = tmp_path / "spill"
    spill.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "ranklm.cli", "compress", "--model", str(tiny_llama_dir), "--data",
                             str(text_file), "--calib-windows", "16", "--seq-len", "32", "--batch-size", "1",
                             "--no-eval", "--output", str(tmp_path / "ckpt")],
                            env={**os.environ, "RANKLM_SPILL_DIR": str(spill)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _spill_dirs(spill) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert _spill_dirs(spill), "the run ended before its bounded pass could be interrupted"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert _spill_dirs(spill) == [] and not (tmp_path / "ckpt").exists()


def test_gradient_batch_counts_what_the_pass_holds():
    """The backward batch shrinks when the model and the gradient statistics it holds leave less of the pass
    budget, and both memory modes see the same held bytes (so they use the same batches)."""
    model = make_model("llama")
    targets = find_targets(model)
    needs = frozenset({"gram", "out_gram"})
    held = memory_mod.gradient_pass_held(model, targets, needs)
    assert held > memory_mod.model_bytes(model)
    one = memory_mod.backward_bytes(model, 1, 64)
    assert memory_mod.gradient_batch_size(model, 4, 64, held=held, pass_budget=held + 4 * one) == 4
    assert memory_mod.gradient_batch_size(model, 4, 64, held=held, pass_budget=held + 2 * one) == 2
    assert memory_mod.gradient_batch_size(model, 4, 64, held=held, pass_budget=0) == 1
