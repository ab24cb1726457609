"""Forward latency, dense vs compressed, measured as docs/design.md §2 defines the speed-up.

Both models run in the same process on the same random token ids, under
``torch.inference_mode`` with ``use_cache=False``, after ``warmup`` untimed passes
of each; then the timed repetitions alternate dense / compressed (so drifts in
clock speed or background load hit both alike) and the speed-up per
``(batch, seq_len)`` is ``median(dense) / median(compressed)``.

The limit to compare against is the FLOP ratio of the targets: per token a dense
``m x n`` target costs ``m*n`` multiply-adds, a rank-k one ``k*(m+n)`` (a target
kept dense costs ``m*n``). The rest of the model (attention scores, norms,
embeddings, LM head) is not compressed, so the whole-model speed-up stays below
that limit, and more so the larger the LM head is relative to the blocks.

Decode speed (generation with a KV cache) is in ``decode_timing``, the limits in
``speedup_limits``, CUDA-graph capture in ``cuda_graphs``; their public names are importable
from here too.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RanklmError
from ..layers import merge_low_rank
from .cuda_graphs import graphed, require_cuda, sync
from .decode_timing import (
    DEFAULT_DECODE,
    GRAPH_WARMUP_STEPS,
    DecodeResult,
    measure_decode,
    parse_decode_tokens,
)
from .speedup_limits import (
    flop_ratio_limit,
    flop_ratio_of_model,
    linear_macs,
    target_macs,
    tensor_core_note,
    weight_bytes_per_token,
)

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1, 128), (1, 512), (8, 128), (8, 512))


@dataclass
class LatencyPoint:
    batch: int
    seq_len: int
    dense_ms: float
    compressed_ms: float
    speedup: float
    reps: int


@dataclass
class LatencyResult:
    points: list[LatencyPoint]
    flop_ratio_limit: float
    threads: int
    device: str
    extra: dict = field(default_factory=dict)
    decode: DecodeResult | None = None

    def point(self, batch: int, seq_len: int) -> LatencyPoint | None:
        return next((p for p in self.points if p.batch == batch and p.seq_len == seq_len), None)

    @property
    def headline(self) -> LatencyPoint:
        """Batch 8, seq 512 if measured, else the largest shape measured."""
        return self.point(8, 512) or max(self.points, key=lambda q: q.batch * q.seq_len)

    @property
    def speedup(self) -> float:
        return self.headline.speedup

    def to_dict(self) -> dict:
        return {
            "speedup": self.speedup,
            "flop_ratio_limit": self.flop_ratio_limit,
            "headline": [self.headline.batch, self.headline.seq_len],
            "points": [asdict(p) for p in self.points],
            "threads": self.threads,
            "device": self.device,
            **self.extra,
            **({"decode": asdict(self.decode)} if self.decode is not None else {}),
        }

    def table(self) -> str:
        lines = [f"{'batch':>5} {'seq':>5} {'dense ms':>10} {'compressed ms':>14} {'speed-up':>9}"]
        for p in self.points:
            lines.append(f"{p.batch:>5} {p.seq_len:>5} {p.dense_ms:>10.2f} {p.compressed_ms:>14.2f} {p.speedup:>8.2f}x")
        if self.extra.get("cuda_graphs"):
            lines.append("each forward replayed from a CUDA graph (no per-kernel launch cost)")
        if "flop_ratio_linear_layers" in self.extra:
            lines.append(f"FLOP ratio of all linear layers (LM head included): {self.extra['flop_ratio_linear_layers']:.2f}x")
        lines.append(f"FLOP-ratio limit of the targets: {self.flop_ratio_limit:.2f}x  "
                     f"({self.threads} threads, {self.device}, medians of {self.points[0].reps} interleaved runs)")
        if self.decode is not None:
            lines.append(self.decode.line())
        return "\n".join(lines)


def timed_point(batch: int, seq_len: int, runs: list[Callable[[], Any]], reps: int, warmup: int,
                sync_fn: Callable[[], None] = lambda: None) -> LatencyPoint:
    """Median time of ``runs[0]`` (dense) and ``runs[1]`` (compressed) over ``reps`` interleaved
    repetitions, after ``warmup`` untimed calls of each; the order alternates every repetition."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(reps):
        order = (0, 1) if r % 2 == 0 else (1, 0)  # alternate who goes first too
        for which in order:
            sync_fn()
            t0 = time.perf_counter()
            runs[which]()
            sync_fn()
            times[which].append(time.perf_counter() - t0)
    d, c = statistics.median(times[0]), statistics.median(times[1])
    return LatencyPoint(batch, seq_len, d * 1e3, c * 1e3, d / c if c > 0 else float("inf"), reps)


