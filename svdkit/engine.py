"""The layer-by-layer walk: capture the first block's inputs, then take the blocks one at a time onto the
compute device (`Blocks.on_device`), gather statistics with hooks, let a method factorize each linear,
swap in `LowRankLinear`, and pass the outputs on.

Only the current block, the calibration activations (`Stream`) and that block's statistics are resident.
Two activation streams exist: `original` (outputs of the uncompressed model) and `compressed` (outputs of
the blocks already compressed); a method's `stream` and `needs` decide which are kept. Every block
loop of svdkit (compression, profiles, quantization, evaluation) is built from `capture`, `Stream.run` and
`Blocks.on_device`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .blocks import Blocks, StreamedModel
from .dist import progress_bar, together, world
from .errors import ConfigError
from .layout import ModelError, block_linears, set_submodule
from .linalg import accumulate_gram, check_finite, no_tf32

if TYPE_CHECKING:
    from .refine import BlockRefiner

log = logging.getLogger(__name__)

STREAMS = ("original", "compressed")  # the two activation streams, by the model whose outputs they are


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
        out = self.outputs(block)
        return Stream(out, self.extra, self.device, self.store, self.tuple_output)

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


# --------------------------------------------------------------------------------------------- statistics
def shared_inputs(modules: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, str]:
    """Map each of `modules` that `run()` calls to a representative module that received the same input tensor
    (the first of them in `modules`' order); modules never called are left out."""
    seen: dict[str, torch.Tensor] = {}  # holding the tensors keeps their ids unique (no address reuse)

    def record(name: str):
        def hook(_module, args) -> None:  # a pre-hook must return None, or it replaces the inputs
            seen.setdefault(name, args[0])

        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in modules.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    rep: dict[int, str] = {}
    return {name: rep.setdefault(id(seen[name]), name) for name in modules if name in seen}


@torch.no_grad()
def input_groups(block: nn.Module, x: torch.Tensor, extra: BlockInputs) -> dict[str, str]:
    """Map each linear of the block to a representative linear that receives the same input tensor.

    Found by running the block once and comparing input tensors (q/k/v share one, gate/up share one),
    so one Gram matrix (and one whitening) serves each unique input whatever the architecture.
    """
    linears = block_linears(block)
    groups = shared_inputs(linears, lambda: run_block(block, x[:1], first_only(extra), 0))
    missing = [n for n in linears if n not in groups]
    if missing:
        raise ModelError(f"linears {missing} were not called by the block's forward; cannot compress them")
    return groups


def first_only(extra: BlockInputs, size: int = 1, b: int = 0) -> BlockInputs:
    """Block arguments of batch `b` cut to `size` samples (batch dimension sliced where it exists)."""

    def cut(obj):
        if isinstance(obj, torch.Tensor) and obj.dim() >= 2 and obj.shape[0] > size:
            return obj[:size]
        if isinstance(obj, tuple):
            return tuple(cut(o) for o in obj)
        return obj

    return BlockInputs([cut(extra.args[b])], [{k: cut(v) for k, v in extra.kwargs[b].items()}])


@dataclass
class GroupAccumulator:
    """Running statistics of one unique input: Gram matrices in float64, sum of |x|, token count."""

    gram: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0
    gram_c: torch.Tensor | None = None
    cross: torch.Tensor | None = None


def _new_accumulator(n: int, device: torch.device, needs: frozenset[str]) -> GroupAccumulator:
    def zeros() -> torch.Tensor:
        return torch.zeros(n, n, dtype=torch.float64, device=device)

    return GroupAccumulator(
        zeros(),
        torch.zeros(n, dtype=torch.float64, device=device),
        gram_c=zeros() if "gram_c" in needs else None,
        cross=zeros() if "cross" in needs else None,
    )


@torch.no_grad()
def block_statistics(
    block: nn.Module,
    groups: dict[str, str],
    original: Stream | None,
    compressed: Stream | None,
    stream: str,
    needs: frozenset[str],
) -> tuple[dict[str, GroupAccumulator], Stream | None]:
    """One pass of the (still dense) block over the stream(s); returns statistics per representative
    linear (`gram` from `stream`, `original` or `compressed`; `gram_c` and `cross` when needed) and the
    block's outputs on the original stream (the next block's original inputs)."""
    linears = block_linears(block)
    reps = sorted(set(groups.values()), key=list(linears).index)
    captured: dict[str, torch.Tensor] = {}
    handles = [
        linears[r].register_forward_pre_hook(lambda _m, a, r=r: captured.__setitem__(r, a[0].detach())) for r in reps
    ]
    acc: dict[str, GroupAccumulator] = {}
    out: list[torch.Tensor] | None = [] if original is not None else None
    ref = original if original is not None else compressed
    try:
        with together("gathering calibration statistics"), no_tf32():
            for b in range(len(ref)):
                x_in = xc_in = None
                if original is not None:
                    captured.clear()
                    out.append(original.output(block, b).to(original.store))
                    x_in = dict(captured)
                if compressed is not None:
                    captured.clear()
                    compressed.output(block, b)
                    xc_in = dict(captured)
                for r in reps:
                    primary = (x_in if stream == "original" else xc_in)[r]
                    n = primary.shape[-1]
                    if r not in acc:
                        acc[r] = _new_accumulator(n, primary.device, needs)
                    a = acc[r]
                    accumulate_gram(a.gram, primary)
                    a.abs_sum += primary.reshape(-1, n).float().abs().sum(0).double()
                    a.tokens += primary.reshape(-1, n).shape[0]
                    if a.gram_c is not None:
                        accumulate_gram(a.gram_c, xc_in[r])
                    if a.cross is not None:
                        accumulate_gram(a.cross, xc_in[r], x_in[r])  # sum_t xc_t x_t^T = X' X^T
    finally:
        for h in handles:
            h.remove()
    w = world()
    for r in reps:  # sums over windows: add up every rank's share (same order of groups on every rank)
        a = acc[r]
        for t in (a.gram, a.abs_sum, a.gram_c, a.cross):
            if t is not None:
                w.all_reduce(t)
        a.tokens = int(w.sum([a.tokens])[0])
        check_finite(a.gram, f"Gram matrix of {r}")
    new = None
    if original is not None:
        new = Stream(out, original.extra, original.device, original.store, original.tuple_output)
    return acc, new


class StatsCache:
    """One-shot statistics of the original stream (Gram matrices, |x| sums, input groups), shared by the
    methods and ratios of a sweep. With a `path` (a folder) each block is written to its own safetensors
    file as soon as it is computed and read back one block at a time; without one it stays in memory.
    Further per-block statistics of the same calibration data (K-FAC's output-gradient Grams) are kept by name
    beside them, one file per block in a subfolder (`put_set`, `get_set`)."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.blocks: dict[int, tuple[dict[str, str], dict[str, GroupAccumulator]]] = {}
        self.sets: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # per-block statistics by name (no folder)

    def _file(self, i: int) -> Path:
        return self.path / f"block-{i:05d}.safetensors"

    def has(self, i: int) -> bool:
        return self._file(i).exists() if self.path is not None else i in self.blocks

    def complete(self, n_blocks: int) -> bool:
        return all(self.has(i) for i in range(n_blocks))

    def put(self, i: int, groups: dict[str, str], stats: dict[str, GroupAccumulator]) -> None:
        """Store block `i` (written at once, atomically, when the cache has a folder)."""
        if self.path is None:
            self.blocks[i] = (dict(groups), {r: GroupAccumulator(a.gram.cpu(), a.abs_sum.cpu(), a.tokens)
                                             for r, a in stats.items()})
            return
        tensors = {}
        for r, a in stats.items():
            tensors[f"{r}/gram"] = a.gram.detach().cpu().contiguous()
            tensors[f"{r}/abs_sum"] = a.abs_sum.detach().cpu().contiguous()
        meta = {"groups": groups, "tokens": {r: a.tokens for r, a in stats.items()}}
        _save_atomic(tensors, self._file(i), {"svdkit_stats": json.dumps(meta)})

    def get(self, i: int, device: torch.device) -> tuple[dict[str, str], dict[str, GroupAccumulator]]:
        """Block `i`'s input groups and statistics, on `device`."""
        if self.path is None:
            groups, stats = self.blocks[i]
            return groups, {r: GroupAccumulator(a.gram.to(device), a.abs_sum.to(device), a.tokens)
                            for r, a in stats.items()}
        from safetensors import safe_open

        with safe_open(str(self._file(i)), framework="pt", device=str(device)) as f:
            meta = json.loads(f.metadata()["svdkit_stats"])
            stats = {r: GroupAccumulator(f.get_tensor(f"{r}/gram"), f.get_tensor(f"{r}/abs_sum"), t)
                     for r, t in meta["tokens"].items()}
        return meta["groups"], stats

    def _set_file(self, name: str, i: int) -> Path:
        return self.path / name / f"block-{i:05d}.safetensors"

    def has_set(self, name: str, n_blocks: int) -> bool:
        """Whether per-block statistics `name` (e.g. output-gradient Grams) are stored for all `n_blocks` blocks."""
        if self.path is None:
            return len(self.sets.get(name, {})) == n_blocks
        return all(self._set_file(name, i).exists() for i in range(n_blocks))

    def put_set(self, name: str, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Store block `i`'s part of statistics `name` (host copies; written atomically with a folder)."""
        host = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if self.path is None:
            self.sets.setdefault(name, {})[i] = host
            return
        _save_atomic(host, self._set_file(name, i))

    def get_set(self, name: str, i: int) -> dict[str, torch.Tensor]:
        """Block `i`'s part of statistics `name`, on the host."""
        if self.path is None:
            return dict(self.sets[name][i])
        from safetensors.torch import load_file

        return load_file(str(self._set_file(name, i)))


def _save_atomic(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file under a temporary name, then rename it: readers see all of it or none."""
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".partial-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, file)


def stats_key(model: nn.Module | StreamedModel | Blocks, calib: torch.Tensor) -> str:
    """A cache key for one-shot statistics: the model's identity and its weights' version, the compute dtype and
    the exact tokens."""
    blocks = as_blocks(model)
    h = hashlib.sha256()
    h.update(str(getattr(blocks.model.config, "name_or_path", "")).encode())
    h.update(str(sum(p.numel() for p in blocks.model.parameters())).encode())
    h.update(f"{blocks.storage_dtype}/{blocks.compute_dtype}".encode())
    _hash_weights(h, blocks)
    h.update(calib.cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def _hash_weights(h, blocks: Blocks) -> None:
    """Add what changes when the weights do: for a checkpoint on disk each tensor file's name, size and
    modification time (a checkpoint rewritten in place at the same path gets new ones); for a model in memory,
    the bytes of its parameters."""
    if blocks.streamed is not None:
        index = blocks.streamed.index
        for f in sorted({*index.files.values(), index.checkpoint}):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return
    for p in blocks.model.parameters():
        if not p.is_meta:
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


# --------------------------------------------------------------------------------------------- the walk
BlockFn = Callable[[int, nn.Module, dict[str, str], dict[str, GroupAccumulator]], None]


@torch.no_grad()
def walk(
    model: nn.Module | StreamedModel | Blocks,
    calib: torch.Tensor,
    on_block: BlockFn,
    *,
    stream: str = "original",
    needs: frozenset[str] = frozenset(),
    device: torch.device | str | None = None,
    batch_size: int = 8,
    skip_block: Callable[[int], bool] | None = None,
    transform: Callable[[Stream], Stream] | None = None,
    stats_cache: StatsCache | None = None,
    after_block: Callable[[int, nn.Module], None] | None = None,
    activations: str = "auto",
    progress: bool = True,
    desc: str = "blocks",
    refine: BlockRefiner | None = None,
) -> None:
    """Walk the decoder blocks with calibration statistics; `on_block(i, block, groups, stats)` may swap
    the block's linears in place. Blocks for which `skip_block(i)` is true are only propagated;
    `after_block(i, block)` sees every block last, while it is still on the device (e.g. to write it out).

    `stream="original"` gathers the Gram matrices from the dense model's activations; `"compressed"` from those
    that went through the already-compressed blocks. `needs` may ask for `gram_c` / `cross` (both streams).
    `transform` rewrites the captured first-block inputs (e.g. AdaSVD's stack-of-batch). With a
    `stats_cache`, one-shot statistics (original stream, nothing else needed) are stored on the first walk
    and reused by later ones, which then run no forward pass at all. With a `refine` (`svdkit.refine`), each
    compressed block is trained right after `on_block` towards the dense block's outputs (both streams are kept).
    """
    blocks = as_blocks(model, device)
    n = len(blocks)
    compared = bool(needs & {"gram_c", "cross"})  # statistics of both streams
    two_streams = compared or refine is not None
    if stream not in STREAMS:
        raise ConfigError(f"stream must be one of {STREAMS}, got {stream!r}")
    w = world()
    if transform is not None and w.active:
        raise ConfigError("rewriting the calibration inputs (stack-of-batch) needs every window in one process")
    cacheable = stats_cache is not None and stream == "original" and transform is None and not two_streams
    bar = progress_bar(range(n), desc=desc, unit="block", disable=not progress)
    if cacheable and w.broadcast_object(stats_cache.complete(n), 0):  # rank 0 writes the cache: it decides
        bar.set_description(f"{desc}, cached statistics")
        for i in bar:
            if skip_block is not None and skip_block(i) and after_block is None:
                continue
            with blocks.on_device(i) as block:
                if not (skip_block is not None and skip_block(i)):
                    groups, stats = stats_cache.get(i, blocks.device)
                    on_block(i, block, groups, stats)
                if after_block is not None:
                    with together(f"finishing block {i}"):
                        after_block(i, block)
        return
    original = capture(blocks, calib, batch_size, activations, streams=2 if two_streams else 1)
    if transform is not None:
        original = transform(original)
    compressed = None
    if two_streams:
        compressed = original.clone()
    elif stream == "compressed":
        original, compressed = None, original
    for i in bar:
        with blocks.on_device(i) as block:
            if skip_block is not None and skip_block(i):
                original = original.run(block) if original is not None else None
                compressed = compressed.run(block) if compressed is not None else None
            else:
                ref = original if original is not None else compressed
                groups = input_groups(block, ref.batch(0), ref.extra)
                inputs, targets = original, None  # the anchored target: the dense block on the dense inputs
                if refine is not None and refine.target == "stream":  # the dense block on the compressed stream
                    inputs, targets = compressed, compressed.outputs(block)
                second = compressed if compared or stream == "compressed" else None
                stats, original = block_statistics(block, groups, original, second, stream, needs)
                with together(f"storing the statistics of block {i}"):  # only the main rank writes
                    if cacheable and w.main:
                        stats_cache.put(i, groups, stats)
                on_block(i, block, groups, stats)
                if refine is not None:
                    refine.fit(i, block, inputs, targets if targets is not None else original.hidden)
                if compressed is not None:
                    compressed = compressed.run(block)
            if after_block is not None:
                with together(f"finishing block {i}"):
                    after_block(i, block)
