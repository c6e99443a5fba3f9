"""Evaluation that works on any causal LM, dense or compressed."""

from .perplexity import PerplexityResult, perplexity
from .zeroshot import ZeroShotError, zero_shot

__all__ = ["PerplexityResult", "ZeroShotError", "perplexity", "zero_shot"]
