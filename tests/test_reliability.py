"""Interruptions never leave a half checkpoint; no pickle anywhere in the package."""

import os
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
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    import safetensors.torch as st
    import ranklm
    from conftest import make_model, random_ids
    model = make_model("llama")
    ranklm.compress(model, None, ranklm.CompressConfig(keep={keep}, seq_len=32, calib_windows=4), data=random_ids(), progress=False)
    real = st.save_file
    def slow(*a, **k):
        real(*a, **k)
        print("WRITING", flush=True)
        time.sleep(60)
    st.save_file = slow
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
    proc.wait(timeout=60)
    assert not out.exists()
    # then: a previous checkpoint exists -> it is left intact by an interrupted overwrite
    from conftest import make_model, random_ids

    model = make_model("llama")
    ranklm.compress(model, None, ranklm.CompressConfig(keep=0.7, seq_len=32, calib_windows=4), data=random_ids(), progress=False)
    ranklm.save(model, None, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = _start(out, 0.5)
    proc.send_signal(sig)
    proc.wait(timeout=60)
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
