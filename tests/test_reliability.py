"""Interruptions never leave a half checkpoint; no pickle anywhere in the package."""

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ranklm

SRC = Path(ranklm.__file__).parent

SAVE_SLOWLY = textwrap.dedent(
    """
    import signal, sys, time
    # Threads started from here on (torch's pools) inherit a blocked SIGINT, so the signal reaches
    # the main thread's sleep below, as a terminal's Ctrl-C reaches a busy main thread; without
    # this a worker thread could take it and the 60 s sleep would not be interrupted.
    signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGINT}})
    # A Ctrl-C raises KeyboardInterrupt, as in a terminal, even when the test runner's process ignores SIGINT
    # (an ignored disposition is inherited through exec, and Python then installs no handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch
    sys.path.insert(0, {tests!r})
    import transformers.modeling_utils as st  # save_pretrained writes each shard through its safe_save_file
    import ranklm
    from conftest import make_model, random_ids
    model = make_model("llama")
    ranklm.compress(model, None, ranklm.CompressConfig(keep={keep}, seq_len=32, calib_windows=4), data=random_ids(), progress=False)
    real = st.safe_save_file
    def slow(*a, **k):
        real(*a, **k)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT}})
        print("WRITING", flush=True)
        time.sleep(60)
    st.safe_save_file = slow
    ranklm.save(model, None, {out!r}, overwrite=True)
    """
)


def _start(out: Path, keep: float) -> subprocess.Popen:
    code = SAVE_SLOWLY.format(tests=str(Path(__file__).parent), out=str(out), keep=keep)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "WRITING" in line:
            return proc
        if proc.poll() is not None:
            break
    proc.kill()
    pytest.fail("the saving subprocess never reached the write")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_save_leaves_no_output_and_keeps_previous(tmp_path, sig):
    out = tmp_path / "ckpt"
    # first: no previous checkpoint -> nothing under the final name
    proc = _start(out, 0.5)
    proc.send_signal(sig)
    proc.wait(timeout=180)
    assert not out.exists()
    # then: a previous checkpoint exists -> it is left intact by an interrupted overwrite
    from conftest import make_model, random_ids

    model = make_model("llama")
    ranklm.compress(model, None, ranklm.CompressConfig(keep=0.7, seq_len=32, calib_windows=4), data=random_ids(), progress=False)
    ranklm.save(model, None, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = _start(out, 0.5)
    proc.send_signal(sig)
    proc.wait(timeout=180)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    ranklm.load(out)  # still a valid checkpoint
    if sig == signal.SIGINT:  # a clean interrupt also removes its temp dir
        assert not list(tmp_path.glob("*.tmp-*"))


def test_no_pickle_in_the_package():
    offenders = []
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        if re.search(r"^\s*(import pickle|from pickle|import cPickle|import dill)", text, re.M):
            offenders.append(f"{f}: imports pickle")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{f}: torch.load without weights_only=True")
        if re.search(r"torch\.save\(", text):
            offenders.append(f"{f}: torch.save")
        if "allow_pickle=True" in text:
            offenders.append(f"{f}: numpy allow_pickle")
    assert not offenders, offenders


class _CtrlCAt:
    """A loss function that behaves like Ctrl-C arriving at its ``n``-th call."""

    def __init__(self, real, n: int) -> None:
        self.real, self.n, self.calls = real, n, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.real(model, batch)


def test_ctrl_c_during_training_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_llama_dir, text_file, monkeypatch, capsys):
    import json

    import safetensors.torch as st

    import ranklm.train.objective as obj_mod
    from ranklm.cli import main

    args = ["compress", "--model", tiny_llama_dir, "--data", text_file, "--keep", "0.6", "--base", "whiten", "--allocator", "ars",
            "--alloc-opt", "steps=8", "--alloc-opt", "lr=0.01", "--trainer", "finetune", "--train-opt", "steps=8",
            "--train-opt", "lr=1e-3", "--save-every", "2", "--calib-windows", "4", "--seq-len", "32", "--batch-size", "2", "--no-eval"]
    ref, out, state = tmp_path / "ref", tmp_path / "out", tmp_path / "state"
    assert main([str(a) for a in [*args, "--output", ref]]) == 0

    # Ctrl-C in ARS at step 6 of 8: exit 130, no output, the state of step 4 on disk
    real = obj_mod._lm_loss
    monkeypatch.setattr(obj_mod, "_lm_loss", _CtrlCAt(real, 6))
    assert main([str(a) for a in [*args, "--output", out, "--state-dir", state]]) == 130
    assert not out.exists() and (state / "ars.safetensors").is_file() and not (state / "finetune.safetensors").exists()
    monkeypatch.undo()
    # resumed (ARS steps 5-8 = 4 loss calls), then Ctrl-C again in fine-tuning at step 5 of 8
    monkeypatch.setattr(obj_mod, "_lm_loss", _CtrlCAt(real, 4 + 5))
    assert main([str(a) for a in [*args, "--output", out, "--state-dir", state, "--resume"]]) == 130
    assert not out.exists() and (state / "finetune.safetensors").is_file()
    monkeypatch.undo()
    capsys.readouterr()
    # resumed to the end: the same weights, masks and loss history as the uninterrupted run
    assert main([str(a) for a in [*args, "--output", out, "--state-dir", state, "--resume"]]) == 0
    assert "resuming from" in capsys.readouterr().err
    for f in ("model.safetensors", "allocator.safetensors"):
        a, b = st.load_file(str(ref / f)), st.load_file(str(out / f))
        assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a), f
    ma, mb = (json.loads((d / "ranklm.json").read_text()) for d in (ref, out))
    assert ma["rank_map"] == mb["rank_map"]
    ha, hb = (m["training"][1]["history"]["loss"] for m in (ma, mb))
    assert ha == hb and len(hb) == 8
    assert ma["training"][0]["trainer"] == "ars" and mb["training"][1]["resumed_from_step"] == 4

    # resuming a different run from that folder, or a fresh run into it, is refused
    other = [a if a != "0.6" else "0.5" for a in args]
    assert main([str(a) for a in [*other, "--state-dir", state, "--resume"]]) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "config" in err
    assert main([str(a) for a in [*args, "--state-dir", state]]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main([str(a) for a in [*args, "--resume"]]) == 2
    assert "--resume needs --state-dir" in capsys.readouterr().err


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
