"""Text generation and the generation-quality metrics that perplexity hides (issue 8).

Low-rank models can keep a fine perplexity and still produce incoherent,
repetitive text. Two cheap, reference-free measures of greedy continuations:

- ``distinct_n(tokens, 2)``: unique bigrams / bigrams of one continuation
  (1.0 = no bigram repeated; loops drive it toward 0);
- ``repeat_ngram_rate(tokens, 4)``: fraction of the continuation's 4-grams
  (positions) that already occurred earlier in the same continuation.

``generation_quality`` greedily continues ``n_prompts`` prompts (the first
``prompt_len`` tokens at evenly spaced positions of the evaluation token stream)
by ``max_new_tokens`` tokens in one batch and averages both measures over the
prompts (a continuation is cut at the first EOS; one too short for any n-gram is
left out of that measure's mean).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import RanklmError


def distinct_n(tokens: Sequence[int], n: int = 2) -> float:
    """Unique n-grams / n-grams of ``tokens``; ``nan`` when there is no n-gram."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repeat_ngram_rate(tokens: Sequence[int], n: int = 4) -> float:
    """Fraction of the n-grams of ``tokens`` that already appeared earlier in ``tokens``; ``nan`` if none."""
    seen: set[tuple] = set()
    repeats = total = 0
    for i in range(len(tokens) - n + 1):
        g = tuple(tokens[i : i + n])
        total += 1
        if g in seen:
            repeats += 1
        seen.add(g)
    return repeats / total if total else float("nan")


def _nanmean(xs: list[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else float("nan")


@dataclass
class GenerationQuality:
    distinct2: float
    repeat4: float
    prompts: int
    prompt_len: int
    new_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"distinct-2 {self.distinct2:.3f}, repeated 4-grams {self.repeat4:.3f}"


def prompts_from_stream(stream: torch.Tensor, n_prompts: int = 20, prompt_len: int = 32, span: int = 0) -> torch.Tensor:
    """``[n, prompt_len]`` prompts starting at evenly spaced positions of a 1-D token stream.

    ``span`` reserves that many tokens after each start (e.g. the continuation length) when possible."""
    stream = stream.reshape(-1)
    last_start = stream.numel() - prompt_len - span
    if last_start < 0:
        last_start = stream.numel() - prompt_len
    if last_start < 0:
        raise RanklmError(f"evaluation text too short for a {prompt_len}-token prompt ({stream.numel()} tokens)")
    n = max(1, min(n_prompts, last_start + 1))
    starts = [round(i * last_start / max(n - 1, 1)) for i in range(n)] if n > 1 else [0]
    return torch.stack([stream[s : s + prompt_len] for s in starts])


def _eos_ids(model: nn.Module, tokenizer=None) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


@torch.inference_mode()
def greedy_continuations(
    model: nn.Module, prompts: torch.Tensor, max_new_tokens: int = 64, batch_size: int = 20, tokenizer=None
) -> list[list[int]]:
    """Greedy continuations (new tokens only, cut at the first EOS) of equal-length prompts."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = next(iter(eos)) if eos else 0
    out: list[list[int]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            ids = prompts[i : i + batch_size].to(device)
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                min_new_tokens=1, do_sample=False, pad_token_id=pad, num_beams=1,
            )
            for row in gen[:, ids.shape[1] :].tolist():
                cut = next((j for j, t in enumerate(row) if t in eos), len(row))
                out.append(row[:cut])
    finally:
        model.train(was_training)
    return out


def quality_of(continuations: list[list[int]], prompt_len: int = 0, new_tokens: int = 0) -> GenerationQuality:
    return GenerationQuality(
        distinct2=_nanmean([distinct_n(c, 2) for c in continuations]),
        repeat4=_nanmean([repeat_ngram_rate(c, 4) for c in continuations]),
        prompts=len(continuations),
        prompt_len=prompt_len,
        new_tokens=new_tokens,
    )


def generation_quality(
    model: nn.Module, prompts: torch.Tensor, max_new_tokens: int = 64, batch_size: int = 20, tokenizer=None
) -> GenerationQuality:
    """Mean distinct-2 and repeated-4-gram rate of greedy continuations of ``prompts``."""
    conts = greedy_continuations(model, prompts, max_new_tokens, batch_size, tokenizer)
    return quality_of(conts, int(prompts.shape[1]), max_new_tokens)


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template (Instruct models do)."""
    return bool(getattr(tokenizer, "chat_template", None))


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stream=None,
    chat: bool = False,
    max_positions: int | None = None,
) -> str:
    """Generate from ``prompt`` (greedy, or sampled with temperature/top-p), streaming text to ``stream``
    (stdout by default) as tokens arrive; returns the generated text (without the prompt).

    ``chat``: the prompt becomes a user message in the tokenizer's chat template, followed by the
    assistant's generation prompt (what an Instruct model was trained on). ``max_positions``: the
    model's position limit; a prompt plus ``max_new_tokens`` past it is refused before generating."""
    from transformers import TextStreamer

    if tokenizer is None:
        raise RanklmError("generation needs the model's tokenizer")
    if max_new_tokens < 1:
        raise RanklmError("--max-new-tokens must be a positive integer")
    if sample and not (temperature > 0 and math.isfinite(temperature)):
        raise RanklmError(f"--temperature must be > 0, got {temperature}")
    if sample and not (0 < top_p <= 1):
        raise RanklmError(f"--top-p must lie in (0, 1], got {top_p}")
    if not callable(getattr(model, "generate", None)) or not getattr(model, "can_generate", lambda: False)():
        raise RanklmError(f"{type(model).__name__} cannot generate text (not a causal language model)")
    torch.manual_seed(seed)
    if chat:
        if not has_chat_template(tokenizer):
            raise RanklmError("--chat: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and (ids.numel() == 0 or int(ids[0, 0]) != bos):
            ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
    if ids.numel() == 0:
        raise RanklmError("the prompt is empty")
    if max_positions is not None and ids.shape[1] + max_new_tokens > max_positions:
        raise RanklmError(
            f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} is longer than the model's "
            f"{max_positions} positions: ask for at most {max(max_positions - ids.shape[1], 0)} new tokens"
        )
    device = next(model.parameters()).device
    ids = ids.to(device)

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            import sys

            out = stream or sys.stdout
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    streamer = _Streamer(tokenizer, skip_prompt=chat, skip_special_tokens=True)  # chat: the answer only
    eos = _eos_ids(model, tokenizer)
    kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else dict(do_sample=False)
    with torch.inference_mode():
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=streamer,
            pad_token_id=next(iter(eos)) if eos else 0, **kwargs,
        )
    return tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
