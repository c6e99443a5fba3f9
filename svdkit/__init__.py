"""svdkit: SVD-based post-training compression of large language models, with paper-style evaluation.

The package is lazy: `import svdkit` (or `import svdkit.linalg`) loads no transformers; each public name
imports its module on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "compress": "compression",
    "calibration": "data",
    "load_text": "data",
    "ZeroShotError": "evaluation",
    "perplexity": "evaluation",
    "zero_shot": "evaluation",
    "fuse_shared_inputs": "fused",
    "unfuse_shared_inputs": "fused",
    "generate_text": "generation",
    "load": "io",
    "save": "io",
    "cache_bytes_per_token": "kvcache",
    "enable_low_rank_kv_cache": "kvcache",
    "ASVD": "methods",
    "FWSVD": "methods",
    "KFAC": "methods",
    "AdaKFAC": "methods",
    "AdaKFACFT": "methods",
    "AdaKFACRF": "methods",
    "METHODS": "methods",
    "SVD": "methods",
    "SVDLLM": "methods",
    "SVDLLMV2": "methods",
    "AdaSVD": "methods",
    "AdaSVDFT": "methods",
    "SVDLLMFT": "methods",
    "FinetuneConfig": "methods",
    "ResSVD": "methods",
    "SVDLLMUpdate": "methods",
    "get_method": "methods",
    "count_parameters": "layout",
    "load_model": "models",
    "open_model": "models",
    "LowRankLinear": "modules",
    "QuantConfig": "quant",
    "QuantLinear": "quant",
    "quantize_model": "quant",
    "stored_bytes": "quant",
    "RankRules": "speed",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'svdkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
