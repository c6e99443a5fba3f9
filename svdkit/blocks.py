"""Where a model's decoder blocks live and how one gets onto the compute device.

`Blocks` hands out one block at a time through `on_device(i)`: moved to the compute device in the compute
dtype, and back afterwards. For a model in memory that is a move; for a `StreamedModel` (a meta-device
skeleton whose blocks stay in the checkpoint's safetensors shards) the block's tensors are read from disk
on entry and dropped back to the meta device on exit, so resident memory never holds more than one block.

Dtypes: the *storage* dtype is the checkpoint's (kept on disk and in the output); the *compute* dtype
suits the device: float32 on CPU (bf16 matmuls are slow there), the storage dtype on a GPU. Only
parameters change dtype: buffers keep theirs (RoPE's `inv_freq` stays float32, as transformers keeps it).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .layout import Layout, ModelError
from .shards import ShardError, TensorIndex

log = logging.getLogger(__name__)


def compute_dtype_for(device: torch.device, storage: torch.dtype) -> torch.dtype:
    """float32 on CPU, where half-precision matmuls are slow; on an accelerator the storage dtype."""
    return torch.float32 if device.type == "cpu" else storage


def move_module(module: nn.Module, device: torch.device, dtype: torch.dtype | None, recurse: bool = True,
                memo: dict | None = None) -> None:
    """Parameters to `device` (floating ones to `dtype`), buffers to `device` in their own dtype.

    A parameter shared by several modules (tied embeddings: `embed_tokens` and `lm_head`) stays one parameter:
    each is moved once and the copy handed to every module that holds it. Pass the same `memo` to calls on
    several modules that may share parameters (`recurse=False` walks)."""
    memo = {} if memo is None else memo  # id(old parameter) -> (old, new): the old one is kept alive meanwhile
    mods = module.modules() if recurse else [module]
    for m in mods:
        for k, p in m._parameters.items():
            if p is None:
                continue
            if id(p) not in memo:
                want = dtype if (dtype is not None and p.is_floating_point()) else p.dtype
                new = p
                if p.device != device or p.dtype != want:
                    new = nn.Parameter(p.detach().to(device, want), requires_grad=p.requires_grad)
                memo[id(p)] = (p, new)
            m._parameters[k] = memo[id(p)][1]
        for k, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[k] = b.to(device)


def _libc_trim():
    """glibc's `malloc_trim`, or None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim() if sys.platform.startswith("linux") else None


def trim_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc). Each block's float64 temporaries are freed, but without
    this glibc kept the fragmented heap: peak RSS grew ~10 MB per block on benchmarks/scale.py's models."""
    if _TRIM is not None:
        _TRIM(0)


def release(module: nn.Module) -> None:
    """Drop every parameter to the meta device (shapes, dtypes and ties kept); buffers stay where they are."""
    memo: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None and not p.is_meta:
                if id(p) not in memo:
                    memo[id(p)] = (p, nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad))
                m._parameters[k] = memo[id(p)][1]


def _nonblock_modules(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    inside = {id(m) for m in blocks.modules()}
    return [m for m in model.modules() if id(m) not in inside]


@dataclass
class StreamedModel:
    """A model whose decoder blocks stay on disk: `model` is the skeleton (non-block weights loaded, blocks
    on the meta device), `index` the checkpoint's tensors, `names` maps the model's state-dict keys to the
    checkpoint's, and `storage_dtype` is what blocks are stored in."""

    model: nn.Module
    index: TensorIndex
    names: dict[str, str]
    storage_dtype: torch.dtype
    path: Path
    tokenizer: object = None
    layout: Layout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = Layout.of(self.model)

    @property
    def config(self):
        return self.model.config

    def read_block(self, i: int, module: nn.Module) -> None:
        """Load block `i`'s tensors from the shards into `module` (strict: every key present, no extra ones)."""
        prefix = self.layout.block_prefix(i)
        expected = list(module.state_dict())
        wanted = {self.names.get(prefix + k, prefix + k): k for k in expected}
        present = set(self.index.with_prefix(prefix)) | {n for n in wanted if n in self.index.files}
        missing = sorted(n for n in wanted if n not in self.index.files)
        unexpected = sorted(present - set(wanted))
        if missing or unexpected:
            raise ShardError(f"{self.path}: block {i} does not match the architecture: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        tensors = self.index.read(wanted)
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        state = {}
        for ckpt_key, local in wanted.items():
            t = tensors[ckpt_key]
            want = params.get(local, buffers.get(local))
            if want is not None and tuple(t.shape) != tuple(want.shape):
                raise ShardError(f"{self.path}: {ckpt_key} has shape {tuple(t.shape)}, the architecture "
                                 f"{tuple(want.shape)}")
            # parameters are stored in the storage dtype; buffers (e.g. quantization scales) keep their own
            state[local] = t.to(self.storage_dtype) if local in params and t.is_floating_point() else t
        module.load_state_dict(state, strict=True, assign=True)


class Blocks:
    """The decoder blocks of an in-memory model or a `StreamedModel`, one at a time on the compute device."""

    def __init__(self, model: nn.Module | StreamedModel, device: torch.device | str | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        self.streamed = model if isinstance(model, StreamedModel) else None
        self.model = model.model if self.streamed else model
        self.layout = self.streamed.layout if self.streamed else Layout.of(self.model)
        self.list = self.layout.blocks(self.model)
        home = next((p for p in self.model.parameters() if not p.is_meta), None)
        if home is None:
            raise ModelError("the model has no materialized parameters")
        self.home = home.device
        self.storage_dtype = self.streamed.storage_dtype if self.streamed else home.dtype
        self.device = torch.device(device) if device is not None else self.home
        self.compute_dtype = compute_dtype or compute_dtype_for(self.device, self.storage_dtype)

    def __len__(self) -> int:
        return len(self.list)

    @contextlib.contextmanager
    def on_device(self, i: int) -> Iterator[nn.Module]:
        """Block `i` on the compute device in the compute dtype; back home (or dropped to meta) afterwards."""
        block = self.list[i]
        if self.streamed:
            self.streamed.read_block(i, block)
        try:
            move_module(block, self.device, self.compute_dtype)
            yield block
        finally:
            if self.streamed:
                release(block)
                trim_host_memory()
            else:
                move_module(block, self.home, self.storage_dtype)

    @contextlib.contextmanager
    def head_on_device(self) -> Iterator[nn.Module]:
        """Everything outside the blocks (embeddings, final norm, lm_head, rotary) on the compute device."""
        mods = _nonblock_modules(self.model, self.list)
        there: dict = {}  # one memo per direction: tied parameters (embeddings and head) move once, stay tied
        try:
            for m in mods:
                move_module(m, self.device, self.compute_dtype, recurse=False, memo=there)
            yield self.model
        finally:
            back: dict = {}
            for m in mods:
                move_module(m, self.home, self.storage_dtype, recurse=False, memo=back)
