"""The latent KV cache's data: which attention projections are low-rank (`_split`), RoPE helpers, and the cache
itself, `LowRankKVCache`, a `DynamicCache` whose eligible layers (`LatentKVLayer`) hold the rank-k latents of
`k_proj`/`v_proj` instead of keys and values (see `svdkit.kvcache` for the design).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

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
