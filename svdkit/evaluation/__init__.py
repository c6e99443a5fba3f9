"""Evaluation that works on any causal LM, dense or compressed."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
