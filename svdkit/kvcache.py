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
import functools
import inspect
import logging
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import ConfigError, SvdkitError
from .layout import find_blocks
from .modules import LowRankLinear

log = logging.getLogger(__name__)

# Attention classes with the LLaMA structure (q/k/v/o projections, RoPE on q and k, no q/k norm, GQA by
# `num_key_value_groups`); checked against transformers 5.x modeling files.
SUPPORTED_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
# RoPE variants whose frequencies change with the sequence length: reconstructed keys use the current frequencies,
# while a normal cache keeps keys rotated with the frequencies of the step that produced them.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


class LowRankKVError(SvdkitError, ValueError):
    """Raised when a model cannot use the low-rank KV cache (dense k/v projections, unsupported attention)."""


# --------------------------------------------------------------------------------------------- projections
def _split(proj: nn.Module) -> tuple[nn.Module, nn.Module | None, int]:
    """`(encode, decode, width)` of a k/v projection: the cached part, its re-expansion (None = identity), the
    numbers cached per token. A `LowRankLinear` caches `W_v x` when that is smaller than its output."""
    if isinstance(proj, LowRankLinear) and proj.rank < proj.out_features:
        return proj.v, proj.u, proj.rank
    return proj, None, _out_features(proj)


def _out_features(proj: nn.Module) -> int:
    out = getattr(proj, "out_features", None)
    if not isinstance(out, int):
        raise LowRankKVError(f"cannot tell the output width of {type(proj).__name__}")
    return out


def _is_latent(attn: nn.Module, full_keys: bool = False) -> bool:
    """True when caching latents saves memory for this attention: k_proj (unless keys are cached in full) or v_proj
    is a (narrow) LowRankLinear."""
    return (not full_keys and _split(attn.k_proj)[1] is not None) or _split(attn.v_proj)[1] is not None


def _is_sliding(attn: nn.Module) -> bool:
    if getattr(attn, "sliding_window", None) is not None:  # Qwen2
        return True
    layer_types = getattr(attn.config, "layer_types", None)
    if layer_types is not None:
        return layer_types[attn.layer_idx] != "full_attention"
    return getattr(attn.config, "sliding_window", None) is not None  # Mistral


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder block, in layer order."""
    _, blocks = find_blocks(model)
    found = []
    for i, block in enumerate(blocks):
        attn = [m for _, m in block.named_children() if hasattr(m, "k_proj") and hasattr(m, "v_proj")]
        if len(attn) != 1:
            raise LowRankKVError(f"decoder block {i} ({type(block).__name__}) has no single attention with k/v_proj")
        found.append(attn[0])
    return found


def _rotary(model: nn.Module) -> nn.Module:
    """The model's (single, shared) rotary embedding module."""
    found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(found) != 1:
        raise LowRankKVError(f"expected one rotary embedding module in {type(model).__name__}, found {len(found)}")
    return found[0]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's half rotation, as in transformers' LLaMA (`[-x2, x1]`)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (batch, heads, seq, head_dim) by `cos`/`sin` (batch, seq, head_dim), the LLaMA formula."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


