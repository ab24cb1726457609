"""The limits a measured speed-up is compared with, and a hint when a GPU cannot reach them.

Forward (prefill) is compute-bound: the limit is the FLOP ratio of the targets. Per token a
dense ``m x n`` target costs ``m*n`` multiply-adds, a rank-k one ``k*(m+n)`` (a target kept dense
costs ``m*n``); the rest of the model (attention scores, norms, embeddings, LM head) is not
compressed, so the whole-model speed-up stays below that limit. Decode at batch 1 is
memory-bound: each new token reads every weight once, so its limit is the ratio of weight bytes
read per decoded token (:func:`weight_bytes_per_token`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..budget import DENSE, RankMap, target_cost
from ..layers import LowRankLinear
from ..targets import Target, is_linear_like, weight_matrix


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
    dense = comp = 0
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            dense += m.in_features * m.out_features
            comp += m.rank * (m.in_features + m.out_features)
    return dense / comp if comp else 1.0


def linear_macs(model: nn.Module) -> int:
    """Multiply-adds per token of every linear layer of a model (LM head included; attention scores not)."""
    return sum(int(weight_matrix(m).numel()) for m in model.modules() if is_linear_like(m))


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads at batch 1 (the decode limit is the dense/compressed ratio).

    Counted: weight and bias of every linear layer (``nn.Linear``/``Conv1D``; a LowRankLinear as its two
    factors; the LM head in full, tied to the embedding or not) and one row of each ``nn.Embedding``
    (the lookup). Not counted: norms (tiny), the KV cache and attention (not weights; the same in both
    models, so the measured speed-up stays below the limit, more so at long contexts).
    """
    total = 0
    for m in model.modules():
        if is_linear_like(m):
            total += sum(p.numel() * p.element_size() for p in (m.weight, getattr(m, "bias", None)) if p is not None)
        elif isinstance(m, nn.Embedding):
            total += m.weight.shape[1] * m.weight.element_size()
    return total


def tensor_core_note(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """A hint when a GPU runs half precision on factor ranks that are not multiples of 8.

    Tensor-core GEMMs want inner dimensions in multiples of 8; on the lent H100 an unrounded
    keep-0.5 checkpoint ran 0.67-0.70x of dense in bfloat16 and 0.88-0.97x with ``--round-to 32``
    (benchmarks §3c), at the same perplexity.
    """
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    ranks = [m.rank for m in model.modules() if isinstance(m, LowRankLinear)]
    odd = sum(r % 8 != 0 for r in ranks)
    if not odd:
        return None
    return (f"note: {odd} of {len(ranks)} factored layers have ranks that are not multiples of 8, which "
            f"{str(dtype).removeprefix('torch.')} GEMMs on a GPU run slowly; compress with --round-to 32 (benchmarks §3c)")


__all__ = ["flop_ratio_limit", "flop_ratio_of_model", "linear_macs", "target_macs", "tensor_core_note",
           "weight_bytes_per_token"]
