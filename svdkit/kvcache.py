"""SVD-LLM's low-rank KV cache: keep the rank-k intermediates `W_v x` of `k_proj`/`v_proj` instead of keys and values.

A compressed attention layer computes keys as `W_u^k (W_v^k x)`. Caching the latent `z = W_v^k x` (rank numbers per
token instead of `n_kv_heads * head_dim`) gives the same attention output for less memory:
- **Values are not rebuilt at decode steps.** `W_u` of v_proj is folded into the attention output:
  `softmax(.) (Z W_u^T) = (softmax(.) Z) W_u^T`. Attention runs on the latents `Z` (one `(seq, rank)` matrix shared
  by every kv head), and each head's `rank`-wide output is then multiplied by its kv head's rows of `W_u` (plus the
  bias: softmax rows sum to one). Per step this costs `heads x rank x head_dim` instead of rebuilding
  `seq x rank x n_kv_heads x head_dim`.
- **Keys are rebuilt** (`W_u^k z`, then RoPE at the stored positions): RoPE depends on each key's position, so
  `W_u^k` cannot move to the query side. The cos/sin of the cached positions are kept (computed once per token), and
  the latents live in buffers that grow by a quarter (never a per-step copy of the whole cache, unlike
  `DynamicCache`'s concatenation).

Modules: `kv_latent` (the cache's data), `kv_attention` (the attention forward); this one enables and disables
the cache on a model and accounts for its memory.

Design:
- `LowRankKVCache` is a `DynamicCache` whose eligible layers are `LatentKVLayer`s holding `(batch, seq, rank)`
  latents. Key latents are stored *before* RoPE; the token positions (one `(batch, seq)` integer tensor for the whole
  cache, not per layer) are kept so that reconstructed keys are rotated at their true absolute positions, left padding
  included. A layer whose `k_proj` is dense (and `v_proj` low-rank) caches its keys rotated, as the normal cache does.
  Layers whose `k_proj` and `v_proj` are both dense, or sliding-window layers, stay ordinary cache layers.
- `enable_low_rank_kv_cache(model)` swaps each supported attention module's class for a subclass whose `forward`
  uses the latents when (and only when) it is handed a `LowRankKVCache`; with any other cache it runs the original
  forward. It also makes `model.generate` create a `LowRankKVCache` when no cache is passed. Parameters, state dict
  and module tree are unchanged; `disable_low_rank_kv_cache(model)` restores the original classes.
- Enabling on a model with no low-rank `k_proj`/`v_proj` raises `LowRankKVError`: a "low-rank cache" that silently
  stores full keys would misreport memory.

A one-token step (decode) runs its own exact softmax attention over the latents (`_latent_decode`); calls with several
new tokens (prefill) rebuild the values once and go through the model's attention implementation (transformers'
attention interface) with ordinary keys and values, so long prompts keep sdpa's memory-efficient kernel.

Supported: LLaMA, Mistral and Qwen2 attention (GQA included), which share one attention structure in transformers 5;
tested with the sdpa and eager attention implementations.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from .errors import ConfigError
from .kv_attention import (  # noqa: F401 - part of this module's API
    LowRankKVAttentionMixin,
    _low_rank_class,
    _original_class,
    _original_class_of,
    cache_argument,
    output_cache,
)
from .kv_latent import (  # noqa: F401 - part of this module's API
    _LENGTH_DEPENDENT_ROPE,
    SUPPORTED_ATTENTIONS,
    LatentKVLayer,
    LowRankKVCache,
    LowRankKVError,
    _is_latent,
    _is_sliding,
    _out_features,
    _rotary,
    _split,
    attention_modules,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- enable/disable
def enable_low_rank_kv_cache(model: nn.Module, keys: Literal["latent", "full"] = "latent") -> nn.Module:
    """Make `model` cache k/v latents during generation (in place; returns `model`); `keys` is the kind of
    `LowRankKVCache` that `model.generate` creates when it is given no cache (see `LowRankKVCache`).

    Raises `LowRankKVError`, leaving the model unchanged, when no full-attention layer has a low-rank `k_proj` or
    `v_proj` (nothing to save) or an attention is not LLaMA-style. Layers with both projections dense, and
    sliding-window layers, keep an ordinary cache layer."""
    if keys not in ("latent", "full"):
        raise ConfigError(f"keys must be 'latent' or 'full', got {keys!r}")
    attns = attention_modules(model)
    for i, attn in enumerate(attns):
        base = _original_class(attn)
        if base.__name__ not in SUPPORTED_ATTENTIONS:
            raise LowRankKVError(
                f"layer {i}: attention {base.__name__} is not supported by the low-rank KV cache "
                f"(supported: {', '.join(SUPPORTED_ATTENTIONS)})"
            )
    low_rank = [i for i, attn in enumerate(attns) if _is_latent(attn)]
    if not low_rank:
        raise LowRankKVError(
            "no attention layer has a low-rank k_proj or v_proj (svdkit.modules.LowRankLinear with rank < out "
            "features): the low-rank KV cache would store full keys and values; compress k_proj/v_proj first"
        )
    latent = [i for i in low_rank if not _is_sliding(attns[i])]
    if not latent:
        raise LowRankKVError(
            f"the layers with low-rank k/v ({low_rank}) all use sliding-window attention, which the low-rank KV "
            "cache does not support (it keeps those layers' ordinary sliding cache)"
        )
    rope_type = (getattr(model.config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        log.warning(
            "RoPE type %r depends on the sequence length: cached keys are re-rotated with the current "
            "frequencies, which differs slightly from a normal cache",
            rope_type,
        )
    _rotary(model)  # fail now, not mid-generation
    cache_argument(model)
    for attn in attns:
        attn.__class__ = _low_rank_class(_original_class(attn))
    if "generate" not in model.__dict__ and hasattr(model, "generate"):
        model.generate = types.MethodType(_generate_low_rank, model)
    model._svdkit_kv_keys = keys
    log.info("low-rank KV cache enabled on %d of %d layers", len(latent), len(attns))
    return model


def disable_low_rank_kv_cache(model: nn.Module) -> nn.Module:
    """Undo `enable_low_rank_kv_cache` (in place; returns `model`); a no-op on a model where it is not enabled."""
    for attn in attention_modules(model):
        attn.__class__ = _original_class(attn)
    if getattr(model.__dict__.get("generate"), "__func__", None) is _generate_low_rank:
        del model.generate
    model.__dict__.pop("_svdkit_kv_keys", None)
    return model


def is_low_rank_kv_cache_enabled(model: nn.Module) -> bool:
    """Whether `enable_low_rank_kv_cache` is in effect on `model`."""
    return any(isinstance(attn, LowRankKVAttentionMixin) for attn in attention_modules(model))


@contextlib.contextmanager
def low_rank_kv_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: enable the low-rank KV cache, and restore the previous state on exit."""
    was_enabled = is_low_rank_kv_cache_enabled(model)
    enable_low_rank_kv_cache(model)
    try:
        yield model
    finally:
        if not was_enabled:
            disable_low_rank_kv_cache(model)


