"""Layer-by-layer (sequential) calibration, as in llm-compressor's sequential pipeline and SVD-LLM.

The inputs of block 0 are captured once (the forward is stopped there); then for
each block: run it on the cached inputs with hooks that stream its targets'
statistics, hand the statistics to a callback (which decomposes and, for
``propagate="compressed"``, installs the compressed layers), run the block again
to produce the next block's inputs, and drop the statistics. Peak memory is the
model + one block's statistics + the calibration activations at one layer
(``windows x seq_len x hidden`` floats, twice) instead of every target's
statistics at once.

Blocks are called with the keyword arguments captured at block 0 (attention
mask, position embeddings, ...), which every Hugging Face architecture passes
unchanged to each block.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..targets import Target, find_blocks
from .collect import backbone
from .statistic import blockwise
from .stats import collect_activations


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int
) -> list[tuple[tuple, dict[str, Any]]]:
    """(args, kwargs) of block 0 for every calibration batch."""
    captured: list[tuple[tuple, dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Stop

    body = backbone(model)
    extra = {"use_cache": False} if hasattr(getattr(body, "config", None), "use_cache") else {}
    device = next(model.parameters()).device
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(windows), batch_size):
            try:
                body(input_ids=windows[i : i + batch_size].to(device), **extra)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    needs: frozenset[str],
    on_block: Callable[[int, list[Target], dict[str, dict[str, Any]]], None],
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "sequential calibration",
    by_output: Callable[[Target], bool] | None = None,
    seconds: dict[str, float] | None = None,
) -> None:
    """Stream statistics block by block; ``on_block(index, block_targets, stats)`` may compress the block.

    ``needs``: activation statistics only (gradient ones need whole-model backward passes).
    ``by_output(target)``: collect that target's output-side replacements (its output covariance instead
    of its input Gram, :func:`~ranklm.calibration.stats.collect_activations`). ``seconds`` (if given) gets where the
    time went: ``statistics_s`` (the block run with hooks), ``on_block_s`` (the callback: factorize and
    install) and ``propagate_s`` (the next block's inputs through the possibly compressed block).
    """
    if not blockwise(needs):
        raise ValueError(f"block-by-block calibration collects activation statistics only, not all of {sorted(needs)}")
    seconds = {} if seconds is None else seconds
    for key in ("statistics_s", "on_block_s", "propagate_s"):
        seconds.setdefault(key, 0.0)
    found = find_blocks(model)
    assert found is not None
    prefix, blocks = found
    inputs = capture_block_inputs(model, blocks, windows, batch_size)
    for b in tqdm(range(len(blocks)), desc=desc, disable=not progress, unit="block"):
        block = blocks[b]
        block_targets = [t for t in targets if t.block == b]
        if block_targets:
            out_side = {t.name for t in block_targets if by_output is not None and by_output(t)}
            t0 = time.perf_counter()
            stats = _block_stats(model, block, block_targets, inputs, needs, out_side)
            t1 = time.perf_counter()
            on_block(b, block_targets, stats)
            del stats
            seconds["statistics_s"] += t1 - t0
            seconds["on_block_s"] += time.perf_counter() - t1
        if b + 1 < len(blocks):  # next block's inputs from this (possibly compressed) block
            t0 = time.perf_counter()
            inputs = [_with_hidden(a, k, _hidden(block(*a, **k))) for a, k in inputs]
            seconds["propagate_s"] += time.perf_counter() - t0


def _block_stats(
    model: nn.Module, block: nn.Module, targets: list[Target], inputs: list[tuple[tuple, dict]], needs: frozenset[str],
    by_output: frozenset[str] | set[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """Activation statistics ``needs`` of one block's targets over the cached inputs (``by_output``: target names)."""
    fake_windows = torch.arange(len(inputs))[:, None]  # one "window" per cached batch

    class Runner(nn.Module):  # collect_activations drives backbone(model)(input_ids=...)
        def __init__(self) -> None:
            super().__init__()
            self.block = block
            device = next(block.parameters()).device
            self.anchor = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)

        def forward(self, input_ids: torch.Tensor, **_: Any) -> None:
            for i in input_ids[:, 0].tolist():
                a, k = inputs[i]
                block(*a, **k)

    runner = Runner()
    local = [Target(f"block.{t.name.split(f'.{t.block}.', 1)[1]}", t.out_features, t.in_features, t.kind, t.block) for t in targets]
    local_out = {lt.name for t, lt in zip(targets, local) if t.name in by_output}
    stats = collect_activations(runner, local, fake_windows, needs, batch_size=1, progress=False,
                                by_output=lambda lt: lt.name in local_out)
    return {t.name: {**stats[lt.name], "name": t.name} for t, lt in zip(targets, local)}
