"""svdkit: SVD-based post-training compression of large language models, with paper-style evaluation."""

from .data import calibration, load_text
from .evaluation import perplexity
from .models import count_parameters, load_model

__version__ = "0.1.0"

__all__ = ["calibration", "count_parameters", "load_model", "load_text", "perplexity", "__version__"]
