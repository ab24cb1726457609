"""Data-parallel statistics: 2 gloo processes give one process's rank map and factors (tiny Llama)."""

import copy
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_model, random_ids  # noqa: E402

from ranklm.calibration.distributed import shard  # noqa: E402
from ranklm.config import CompressConfig  # noqa: E402
from ranklm.layers import LowRankLinear  # noqa: E402
from ranklm.pipeline import make_plan, run  # noqa: E402


def _compress(model, ids, mode):
    config = CompressConfig(keep=0.6, memory_mode=mode, calib_windows=len(ids), seq_len=ids.shape[1], fisher_windows=8,
                            batch_size=2)
    run(model, None, make_plan(config, model), data=ids, progress=False)
    factors = {n: (m.A.weight.detach().clone(), m.B.weight.detach().clone())
               for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    return model.ranklm.rank_map, factors


def _worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        assert len(shard(12, 2)) == 3  # 6 batches of 2 windows, 3 per process
        rank_map, factors = _compress(make_model("llama"), random_ids(12, 32), mode)
        from safetensors.torch import save_file

        flat = {f"{n}.{i}": t.contiguous() for n, ab in factors.items() for i, t in enumerate(ab)}
        save_file(flat, f"{out}/rank{rank}.safetensors", metadata={k: str(v) for k, v in rank_map.items()})
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["whole", "bounded"])
def test_two_gloo_processes_match_one(tmp_path, mode, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setenv("RANKLM_SPILL_DIR", str(tmp_path))
    torch.set_num_threads(1)
    one_map, one = _compress(make_model("llama"), random_ids(12, 32), mode)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2, join=True)
    for rank in (0, 1):
        with safe_open(str(tmp_path / f"rank{rank}.safetensors"), "pt") as f:
            assert f.metadata() == {k: str(v) for k, v in one_map.items()}
            for name, (a, b) in one.items():
                for i, ref in enumerate((a, b)):
                    got = f.get_tensor(f"{name}.{i}")
                    assert float((got - ref).norm() / ref.norm()) <= 1e-6, (rank, name, i)
    assert any(v != "dense" for v in one_map.values())


def test_shard_is_contiguous_and_batch_aligned():
    assert list(shard(10, 4)) == [0, 4, 8]  # one process: every batch


def test_torchrun_cli_matches_one_process(tiny_llama_dir, text_file, tmp_path):
    """`torchrun --nproc-per-node 2 -m ranklm.cli compress` (gloo): rank 0 alone writes, and its checkpoint is the
    one-process checkpoint (rank map equal, factors within 1e-6)."""
    import json
    import shutil
    import subprocess

    from safetensors.torch import load_file

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    flags = ["--model", str(tiny_llama_dir), "--data", str(text_file), "--calib-windows", "8", "--seq-len", "32",
             "--fisher-windows", "8", "--batch-size", "2", "--keep", "0.6", "--no-eval", "--threads", "1", "--json"]
    env = {**os.environ, "RANKLM_SPILL_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    two = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "ranklm.cli",
                          "compress", *flags, "--output", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "process 0 of 2" in two.stderr and "process 1 of 2" in two.stderr
    assert len([ln for ln in two.stdout.splitlines() if ln.startswith("{")]) == 1  # rank 0 alone reports
    one = subprocess.run([sys.executable, "-m", "ranklm.cli", "compress", *flags, "--output", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    meta = [json.loads((tmp_path / d / "ranklm.json").read_text()) for d in ("one", "two")]
    assert meta[0]["rank_map"] == meta[1]["rank_map"]
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert float((wa[k] - wb[k]).float().norm()) <= 1e-6 * max(float(wa[k].float().norm()), 1e-30), k
