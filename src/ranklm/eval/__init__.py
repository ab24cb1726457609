"""Evaluation: perplexity (docs/design.md §2), latency, generation quality, lm-eval bridge (§7)."""

from .generate import GenerationQuality, distinct_n, generation_quality, repeat_ngram_rate, stream_generate
from .latency import LatencyResult, dense_counterpart, flop_ratio_limit, measure_latency
from .perplexity import PerplexityResult, perplexity, require_causal_lm

__all__ = [
    "GenerationQuality",
    "LatencyResult",
    "PerplexityResult",
    "dense_counterpart",
    "distinct_n",
    "flop_ratio_limit",
    "generation_quality",
    "measure_latency",
    "perplexity",
    "repeat_ngram_rate",
    "require_causal_lm",
    "stream_generate",
]
