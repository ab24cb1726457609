"""Atomic writes: a folder or a file appears under its final name complete, or not at all.

``atomic_dir`` yields ``DIR.tmp-XXXX`` beside the destination; when the body succeeds the tree
gets the modes ``save_pretrained`` leaves (0777/0666 less the umask: 0755/0644 usually), is
fsynced and swapped into place (Linux ``renameat2(RENAME_EXCHANGE)``, else two renames), so an
interrupted write never leaves a half folder under the final name and an overwrite keeps the
previous folder until the new one is complete. ``atomic_file`` does the same for one file
(``NAME.tmp``, then a rename). Either removes its temp path on any failure.

A write the file system refuses (a full disk, no write permission) is a ``RanklmError`` of one
line naming the destination and the cause; the previous output is left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import RanklmError


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing destination unless ``overwrite``; call before any long work."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise RanklmError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise RanklmError(f"output {out} exists and is not a directory")
    return out


# --------------------------------------------------------------------------- modes


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (else set and restore at once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_dir_mode(folder: Path) -> None:
    """Give a ``tempfile.mkdtemp`` folder (0700) the mode ``mkdir`` would: 0777 less the umask (0755 usually)."""
    os.chmod(folder, 0o777 & ~_umask())


def public_file_mode(path: Path) -> None:
    """Give a file the mode ``open(..., "w")`` would: 0666 less the umask (0644 usually; safetensors writes 0600)."""
    os.chmod(path, 0o666 & ~_umask())


def public_tree_modes(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask (0755/0644 usually), as ``save_pretrained`` leaves them:
    ``mkdtemp`` makes 0700 folders and safetensors writes 0600 files."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


# --------------------------------------------------------------------------- durability and renames


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for f in files:
            path = Path(root) / f
            if path.is_file() and not path.is_symlink():
                _fsync_file(path)
        _fsync_dir(Path(root))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` folder under ``out``; an existing ``out`` stays whole until then."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):  # atomic swap: the old folder now sits in tmp
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # no renameat2: two renames (a crash between them leaves the old folder in *.old-*)
    trash = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, trash / out.name)
    except BaseException:
        trash.rmdir()
        raise
    try:
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):  # put the previous folder back; if that fails it stays in *.old-*
            os.replace(trash / out.name, out)
            trash.rmdir()
        raise
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- errors

_RUST_IO_ERROR = re.compile(r"(?:I/O error: )?([^:()\"]+?) \(os error \d+\)")


def io_error_cause(e: BaseException) -> str | None:
    """The cause of a failed file-system call (an ``OSError``, or an I/O error a Rust library such as
    safetensors reports as ``... (os error 28)``), e.g. ``No space left on device``; None for anything else."""
    if isinstance(e, OSError):
        return e.strerror or str(e).strip() or type(e).__name__
    m = _RUST_IO_ERROR.search(str(e))
    return m.group(1).strip() if m else None


@contextlib.contextmanager
def _write_errors(out: Path, existed: bool) -> Iterator[None]:
    """Turn a file-system failure inside the block into one line naming ``out`` and the cause."""
    try:
        yield
    except RanklmError:
        raise
    except Exception as e:  # only I/O failures are rewritten; the rest propagates as is
        cause = io_error_cause(e)
        if cause is None:
            raise
        kept = f"; the previous {out} is unchanged" if existed else ""
        raise RanklmError(f"cannot write {out}: {cause}{kept}") from None


# --------------------------------------------------------------------------- the two writers


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``path``; on success rename it to ``path``, on any failure remove it.

    An existing ``path`` is refused unless ``overwrite`` (``check_output_dir``) and otherwise
    replaced only once the new folder is complete.
    """
    out = check_output_dir(path, overwrite)
    existed = out.exists()
    tmp: Path | None = None
    try:
        with _write_errors(out, existed):
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
            public_dir_mode(tmp)  # mkdtemp makes it 0700; the output is a folder like save_pretrained's
            yield tmp
            public_tree_modes(tmp)
            _fsync_tree(tmp)
            _swap_in(tmp, out)
            _fsync_dir(out.parent)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield ``<path>.tmp`` to write; on success give it 0666 less the umask, fsync it and rename it to
    ``path`` (replacing any previous file at once); on any failure remove it, the previous file intact."""
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with _write_errors(out, out.exists()):
            out.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            public_file_mode(tmp)
            _fsync_file(tmp)
            os.replace(tmp, out)
            _fsync_dir(out.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


__all__ = ["atomic_dir", "atomic_file", "check_output_dir", "io_error_cause", "public_dir_mode", "public_file_mode",
           "public_tree_modes", "sha256_file"]
