"""CUDA graphs for timing: a captured forward or decode step replayed with no launch or Python overhead.

A small model on a large GPU is bound by kernel launches and Python, not by FLOPs or bytes;
replaying a captured graph removes both, so the timing shows what the kernels themselves cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import RanklmError


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a timer brackets the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise RanklmError(f"CUDA graphs need a CUDA device; the model is on {device} (use --device cuda)")


def graphed(fn: Callable[[], Any], warmup: int) -> tuple[Callable[[], None], Any]:
    """Capture ``fn`` in a CUDA graph; returns its replay and the graph (keep it alive while replaying).

    Warm-up runs on a side stream first, as capture requires (lazy inits, cuBLAS workspaces).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:  # e.g. a host sync inside the forward: the model cannot be captured
        raise RanklmError(f"this model's forward cannot be captured in a CUDA graph: {str(e).splitlines()[0]}") from e
    return graph.replay, graph


__all__ = ["graphed", "require_cuda", "sync"]
