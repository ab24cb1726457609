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

Decode (generation with a KV cache, :func:`measure_decode`) is memory-bound at batch 1:
each new token reads every weight once, so its limit is the ratio of weight bytes
read per decoded token (:func:`weight_bytes_per_token`), not of FLOPs.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..budget import DENSE, RankMap, target_cost
from ..targets import Target

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1, 128), (1, 512), (8, 128), (8, 512))
DEFAULT_DECODE: tuple[int, int] = (128, 128)  # prompt tokens, new tokens
GRAPH_WARMUP_STEPS = 2  # eager decode steps before a step is captured (they use cache positions too)


def target_macs(targets: list[Target], rank_map: RankMap | None = None) -> int:
    """Multiply-adds per token of the targets (dense when ``rank_map`` is None)."""
    # a linear layer does one multiply-add per parameter per token, so MACs are the docs/design.md §2 cost
    return sum(target_cost(t, DENSE if rank_map is None else rank_map.get(t.name, DENSE)) for t in targets)


def flop_ratio_limit(targets: list[Target], rank_map: RankMap) -> float:
    """Dense target FLOPs / compressed target FLOPs."""
    return target_macs(targets) / max(target_macs(targets, rank_map), 1)


def flop_ratio_of_model(model: nn.Module) -> float:
    """FLOP ratio of a compressed model: from its ``model.ranklm`` state, else from its LowRankLinear layers."""
    state = getattr(model, "ranklm", None)
    if state is not None and getattr(state, "targets", None):
        return flop_ratio_limit(state.targets, state.rank_map)
    from ..layers import LowRankLinear

    dense = comp = 0
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            dense += m.in_features * m.out_features
            comp += m.rank * (m.in_features + m.out_features)
    return dense / comp if comp else 1.0