def measure_latency(
    dense: nn.Module,
    compressed: nn.Module,
    shapes: tuple[tuple[int, int], ...] | list[tuple[int, int]] = DEFAULT_SHAPES,
    reps: int = 10,
    warmup: int = 2,
    seed: int = 0,
    flop_limit: float | None = None,
    cuda_graphs: bool = False,
) -> LatencyResult:
    """Median forward latency of ``dense`` vs ``compressed`` per ``(batch, seq_len)``, interleaved runs.

    ``cuda_graphs``: time replays of each model's forward captured in a CUDA graph (GPU only).
    """
    if reps < 1 or warmup < 0:
        raise ValueError("reps must be >= 1 and warmup >= 0")
    device = next(compressed.parameters()).device
    if cuda_graphs:
        require_cuda(device)
    vocab = int(getattr(getattr(compressed, "config", None), "vocab_size", 0) or 100)
    g = torch.Generator().manual_seed(seed)
    modes = [(dense, dense.training), (compressed, compressed.training)]
    for m, _ in modes:
        m.eval()
    kw = {"use_cache": False} if hasattr(getattr(compressed, "config", None), "use_cache") else {}
    points = []
    try:
        with torch.inference_mode():
            for batch, seq in shapes:
                ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
                runs: list[Callable[[], Any]] = [lambda m=m: m(input_ids=ids, **kw) for m in (dense, compressed)]
                graphs = []
                if cuda_graphs:
                    for i, run in enumerate(runs):
                        runs[i], graph = graphed(run, warmup)
                        graphs.append(graph)
                points.append(timed_point(batch, seq, runs, reps, warmup, lambda: sync(device)))
                del runs, graphs  # free the graphs' memory pools before the next shape
    finally:
        for m, was in modes:
            m.train(was)
    limit = flop_ratio_of_model(compressed) if flop_limit is None else flop_limit
    # All linear layers, LM head included: a tighter limit for the whole forward (attention scores still excluded).
    model_ratio = linear_macs(dense) / max(linear_macs(compressed), 1)
    extra: dict[str, Any] = {"flop_ratio_linear_layers": model_ratio}
    if cuda_graphs:
        extra["cuda_graphs"] = True
    return LatencyResult(points, limit, torch.get_num_threads(), str(device), extra=extra)


def dense_counterpart(compressed: nn.Module) -> nn.Module:
    """A dense copy of a compressed model (factors multiplied back into plain linears)."""
    state = getattr(compressed, "ranklm", None)
    if state is not None:
        del compressed.ranklm  # keep the (possibly large) state out of the deep copy
    try:
        dense = copy.deepcopy(compressed)
    finally:
        if state is not None:
            compressed.ranklm = state
    merge_low_rank(dense)
    return dense


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """``"1x128,8x512"`` -> ``[(1, 128), (8, 512)]``."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        b, sep, s = item.lower().partition("x")
        if not sep or not b.isdigit() or not s.isdigit() or int(b) < 1 or int(s) < 1:
            raise RanklmError(f"bad latency shape {item!r}: expected BATCHxSEQ, e.g. 8x512")
        out.append((int(b), int(s)))
    if not out:
        raise RanklmError("no latency shapes given")
    return out


__all__ = [
    "DEFAULT_DECODE",
    "DEFAULT_SHAPES",
    "GRAPH_WARMUP_STEPS",
    "DecodeResult",
    "LatencyPoint",
    "LatencyResult",
    "dense_counterpart",
    "flop_ratio_limit",
    "flop_ratio_of_model",
    "linear_macs",
    "measure_decode",
    "measure_latency",
    "parse_decode_tokens",
    "parse_shapes",
    "target_macs",
    "tensor_core_note",
    "timed_point",
    "weight_bytes_per_token",
]
