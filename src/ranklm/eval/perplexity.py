"""Token perplexity exactly as docs/design.md §2 defines it.

The text is one token stream (BOS once at the start), cut into non-overlapping
windows of ``seq_len`` (tail dropped); ``ppl = exp(mean next-token NLL)`` over
every predicted token (``seq_len - 1`` per window). The result carries the
numbers needed to reproduce it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..architectures import is_causal_lm, not_causal_reason
from ..errors import RanklmError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean next-token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"ppl {self.ppl:.3f} ({self.windows} windows x {self.seq_len} tokens, {self.tokens} predicted tokens)"


def require_causal_lm(model: nn.Module) -> None:
    """Refuse (one RanklmError line) a model without a next-token head: encoders, masked-LM heads."""
    if not is_causal_lm(model):
        raise RanklmError(f"perplexity needs a causal language model; {not_causal_reason(model)}")


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "perplexity"
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` ([N, seq_len] token ids)."""
    require_causal_lm(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    count = 0
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="batch"):
        ids = windows[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        # one window at a time: logits[j, :-1] is a view, so the only temporary is one window's
        # log-softmax (the batched reshape copied the whole [batch, seq, vocab] logits twice)
        for j in range(len(ids)):
            total_nll += float(F.cross_entropy(logits[j, :-1].float(), ids[j, 1:], reduction="sum"))
        count += ids[:, 1:].numel()
        del logits
    model.train(was_training)
    mean = total_nll / count
    if not math.isfinite(mean):
        ppl = float("inf")
    else:
        ppl = math.exp(mean) if mean < 700 else float("inf")
    return PerplexityResult(ppl=ppl, nll=mean, tokens=count, windows=int(len(windows)), seq_len=int(windows.shape[1]))
