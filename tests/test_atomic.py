"""ranklm.atomic: folders and files appear whole or not at all; a refused write is one line, the old output intact."""

from __future__ import annotations

import errno
import os
import stat

import pytest

import ranklm.atomic as atomic
from ranklm.atomic import atomic_dir, atomic_file, io_error_cause, sha256_file
from ranklm.errors import RanklmError


def _previous(out):
    out.mkdir()
    (out / "a.txt").write_text("old")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _full_disk(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_dir_writes_swaps_and_sets_public_modes(tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("one")
            os.chmod(tmp / "a.txt", 0o600)  # as safetensors leaves its files
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("two")
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE((out / "b.txt").stat().st_mode) == 0o644
    assert list(tmp_path.iterdir()) == [out]  # no *.tmp-* or *.old-* left


def test_atomic_dir_refuses_an_existing_output_without_overwrite(tmp_path):
    out = tmp_path / "out"
    before = _previous(out)
    with pytest.raises(RanklmError, match="already exists"), atomic_dir(out):
        pytest.fail("the body must not run")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("exchange", [True, False])
def test_full_disk_is_one_line_and_keeps_the_previous_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    before = _previous(out)
    with pytest.raises(RanklmError) as info, atomic_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
        _full_disk()
    msg = str(info.value)
    assert "\n" not in msg and str(out) in msg and "No space left on device" in msg and "unchanged" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert list(tmp_path.iterdir()) == [out]


def test_safetensors_io_error_is_recognised():
    e = Exception('Error while serializing: I/O error: No space left on device (os error 28) at path "/x/.tmpA"')
    assert io_error_cause(e) == "No space left on device"
    assert io_error_cause(ValueError("a bug")) is None
    assert io_error_cause(PermissionError(errno.EACCES, "Permission denied", "/x")) == "Permission denied"


def test_no_write_permission_is_one_line(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out.tmp-x"))

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", denied)
    with pytest.raises(RanklmError, match=r"^cannot write .*out: Permission denied$"), atomic_dir(tmp_path / "out"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_failed_second_rename_puts_the_previous_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    before = _previous(out)
    real = os.replace
    calls = []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new folder onto the final name
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(a, b)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(RanklmError, match="unchanged"), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    monkeypatch.setattr(atomic.os, "replace", real)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert list(tmp_path.iterdir()) == [out]


def test_other_errors_and_interrupts_propagate_unchanged(tmp_path):
    with pytest.raises(ValueError, match="a bug"), atomic_dir(tmp_path / "out"):
        raise ValueError("a bug")
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "out"):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_file(tmp_path):
    f = tmp_path / "sub" / "state.bin"
    with atomic_file(f) as tmp:
        assert tmp.name == "state.bin.tmp"
        tmp.write_bytes(b"one")
        os.chmod(tmp, 0o600)
    assert f.read_bytes() == b"one" and stat.S_IMODE(f.stat().st_mode) == 0o666 & ~atomic._umask()
    with pytest.raises(RanklmError, match=r"cannot write .*state.bin: No space left on device; the previous"), \
            atomic_file(f) as tmp:
        tmp.write_bytes(b"two")
        _full_disk()
    assert f.read_bytes() == b"one" and sorted(p.name for p in f.parent.iterdir()) == ["state.bin"]
    assert sha256_file(f) == "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
