"""svdkit: SVD-based post-training compression of large language models, with paper-style evaluation."""

from .compress import compress
from .data import calibration, load_text
from .evaluation import ZeroShotError, perplexity, zero_shot
from .generation import generate_text
from .io import load, save
from .kvcache import cache_bytes_per_token, enable_low_rank_kv_cache
from .methods import ASVD, FWSVD, METHODS, SVD, SVDLLM, SVDLLMV2, AdaSVD, ResSVD, SVDLLMUpdate, get_method
from .models import count_parameters, load_model
from .modules import LowRankLinear
from .quant import QuantConfig, QuantLinear, quantize_model, stored_bytes

__version__ = "0.1.0"

__all__ = [
    "ASVD",
    "AdaSVD",
    "ResSVD",
    "FWSVD",
    "METHODS",
    "SVD",
    "SVDLLM",
    "SVDLLMUpdate",
    "SVDLLMV2",
    "LowRankLinear",
    "QuantConfig",
    "QuantLinear",
    "__version__",
    "calibration",
    "compress",
    "count_parameters",
    "get_method",
    "load",
    "load_model",
    "load_text",
    "perplexity",
    "quantize_model",
    "save",
    "stored_bytes",
    "ZeroShotError",
    "zero_shot",
    "generate_text",
    "enable_low_rank_kv_cache",
    "cache_bytes_per_token",
]