def _generate_low_rank(self: nn.Module, *args, **kwargs):
    """`generate` that supplies a fresh `LowRankKVCache` when the caller passes no cache (bound to the model by
    `enable_low_rank_kv_cache`; a bound method, so `copy.deepcopy(model)` rebinds it to the copy)."""
    config = kwargs.get("generation_config") or self.generation_config
    use_cache = kwargs.get("use_cache", config.use_cache)
    implementation = kwargs.get("cache_implementation", config.cache_implementation)
    has_cache = any(isinstance(v, Cache) for v in kwargs.values())
    if not has_cache and use_cache is not False and implementation is None:
        kwargs[cache_argument(self)] = LowRankKVCache(self, keys=getattr(self, "_svdkit_kv_keys", "latent"))
    return type(self).generate(self, *args, **kwargs)


# --------------------------------------------------------------------------------------------- memory
CACHE_KINDS = ("normal", "low-rank", "low-rank-values")  # low-rank-values: LowRankKVCache(model, keys="full")


def cache_bytes_per_token(
    model: nn.Module, kind: Literal["normal", "low-rank", "low-rank-values"] = "normal",
    dtype: torch.dtype | None = None,
) -> int:
    """Bytes one token (one sequence) adds to the KV cache, summed over layers: `2 * n_kv_heads * head_dim` numbers
    per layer for the normal cache; the k and v latent widths (rank, or full width for a dense projection) for the
    low-rank one; full keys and value latents for `low-rank-values` (`keys="full"`). Excludes the low-rank caches'
    shared position ids and cos/sin (`LowRankKVCache.positions`: one int64 and 2 x head_dim numbers per token, for
    all layers together). `dtype` defaults to the activations' dtype, the embedding's (a quantized k_proj holds
    integer codes, not weights of that dtype)."""
    if kind not in CACHE_KINDS:
        raise ConfigError(f"kind must be one of {', '.join(CACHE_KINDS)}, got {kind!r}")
    total = 0
    full_keys = kind == "low-rank-values"
    elsize = (dtype or model.get_input_embeddings().weight.dtype).itemsize
    for attn in attention_modules(model):
        if kind != "normal" and _is_latent(attn, full_keys) and not _is_sliding(attn):
            k_width = _out_features(attn.k_proj) if full_keys else _split(attn.k_proj)[2]
            total += (k_width + _split(attn.v_proj)[2]) * elsize
        else:
            total += (_out_features(attn.k_proj) + _out_features(attn.v_proj)) * elsize
    return total


def cache_nbytes(cache: DynamicCache) -> int:
    """Bytes of the tokens a cache holds in its per-layer key/value tensors (latents for `LowRankKVCache` layers;
    their buffers' spare room, at most a quarter or 64 tokens, is not counted)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
