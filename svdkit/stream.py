"""Calibration activations on their way through the decoder blocks: `capture` runs the model up to its first
block and keeps that block's inputs (hidden states per batch, and the other arguments: masks, positions), and a
`Stream` carries them from block to block (`Stream.run`), on the compute device or on the host. `replayed` runs
the model's head on final hidden states (the blocks swapped for stand-ins). Every block loop of svdkit
(compression, profiles, quantization, evaluation, the gradient pass) is built from these and `Blocks.on_device`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import Blocks, StreamedModel
from .dist import world
from .errors import ConfigError
from .layout import set_submodule

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are stored."""


@dataclass
class BlockInputs:
    """Positional/keyword arguments a block receives besides its hidden states, one entry per batch."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def model_device(model: nn.Module) -> torch.device:
    return next(p for p in model.parameters() if not p.is_meta).device


def as_blocks(model: nn.Module | StreamedModel | Blocks, device: torch.device | str | None = None) -> Blocks:
    """A `Blocks` view of an in-memory model or a `StreamedModel` (an existing `Blocks` is returned as is)."""
    return model if isinstance(model, Blocks) else Blocks(model, device)


def run_block(block: nn.Module, x: torch.Tensor, extra: BlockInputs, i: int) -> torch.Tensor:
    out = block(x, *extra.args[i], **extra.kwargs[i])
    return out[0] if isinstance(out, (tuple, list)) else out


class Stream:
    """Hidden states of the calibration windows entering the current block, one tensor per batch, kept on
    `store` (the compute device, or the host when they do not fit there); `extra` holds each batch's other
    block arguments (masks, positions) on the compute device."""

    def __init__(self, hidden: list[torch.Tensor], extra: BlockInputs, device: torch.device,
                 store: torch.device, tuple_output: bool | None = None) -> None:
        self.hidden, self.extra, self.device, self.store = hidden, extra, device, store
        self.tuple_output = tuple_output  # whether the blocks return tuples (the replayed head must, too)

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def windows(self) -> int:
        return sum(t.shape[0] for t in self.hidden)

    def batch(self, b: int) -> torch.Tensor:
        return self.hidden[b].to(self.device)

    def output(self, block: nn.Module, b: int) -> torch.Tensor:
        """The block's output for batch `b`, on the compute device."""
        y = block(self.batch(b), *self.extra.args[b], **self.extra.kwargs[b])
        self.tuple_output = isinstance(y, (tuple, list))
        return y[0] if self.tuple_output else y

    def outputs(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's output for every batch (on the compute device, one at a time, stored on `store`)."""
        return [self.output(block, b).to(self.store) for b in range(len(self))]

    def run(self, block: nn.Module) -> Stream:
        """The stream of the block's outputs: the next block's inputs."""
        return self.replaced(self.outputs(block))

    def replaced(self, hidden: list[torch.Tensor]) -> Stream:
        """The same windows with other hidden states (one tensor per batch, as `hidden`)."""
        return Stream(hidden, self.extra, self.device, self.store, self.tuple_output)

    def clone(self) -> Stream:
        return Stream([t.clone() for t in self.hidden], self.extra, self.device, self.store, self.tuple_output)

    def regroup(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Stream:
        """Apply `fn` to all windows at once (`(N, seqlen, width) -> (M, seqlen, width)`) and batch the result as
        before, each batch with the first batch's other arguments cut to its size (e.g. stack-of-batch)."""
        new = fn(torch.cat([t.to(self.device) for t in self.hidden]))
        size = self.hidden[0].shape[0]
        hidden, extra = [], BlockInputs()
        for t in new.split(size):
            cut = first_only(self.extra, t.shape[0])
            hidden.append(t.to(self.store))
            extra.args.append(cut.args[0])
            extra.kwargs.append(cut.kwargs[0])
        return Stream(hidden, extra, self.device, self.store, self.tuple_output)

    def head(self, windows: int) -> Stream:
        """The first `windows` calibration windows only (whole batches, the last one cut)."""
        hidden, extra, left = [], BlockInputs(), windows
        for b, t in enumerate(self.hidden):
            if left <= 0:
                break
            cut = first_only(self.extra, min(left, t.shape[0]), b)
            hidden.append(t[:left])
            extra.args.append(cut.args[0])
            extra.kwargs.append(cut.kwargs[0])
            left -= t.shape[0]
        return Stream(hidden, extra, self.device, self.store, self.tuple_output)


def activation_store(device: torch.device, n_tokens: int, width: int, dtype: torch.dtype, streams: int,
                     where: str = "auto") -> torch.device:
    """Where calibration activations live: `device`, `host`, or `auto` (the host when `streams` copies of
    them would take more than a quarter of the accelerator's free memory)."""
    if where not in ("auto", "device", "host"):
        raise ConfigError(f"activations must be 'auto', 'device' or 'host', got {where!r}")
    if device.type == "cpu" or where == "device":
        return device
    if where == "host":
        return torch.device("cpu")
    need = streams * n_tokens * width * dtype.itemsize
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else need * 4
    store = device if need <= free / 4 else torch.device("cpu")
    if store.type == "cpu":
        log.info("calibration activations (%.1f GB) stay on the host: the device has %.1f GB free",
                 need / 1e9, free / 1e9)
    return store


@torch.no_grad()
def capture(blocks: Blocks, calib: torch.Tensor, batch_size: int, where: str = "auto", streams: int = 1,
            shard: bool = True) -> Stream:
    """Run the model up to its first decoder block and keep that block's inputs, batch by batch. With several
    processes (`shard`), this rank keeps every `world.size`-th window of `calib`, starting at its rank."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    w = world()
    if shard and w.active:
        if calib.shape[0] < w.size:
            raise ConfigError(f"{calib.shape[0]} windows cannot be shared by {w.size} processes: give at least one "
                              "window per process")
        calib = calib[w.shard(calib.shape[0])]
    hidden: list[torch.Tensor] = []
    extra = BlockInputs()
    device = blocks.device
    store = activation_store(device, calib.numel(), int(blocks.model.config.get_text_config().hidden_size),
                             blocks.compute_dtype, streams, where)

    def hook(_module, args, kwargs):
        if args:
            hidden.append(args[0].to(store))
            extra.args.append(_to(args[1:], device))
        else:
            hidden.append(kwargs["hidden_states"].to(store))
            extra.args.append(())
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        extra.kwargs.append(_to(kwargs, device))
        raise _StopForward

    handle = blocks.list[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with blocks.head_on_device() as model:
            for i in range(0, calib.shape[0], batch_size):
                try:
                    model(calib[i : i + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return Stream(hidden, extra, device, store)


def capture_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int, device: torch.device
                   ) -> tuple[list[torch.Tensor], BlockInputs]:
    """The first block's inputs as `(hidden per batch, other arguments)` (in-memory model)."""
    s = capture(Blocks(model, device), calib, batch_size, where="device")
    return s.hidden, s.extra


class _Replay(nn.Module):
    """Stands in for a decoder block when only the model's head is wanted: returns `value` (when set) in place
    of its input, and answers attribute look-ups (e.g. `attention_type`) from the block it replaces."""

    def __init__(self, original: nn.Module, as_tuple: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_original", original)  # not registered: its parameters stay out of the model
        self.as_tuple = as_tuple
        self.value: torch.Tensor | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states if self.value is None else self.value
        return (out,) if self.as_tuple else out


@contextlib.contextmanager
def replayed(blocks: Blocks, as_tuple: bool | None) -> Iterator[_Replay]:
    """The model with its decoder blocks swapped for stand-ins; set `first.value` to the final hidden states and
    the model's own forward computes what follows the blocks (final norm, projections, lm_head, loss)."""
    original = blocks.list
    stubs = nn.ModuleList([_Replay(b, bool(as_tuple)) for b in original])
    set_submodule(blocks.model, blocks.layout.prefix, stubs)
    try:
        yield stubs[0]
    finally:
        set_submodule(blocks.model, blocks.layout.prefix, original)


def first_only(extra: BlockInputs, size: int = 1, b: int = 0) -> BlockInputs:
    """Block arguments of batch `b` cut to `size` samples (batch dimension sliced where it exists)."""

    def cut(obj):
        if isinstance(obj, torch.Tensor) and obj.dim() >= 2 and obj.shape[0] > size:
            return obj[:size]
        if isinstance(obj, tuple):
            return tuple(cut(o) for o in obj)
        return obj

    return BlockInputs([cut(extra.args[b])], [{k: cut(v) for k, v in extra.kwargs[b].items()}])