# --------------------------------------------------------------------------------------------- cache
def _append(buf: torch.Tensor | None, length: int, new: torch.Tensor) -> torch.Tensor:
    """Write `new` (batch, n, ...) after the first `length` entries of `buf` along dim 1 and return the buffer, grown
    by a quarter (at least 64 entries) when full: appending never copies the whole cache at every step."""
    need = length + new.shape[1]
    if buf is None or buf.shape[1] < need or buf.shape[0] != new.shape[0] or buf.dtype != new.dtype:
        grown = new.new_empty((new.shape[0], max(need, length + max(length // 4, 64)), *new.shape[2:]))
        if length:
            grown[:, :length] = buf[:, :length]
        buf = grown
    buf[:, length:need] = new
    return buf


class LatentKVLayer(DynamicLayer):
    """A cache layer holding `(batch, seq, width)` latents: `W_v^k x` (before RoPE) as keys, `W_v^v x` as values.

    The latents live in buffers with spare room (see `_append`); `keys`/`values` are views of the filled part, and
    assigning them (as `DynamicLayer`'s crop, beam reorder and batch selection do, on dims 0 and -2) replaces the
    buffers."""

    def __init__(self) -> None:
        self._k_buf: torch.Tensor | None = None
        self._v_buf: torch.Tensor | None = None
        self._len = 0
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k_buf is None else self._k_buf[:, : self._len]

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._k_buf, self._len = t, 0 if t is None else t.shape[1]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v_buf is None else self._v_buf[:, : self._len]

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._v_buf, self._len = t, 0 if t is None else t.shape[1]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((key_states.shape[0], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((value_states.shape[0], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.dim() != 3 or value_states.dim() != 3:
            raise LowRankKVError(
                "a LowRankKVCache layer received full key/value states: the model's attention does not store "
                "latents; call svdkit.kvcache.enable_low_rank_kv_cache(model) first"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self._len
        self._k_buf = _append(self._k_buf, length, key_states)
        self._v_buf = _append(self._v_buf, length, value_states)
        self._len = length + key_states.shape[1]
        return self.keys, self.values


class LowRankKVCache(DynamicCache):
    """A `DynamicCache` storing rank-k latents for the model's low-rank attention layers (see module docstring).

    Build it from the model it serves (`LowRankKVCache(model)`); pass it to `model(...)` or `model.generate(...)` (as
    the cache argument, `cache_argument(model)`) once `enable_low_rank_kv_cache(model)` has been called.

    `keys="latent"` (default) caches key latents and rebuilds the keys at every step: the smallest cache, but the
    rebuild costs `seq x rank x n_kv_heads x head_dim` multiply-adds per layer and step, more than reading the keys
    on a CPU. `keys="full"` caches the rotated keys themselves and only the value latents (still folded): a cache
    `(n_kv_heads * head_dim + rank_v) / (2 * n_kv_heads * head_dim)` of the normal one that reads less than the
    normal cache at every step."""

    def __init__(self, model: nn.Module, keys: Literal["latent", "full"] = "latent") -> None:
        if keys not in ("latent", "full"):
            raise ConfigError(f"keys must be 'latent' or 'full', got {keys!r}")
        super().__init__(config=model.config)
        attns = attention_modules(model)
        if len(self.layers) != len(attns):
            raise LowRankKVError(f"cache has {len(self.layers)} layers for {len(attns)} attention modules")
        self.full_keys = keys == "full"
        self.latent_layers: list[int] = []
        for i, attn in enumerate(attns):
            if type(self.layers[i]) is DynamicLayer and _is_latent(attn, self.full_keys) and not _is_sliding(attn):
                self.layers[i] = LatentKVLayer()
                self.latent_layers.append(i)
        self._rotary = _rotary(model) if self.latent_layers else None
        self._pos_buf: torch.Tensor | None = None  # (batch, capacity) absolute positions of the cached tokens
        self._n = 0
        # cos/sin (batch, capacity, head_dim) of the first `_rope_n` positions, shared by the layers
        self._cos_buf: torch.Tensor | None = None
        self._sin_buf: torch.Tensor | None = None
        self._rope_n = 0
        self._rope_t: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def positions(self) -> torch.Tensor | None:
        """`(batch, seq)` absolute positions of the cached tokens (None before the first step)."""
        return None if self._pos_buf is None else self._pos_buf[:, : self._n]

    def is_latent(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` stores latents (else it is an ordinary cache layer)."""
        return isinstance(self.layers[layer_idx], LatentKVLayer)

    def update_latents(
        self, key_latent: torch.Tensor, value_latent: torch.Tensor, position_ids: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's `(batch, q, width)` latents (and, once per step, their positions); return all latents."""
        if layer_idx == self.latent_layers[0]:
            self._pos_buf = _append(self._pos_buf, self._n, position_ids)
            self._n += position_ids.shape[1]
        keys, values = self.layers[layer_idx].update(key_latent, value_latent)
        if self.positions is None or self.positions.shape != keys.shape[:2]:
            raise LowRankKVError(
                f"layer {layer_idx} holds {tuple(keys.shape[:2])} tokens but the cache tracks positions of shape "
                f"{None if self.positions is None else tuple(self.positions.shape)}"
            )
        return keys, values

    def rope(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `(batch, seq, head_dim)` for every cached position; each position's are computed once."""
        if self._rope_n < self._n:
            cos, sin = self._rotary(like, self._pos_buf[:, self._rope_n : self._n])
            self._cos_buf = _append(self._cos_buf, self._rope_n, cos)
            self._sin_buf = _append(self._sin_buf, self._rope_n, sin)
            self._rope_n = self._n
        return self._cos_buf[:, : self._n], self._sin_buf[:, : self._n]

    def rope_transposed(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin as contiguous `(batch, 1, head_dim, seq)` blocks (the decode path's key layout), once per step."""
        if self._rope_t is None or self._rope_t[0] != self._n:
            cos, sin = self.rope(like)
            self._rope_t = (self._n, cos.transpose(1, 2).unsqueeze(1).contiguous(),
                            sin.transpose(1, 2).unsqueeze(1).contiguous())
        return self._rope_t[1], self._rope_t[2]

    # Cache-wide operations also apply to the shared positions (cos/sin are recomputed from them).
    def _positions_changed(self, positions: torch.Tensor | None) -> None:
        self._pos_buf, self._n = positions, 0 if positions is None else positions.shape[1]
        self._cos_buf = self._sin_buf = self._rope_t = None
        self._rope_n = 0

    def reset(self) -> None:
        super().reset()
        self._positions_changed(None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self._positions_changed(self.positions.index_select(0, beam_idx.to(self.positions.device)))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.positions is not None and tokens_to_remove != 0:
            self._positions_changed(self.positions[:, : -abs(tokens_to_remove)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self._positions_changed(self.positions.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self._positions_changed(self.positions[indices, ...])


# --------------------------------------------------------------------------------------------- attention
class LowRankKVAttentionMixin:
    """Mixed in front of a LLaMA-style attention class: with a `LowRankKVCache`, cache latents, not keys/values.

    The cache is recognised by its type, not by the keyword it arrives under (transformers 5.24 renamed
    `past_key_values` to `cache`), and the other arguments are bound to the original `forward`'s signature."""

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not any(isinstance(v, LowRankKVCache) for v in (*args, *kwargs.values())):
            return super().forward(*args, **kwargs)
        call = _bind_attention_call(type(self), args, kwargs)
        if not call.cache.is_latent(self.layer_idx):
            return super().forward(*args, **kwargs)
        return self._latent_forward(call)

    def _latent_forward(self, call: _AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache, hidden_states, kwargs = call.cache, call.hidden_states, call.kwargs
        bsz, q_len = hidden_states.shape[:-1]
        cos, sin = call.position_embeddings
        query = _apply_rope(self.q_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2), cos, sin)

        enc_k, dec_k, _ = (self.k_proj, None, 0) if cache.full_keys else _split(self.k_proj)
        enc_v, dec_v, _ = _split(self.v_proj)
        new_keys = enc_k(hidden_states)
        if dec_k is None:  # dense keys: cache them rotated, as the normal cache does
            new_keys = _apply_rope(new_keys.view(bsz, q_len, -1, self.head_dim).transpose(1, 2), cos, sin)
            new_keys = new_keys.transpose(1, 2).reshape(bsz, q_len, -1)
        keys, values = cache.update_latents(
            new_keys,
            enc_v(hidden_states),
            _positions(kwargs, cache, self.layer_idx, bsz, q_len, query),
            self.layer_idx,
        )
        seq = keys.shape[1]
        mask = call.attention_mask
        if q_len == 1 and not self.training and not kwargs.get("output_attentions") and _decode_mask(mask, seq):
            out = self._latent_decode(query, keys, values, dec_k, dec_v, cache, hidden_states, mask)
            return self.o_proj(out), None
        if dec_k is not None:  # rebuild the keys, rotate them at their stored positions
            keys = dec_k(keys).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
            keys = _apply_rope(keys, *cache.rope(hidden_states))
        else:
            keys = keys.view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        # Several new tokens (prefill, a continued prompt): rebuild the values once, as v_proj itself would, and use
        # the model's attention implementation on ordinary keys and values (folding pays per decode step only).
        values = dec_v(values) if dec_v is not None else values
        values = values.view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, _eager_attention(type(self))
        )
        out, weights = attention_interface(
            self,
            query,
            keys,
            values,
            mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(bsz, q_len, -1).contiguous()
        return self.o_proj(out), weights

    def _latent_decode(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, dec_k: nn.Module | None,
        dec_v: nn.Module | None, cache: LowRankKVCache, like: torch.Tensor, mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One new token attending to the cached latents, `(batch, 1, heads * head_dim)`. Keys are rebuilt transposed,
        `(batch, kv_heads, head_dim, seq)`, so RoPE and `q K^T` run on contiguous blocks with no per-head copies; all
        heads of a sequence attend to its one value-latent matrix in a single product."""
        bsz, heads, _, head_dim = query.shape
        seq = keys.shape[1]
        if dec_k is not None:
            # W_u (kv_heads * head_dim, rank) x Z^T (rank, seq) per sequence, written contiguous, viewed per kv head
            w_k = dec_k.weight
            keys_t = torch.bmm(w_k.expand(bsz, *w_k.shape), keys.transpose(1, 2)).unflatten(1, (-1, head_dim))
            if dec_k.bias is not None:
                keys_t = keys_t + dec_k.bias.view(1, -1, head_dim, 1)
            cos_t, sin_t = cache.rope_transposed(like)
            half = head_dim // 2
            rotated = torch.cat((-keys_t[:, :, half:], keys_t[:, :, :half]), dim=2)  # rotate_half along head_dim
            keys_t = torch.addcmul(keys_t * cos_t, rotated, sin_t)
        else:  # cached already rotated
            keys_t = keys.view(bsz, seq, -1, head_dim).permute(0, 2, 3, 1)
        n_kv = keys_t.shape[1]
        scores = torch.matmul(query.view(bsz, n_kv, heads // n_kv, head_dim), keys_t) * self.scaling
        if mask is not None:  # (batch or 1, 1, 1, seq): boolean (sdpa) or additive (eager)
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if dec_v is None:
            out = torch.matmul(probs, values.view(bsz, seq, n_kv, head_dim).transpose(1, 2))
            return out.reshape(bsz, 1, heads * head_dim)
        out = torch.matmul(probs.view(bsz, heads, seq), values)  # (batch, heads, rank)
        return _fold_value_up_projection(out.unsqueeze(1), dec_v, n_kv, head_dim)


def _decode_mask(mask: torch.Tensor | None, seq: int) -> bool:
    """Whether a one-token step's mask is one the decode path applies as is: none, or `(batch or 1, 1, 1, seq)`."""
    return mask is None or (mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1 and mask.shape[3] == seq)


def _fold_value_up_projection(out: torch.Tensor, dec_v: nn.Module, n_kv: int, head_dim: int) -> torch.Tensor:
    """`(softmax Z) W_u^T` per head: attention outputs over value latents `(batch, q, heads, rank)` times the rows of
    `W_u` (`n_kv * head_dim x rank`) that belong to each head's kv head, plus that kv head's bias."""
    bsz, q_len, heads, rank = out.shape
    w_u_t = dec_v.weight.unflatten(0, (n_kv, head_dim)).transpose(1, 2)  # (n_kv, rank, head_dim)
    y = torch.matmul(out.view(bsz, q_len, n_kv, heads // n_kv, rank), w_u_t)
    if dec_v.bias is not None:  # softmax rows sum to one, so the bias passes through unchanged
        y = y + dec_v.bias.view(n_kv, 1, head_dim)
    return y.reshape(bsz, q_len, heads * head_dim)


@dataclass
class _AttentionCall:
    """One attention call's arguments, by role: what the latent path needs, and the rest for the attention function."""

    cache: LowRankKVCache
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: torch.Tensor | None
    kwargs: dict


def _bind_attention_call(cls: type, args: tuple, kwargs: dict) -> _AttentionCall:
    """Bind a call to the original attention `forward`'s signature and pick out the cache by its type."""
    base = _original_class_of(cls)
    sig, varkw, cache_params = _forward_signature(base)
    bound = sig.bind(None, *args, **kwargs).arguments  # None stands for self
    named = {k: v for i, (k, v) in enumerate(bound.items()) if i > 0 and k != varkw}
    rest = {**named, **(bound.get(varkw, {}) if varkw else {})}
    caches = {k for k, v in rest.items() if isinstance(v, Cache)}
    missing = [k for k in ("hidden_states", "position_embeddings") if rest.get(k) is None]
    if missing:
        raise LowRankKVError(f"{base.__name__}.forward was called without {', '.join(missing)}: this transformers "
                             "version's attention is not supported by the low-rank KV cache")
    cache = next(rest[k] for k in caches if isinstance(rest[k], LowRankKVCache))
    passthrough = {k: v for k, v in rest.items()
                   if k not in caches and k not in cache_params
                   and k not in ("hidden_states", "position_embeddings", "attention_mask")}
    return _AttentionCall(cache, rest["hidden_states"], rest["position_embeddings"], rest.get("attention_mask"),
                          passthrough)


@functools.cache
def _forward_signature(base: type) -> tuple[inspect.Signature, str | None, frozenset[str]]:
    """An attention class's `forward` signature, its `**kwargs` name and its cache parameters (read once per class:
    inspecting a signature at every layer of every decode step costs more than the step's attention)."""
    sig = inspect.signature(base.forward)
    varkw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    return sig, varkw, frozenset(_cache_parameters(base.forward))


def _cache_parameters(fn) -> set[str]:
    """Parameters of `fn` annotated as a `Cache` (how a transformers version names its KV-cache argument)."""
    return {p.name for p in inspect.signature(fn).parameters.values() if "Cache" in str(p.annotation)}


def cache_argument(model: nn.Module) -> str:
    """The keyword under which `model.forward` and `model.generate` take the KV cache in the installed transformers
    (`past_key_values` before 5.24, `cache` since), read from the forward's type annotations."""
    names = _cache_parameters(type(model).forward)
    if len(names) != 1:
        raise LowRankKVError(f"cannot tell which argument of {type(model).__name__}.forward takes the KV cache "
                             f"(parameters annotated as Cache: {sorted(names)})")
    return names.pop()


def output_cache(outputs) -> Cache | None:
    """The cache a model or `generate` output returns, whatever this transformers version calls the field."""
    found = [v for v in outputs.values() if isinstance(v, Cache)]
    if len(found) > 1:
        raise LowRankKVError(f"output holds {len(found)} caches; expected at most one")
    return found[0] if found else None


def _positions(
    kwargs: dict, cache: LowRankKVCache, layer_idx: int, bsz: int, q_len: int, like: torch.Tensor
) -> torch.Tensor:
    """This step's absolute positions as `(batch, q_len)`: the model's `position_ids`, else continuing the cache."""
    pos = kwargs.get("position_ids")
    if pos is None:
        start = cache.get_seq_length(layer_idx)
        pos = torch.arange(start, start + q_len, device=like.device).unsqueeze(0)
    if pos.dim() != 2:
        raise LowRankKVError(f"position_ids of shape {tuple(pos.shape)} are not supported (expected (batch, seq))")
    return pos.expand(bsz, q_len)


@functools.cache
def _eager_attention(cls: type) -> object:
    """The eager attention function of the modeling file that defines `cls`."""
    import sys

    for klass in cls.__mro__:
        fn = getattr(sys.modules.get(klass.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise LowRankKVError(f"no eager_attention_forward found for {cls.__name__}")


@functools.cache
def _low_rank_class(cls: type) -> type:
    """The `LowRankKVAttentionMixin` subclass of an attention class (one per class, so isinstance checks hold)."""
    return type(
        f"LowRankKV{cls.__name__}", (LowRankKVAttentionMixin, cls), {"__module__": __name__, "_svdkit_base": cls}
    )


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


def _original_class_of(cls: type) -> type:
    """The attention class before `enable_low_rank_kv_cache` swapped it in."""
    return getattr(cls, "_svdkit_base", cls)


def _original_class(attn: nn.Module) -> type:
    return _original_class_of(type(attn))


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