def linear_macs(model: nn.Module) -> int:
    """Multiply-adds per token of every linear layer of a model (LM head included; attention scores not)."""
    from ..targets import is_linear_like, weight_matrix

    return sum(int(weight_matrix(m).numel()) for m in model.modules() if is_linear_like(m))


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads at batch 1 (the decode limit is the dense/compressed ratio).

    Counted: weight and bias of every linear layer (``nn.Linear``/``Conv1D``; a LowRankLinear as its two
    factors; the LM head in full, tied to the embedding or not) and one row of each ``nn.Embedding``
    (the lookup). Not counted: norms (tiny), the KV cache and attention (not weights; the same in both
    models, so the measured speed-up stays below the limit, more so at long contexts).
    """
    from ..targets import is_linear_like

    total = 0
    for m in model.modules():
        if is_linear_like(m):
            total += sum(p.numel() * p.element_size() for p in (m.weight, getattr(m, "bias", None)) if p is not None)
        elif isinstance(m, nn.Embedding):
            total += m.weight.shape[1] * m.weight.element_size()
    return total


@dataclass
class DecodeResult:
    """Greedy generation at batch 1 with a KV cache: median decode tokens/s, dense vs compressed."""

    prompt_len: int
    new_tokens: int
    dense_tok_s: float
    compressed_tok_s: float
    speedup: float
    limit: float  # weight bytes per token, dense / compressed
    dense_bytes_per_token: int
    compressed_bytes_per_token: int
    reps: int
    cuda_graphs: bool = False

    def line(self) -> str:
        how = ", static KV cache, CUDA graphs" if self.cuda_graphs else ", KV cache"
        return (f"decode (batch 1{how}, {self.new_tokens} new tokens after a {self.prompt_len}-token prompt): "
                f"dense {self.dense_tok_s:.1f} tok/s, compressed {self.compressed_tok_s:.1f} tok/s, "
                f"speed-up {self.speedup:.2f}x vs weight-bytes limit {self.limit:.2f}x")


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _require_cuda(device: torch.device) -> None:
    from ..errors import RanklmError

    if device.type != "cuda":
        raise RanklmError(f"CUDA graphs need a CUDA device; the model is on {device} (use --device cuda)")


def _graphed(fn: Callable[[], Any], warmup: int) -> tuple[Callable[[], None], Any]:
    """Capture ``fn`` in a CUDA graph; returns its replay and the graph (keep it alive while replaying).

    A small model on a large GPU is bound by kernel launches and Python, not by FLOPs or bytes;
    replaying a captured graph removes both, so the timing shows what the kernels themselves cost.
    Warm-up runs on a side stream first, as capture requires (lazy inits, cuBLAS workspaces).
    """
    from ..errors import RanklmError

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
        _require_cuda(device)
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
                        runs[i], graph = _graphed(run, warmup)
                        graphs.append(graph)
                for _ in range(warmup):
                    for run in runs:
                        run()
                times: dict[int, list[float]] = {0: [], 1: []}
                for r in range(reps):
                    order = (0, 1) if r % 2 == 0 else (1, 0)  # alternate who goes first too
                    for which in order:
                        _sync(device)
                        t0 = time.perf_counter()
                        runs[which]()
                        _sync(device)
                        times[which].append(time.perf_counter() - t0)
                del runs, graphs  # free the graphs' memory pools before the next shape
                d, c = statistics.median(times[0]), statistics.median(times[1])
                points.append(LatencyPoint(batch, seq, d * 1e3, c * 1e3, d / c if c > 0 else float("inf"), reps))
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


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _greedy_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """Prefill ``prompt`` (untimed), then ``new_tokens`` one-token steps through the KV cache (timed).

    A fixed number of steps, no EOS stop, so both models do the same work whatever they generate.
    """
    from ..errors import RanklmError

    device, key = prompt.device, _cache_kwarg(model)
    out = model(input_ids=prompt, use_cache=True)
    if _cache_of(out) is None:
        raise RanklmError(f"{type(model).__name__} returned no KV cache: decode speed needs a causal LM with use_cache")
    nxt = out.logits[:, -1:].argmax(-1)
    tokens = []
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{key: _cache_of(out)})
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    _sync(device)
    elapsed = time.perf_counter() - t0
    return torch.cat(tokens, 1)[0].tolist(), elapsed


def _static_cache(model: nn.Module, max_len: int, prompt: torch.Tensor) -> Any:
    """A fixed-size KV cache (``transformers.StaticCache``): the tensors a CUDA graph needs to stay in place."""
    from transformers import StaticCache

    from ..errors import RanklmError

    if not getattr(model, "_can_compile_fullgraph", getattr(model, "_supports_static_cache", False)):
        raise RanklmError(f"{type(model).__name__} does not support a static KV cache: decode with CUDA graphs needs one")
    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # transformers 4.x spells out batch, device and dtype
        dtype = next(model.parameters()).dtype
        return StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_len, device=prompt.device, dtype=dtype)


def _greedy_decode_static(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                          cuda_graph: bool = False, warmup_steps: int = GRAPH_WARMUP_STEPS) -> tuple[list[int], float]:
    """:func:`_greedy_decode` through a static KV cache, each step optionally replayed from a CUDA graph.

    One step reads its input token and position from fixed tensors and writes the next ones back
    (greedy argmax, position + 1), so a captured step replays with no host work at all. With
    ``cuda_graph``, ``warmup_steps`` eager steps run first (capture needs them; untimed, and their
    tokens are not returned); without it the steps run eagerly and give the same tokens as
    :func:`_greedy_decode`.
    """
    device, key = prompt.device, _cache_kwarg(model)
    warm = warmup_steps if cuda_graph else 0
    cache = _static_cache(model, prompt.shape[1] + new_tokens + warm, prompt)
    # transformers >= 5 keeps the write position in the static cache itself (a tensor, so replays advance
    # it); older versions take it as ``cache_position``, which the step then advances in place.
    pos = torch.arange(prompt.shape[1], device=device)
    where = (lambda: {"cache_position": pos}) if "cache_position" in inspect.signature(model.forward).parameters else dict
    out = model(input_ids=prompt, use_cache=True, **where(), **{key: cache})
    ids = out.logits[:, -1:].argmax(-1)
    pos = pos[-1:] + 1

    def step() -> None:
        o = model(input_ids=ids, use_cache=True, **where(), **{key: cache})
        ids.copy_(o.logits[:, -1:].argmax(-1))
        pos.add_(1)

    run: Callable[[], Any] = step
    if cuda_graph:
        run, graph = _graphed(step, warm)  # noqa: F841 (the graph must outlive its replays)
    tokens = torch.empty(1, new_tokens, dtype=ids.dtype, device=device)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(new_tokens):
        run()
        tokens[:, i : i + 1].copy_(ids)
    _sync(device)
    elapsed = time.perf_counter() - t0
    return tokens[0].tolist(), elapsed


def _check_context(model: nn.Module, length: int) -> None:
    """Refuse a prompt + generation longer than the model's position range (it would fail mid-run)."""
    from ..errors import RanklmError

    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit and length > limit:
        raise RanklmError(f"decode of {length} tokens (prompt + new) exceeds the model's {limit} positions: lower --decode-tokens")


