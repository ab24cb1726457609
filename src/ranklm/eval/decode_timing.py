"""Decode speed: greedy generation at batch 1 through a KV cache, dense vs compressed, in tokens/s.

Decode is memory-bound at batch 1: each new token reads every weight once, so the limit is the
ratio of weight bytes read per decoded token (``speedup_limits.weight_bytes_per_token``), not of
FLOPs. Only the cached one-token steps are timed (the prompt's prefill is what
``latency.measure_latency`` measures); with ``cuda_graphs`` each step runs through a static KV
cache, replayed from a CUDA graph.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import RanklmError
from .cuda_graphs import graphed, require_cuda, sync
from .speedup_limits import weight_bytes_per_token

DEFAULT_DECODE: tuple[int, int] = (128, 128)  # prompt tokens, new tokens
GRAPH_WARMUP_STEPS = 2  # eager decode steps before a step is captured (they use cache positions too)


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
    device, key = prompt.device, _cache_kwarg(model)
    out = model(input_ids=prompt, use_cache=True)
    if _cache_of(out) is None:
        raise RanklmError(f"{type(model).__name__} returned no KV cache: decode speed needs a causal LM with use_cache")
    nxt = out.logits[:, -1:].argmax(-1)
    tokens = []
    sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{key: _cache_of(out)})
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    sync(device)
    elapsed = time.perf_counter() - t0
    return torch.cat(tokens, 1)[0].tolist(), elapsed


def _static_cache(model: nn.Module, max_len: int, prompt: torch.Tensor) -> Any:
    """A fixed-size KV cache (``transformers.StaticCache``): the tensors a CUDA graph needs to stay in place."""
    from transformers import StaticCache

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
        run, _graph = graphed(step, warm)  # the graph must outlive its replays
    tokens = torch.empty(1, new_tokens, dtype=ids.dtype, device=device)
    sync(device)
    t0 = time.perf_counter()
    for i in range(new_tokens):
        run()
        tokens[:, i : i + 1].copy_(ids)
    sync(device)
    elapsed = time.perf_counter() - t0
    return tokens[0].tolist(), elapsed


def _check_context(model: nn.Module, length: int) -> None:
    """Refuse a prompt + generation longer than the model's position range (it would fail mid-run)."""
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
        require_cuda(device)

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
    spec = spec.strip().lower()
    if spec == "0":
        return None
    p, sep, n = spec.partition("x")
    if not sep or not p.isdigit() or not n.isdigit() or int(p) < 1 or int(n) < 1:
        raise RanklmError(f"bad --decode-tokens {spec!r}: expected PROMPTxNEW, e.g. 128x128, or 0 to skip decode")
    return int(p), int(n)


__all__ = ["DEFAULT_DECODE", "GRAPH_WARMUP_STEPS", "DecodeResult", "measure_decode", "parse_decode_tokens"]
