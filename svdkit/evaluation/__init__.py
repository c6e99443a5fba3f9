"""Evaluation that works on any causal LM, dense or compressed."""

from .perplexity import PerplexityResult, evaluate_corpora, perplexity
from .zeroshot import ZeroShotError, zero_shot

__all__ = ["PerplexityResult", "ZeroShotError", "evaluate_corpora", "perplexity", "zero_shot"]