def measure_decode(
    dense: nn.Module,
    compressed: nn.Module,
    prompt_len: int = DEFAULT_DECODE[0],
    new_tokens: int = DEFAULT_DECODE[1],
    reps: int = 10,
    warmup: int = 2,
    seed: int = 0,
    cuda_graphs: bool = False,
) -> DecodeResult:
    """Median decode tokens/s at batch 1 of ``dense`` vs ``compressed``, interleaved as in :func:`measure_latency`.

    Only the ``new_tokens`` cached one-token steps are timed (the prompt's prefill is what
    :func:`measure_latency` measures); tokens/s = ``new_tokens / median(seconds)``.
    ``cuda_graphs``: a static KV cache and each step replayed from a CUDA graph (GPU only).
    """
    if reps < 1 or warmup < 0 or prompt_len < 1 or new_tokens < 1:
        raise ValueError("reps, prompt_len and new_tokens must be >= 1 and warmup >= 0")
    _check_context(compressed, prompt_len + new_tokens + (GRAPH_WARMUP_STEPS if cuda_graphs else 0))
    device = next(compressed.parameters()).device
    if cuda_graphs:
        _require_cuda(device)

    def decode(m: nn.Module) -> float:
        if cuda_graphs:
            return _greedy_decode_static(m, prompt, new_tokens, cuda_graph=True)[1]
        return _greedy_decode(m, prompt, new_tokens)[1]

    vocab = int(getattr(getattr(compressed, "config", None), "vocab_size", 0) or 100)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    models = (dense, compressed)
    modes = [m.training for m in models]
    times: dict[int, list[float]] = {0: [], 1: []}
    try:
        for m in models:
            m.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                for m in models:
                    decode(m)
            for r in range(reps):
                for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                    times[which].append(decode(models[which]))
    finally:
        for m, was in zip(models, modes):
            m.train(was)
    d, c = statistics.median(times[0]), statistics.median(times[1])
    bd, bc = weight_bytes_per_token(dense), weight_bytes_per_token(compressed)
    return DecodeResult(prompt_len, new_tokens, new_tokens / d, new_tokens / c, d / c if c > 0 else float("inf"),
                        bd / max(bc, 1), bd, bc, reps, cuda_graphs)


def parse_decode_tokens(spec: str) -> tuple[int, int] | None:
    """``"128x128"`` -> ``(128, 128)`` (prompt tokens, new tokens); ``"0"`` -> None (no decode measurement)."""
    from ..errors import RanklmError

    spec = spec.strip().lower()
    if spec == "0":
        return None
    p, sep, n = spec.partition("x")
    if not sep or not p.isdigit() or not n.isdigit() or int(p) < 1 or int(n) < 1:
        raise RanklmError(f"bad --decode-tokens {spec!r}: expected PROMPTxNEW, e.g. 128x128, or 0 to skip decode")
    return int(p), int(n)


def dense_counterpart(compressed: nn.Module) -> nn.Module:
    """A dense copy of a compressed model (factors multiplied back into plain linears)."""
    import copy

    from ..layers import merge_low_rank

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


def tensor_core_note(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """A hint when a GPU runs half precision on factor ranks that are not multiples of 8.

    Tensor-core GEMMs want inner dimensions in multiples of 8; on the lent H100 an unrounded
    keep-0.5 checkpoint ran 0.67-0.70x of dense in bfloat16 and 0.88-0.97x with ``--round-to 32``
    (benchmarks §3c), at the same perplexity.
    """
    from ..layers import LowRankLinear

    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    ranks = [m.rank for m in model.modules() if isinstance(m, LowRankLinear)]
    odd = sum(r % 8 != 0 for r in ranks)
    if not odd:
        return None
    return (f"note: {odd} of {len(ranks)} factored layers have ranks that are not multiples of 8, which "
            f"{str(dtype).removeprefix('torch.')} GEMMs on a GPU run slowly; compress with --round-to 32 (benchmarks §3c)")


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """``"1x128,8x512"`` -> ``[(1, 128), (8, 512)]``."""
    from ..errors import RanklmError

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
