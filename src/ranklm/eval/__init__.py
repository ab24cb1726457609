"""Evaluation: perplexity (DESIGN §2, §7)."""

from .perplexity import PerplexityResult, perplexity, require_causal_lm

__all__ = ["PerplexityResult", "perplexity", "require_causal_lm"]
