"""The attention side of the low-rank KV cache: a mixin whose `forward` reads and writes latents when handed a
`LowRankKVCache` (decode steps attend over the latents with `W_u` of v_proj folded into the output; prefills
rebuild keys and values once and use the model's attention implementation) and otherwise runs the original
forward, and the helpers that bind a call's arguments and build the low-rank subclass of an attention class.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .kv_latent import (
    LowRankKVCache,
    LowRankKVError,
    _apply_rope,
    _split,
)

log = logging.getLogger(__name__)


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


def _original_class_of(cls: type) -> type:
    """The attention class before `enable_low_rank_kv_cache` swapped it in."""
    return getattr(cls, "_svdkit_base", cls)


def _original_class(attn: nn.Module) -> type:
    return _original_class_of(type(attn))
