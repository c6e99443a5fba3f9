"""Text generation with a dense or compressed model, with the normal or the low-rank (latent) KV cache."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from .errors import ConfigError
from .kvcache import LowRankKVCache, cache_argument, low_rank_kv_cache

log = logging.getLogger(__name__)

KV_CACHES = ("normal", "low-rank", "low-rank-values")


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 50,
    kv_cache: Literal["normal", "low-rank", "low-rank-values"] = "normal",
    do_sample: bool = False,
    **generate_kwargs,
) -> str:
    """Continue `prompt` and return only the new text; `kv_cache="low-rank"` caches k/v latents (SVD-LLM, values
    folded, keys rebuilt: the smallest cache), `"low-rank-values"` full keys and value latents (faster than the
    normal cache on CPUs, see `LowRankKVCache`).

    Greedy by default; extra keyword arguments (`temperature`, `top_p`, `seed` via `torch.manual_seed`, ...) go to
    `model.generate`. The low-rank cache needs low-rank `k_proj`/`v_proj` and raises `LowRankKVError` otherwise."""
    if kv_cache not in KV_CACHES:
        raise ConfigError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    if inputs["input_ids"].shape[1] == 0:
        raise ConfigError("the prompt tokenizes to no tokens")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        generate_kwargs.setdefault("pad_token_id", tokenizer.eos_token_id)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
    if not do_sample:  # silence the sampling defaults a model's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        if kv_cache != "normal":
            with low_rank_kv_cache(model):
                keys = "latent" if kv_cache == "low-rank" else "full"
                kwargs[cache_argument(model)] = LowRankKVCache(model, keys=keys)
                out = model.generate(**inputs, **kwargs)
        else:
            kwargs[cache_argument(model)] = DynamicCache(config=model.config)
            out = model.generate(**inputs, **kwargs)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    log.debug("generated %d tokens with the %s KV cache", new_tokens.numel(), kv_cache)
    return tokenizer.decode(new_tokens, skip_special_tokens=True)
