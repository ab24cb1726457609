"""How much memory this process may still use: RAM (``/proc/meminfo``, the cgroup limit) and a GPU's free memory.

Why here, without psutil: the memory preflight (``pipeline.memory``) compares its estimate with these numbers
before any statistic is collected, and a user must be able to cap it (``RANKLM_MEMORY_LIMIT=8G``: a shared
machine, a job scheduler's limit) or a test to simulate a small machine, with no new dependency.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MEMORY_LIMIT_ENV = "RANKLM_MEMORY_LIMIT"  # bytes, or 512M / 8G / 1.5T: the RAM ranklm may use at most
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """``"8G"`` -> 8 GiB in bytes (K/M/G/T, optional ``i``/``B``: powers of 1024); ValueError if unreadable."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 8G, 512M, 1073741824)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def gib(n: float) -> str:
    """Bytes as ``"12.3 GiB"``."""
    return f"{n / 2**30:.1f} GiB"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # not Linux: the physical memory, an upper bound
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's cgroup (v2, then v1), or None when unlimited or unknown."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max" or int(raw) >= 2**60:
                return None
            return max(int(raw) - int(Path(usage_file).read_text().strip()), 0)
        except (OSError, ValueError):
            continue
    return None


def rss_bytes() -> int:
    """Resident set size of this process (``/proc/self/statm``; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Why: a backward pass frees gigabytes of activations in pieces of a few MB, below glibc's mmap threshold, so
    they stay in the heap and in the resident size; the Grams allocated next (hundreds of MB each, mmapped) come
    on top. Observed on the Llama-3.2-1B shape without it: the peak rose from 7.99 GiB after the backward to
    8.25 GiB in the first block (the effect of the trim there is not measured yet).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_memory() -> tuple[int | None, str]:
    """``(bytes this process may still allocate, where the number comes from)``; None when unknown.

    ``RANKLM_MEMORY_LIMIT`` is a cap on the whole process (its current resident memory counts against it);
    otherwise the smaller of the kernel's MemAvailable and the cgroup's remaining room.
    """
    cap = os.environ.get(MEMORY_LIMIT_ENV)
    if cap:
        try:
            limit = parse_bytes(cap)
        except ValueError as e:
            from .errors import RanklmError

            raise RanklmError(f"{MEMORY_LIMIT_ENV}: {e}") from None
        return max(limit - rss_bytes(), 0), f"{MEMORY_LIMIT_ENV}={cap}"
    found = [(v, src) for v, src in ((_meminfo_available(), "MemAvailable"), (_cgroup_room(), "cgroup limit"))
             if v is not None]
    if not found:
        return None, "unknown"
    return min(found)


def device_free_memory(device) -> int | None:
    """Free memory of a CUDA device (``torch.cuda.mem_get_info``); None for the CPU or when unknown."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free)


__all__ = ["MEMORY_LIMIT_ENV", "available_memory", "device_free_memory", "gib", "parse_bytes", "release_freed_memory",
           "rss_bytes"]
