"""The layer-by-layer walk: capture the first block's inputs, then take the blocks one at a time onto the
compute device (`Blocks.on_device`), gather statistics with hooks, let a method factorize each linear,
swap in `LowRankLinear`, and pass the outputs on.

Only the current block, the calibration activations (`svdkit.stream`) and that block's statistics
(`svdkit.statistics`) are resident. Two activation streams exist: `original` (outputs of the uncompressed model)
and `compressed` (outputs of the blocks already compressed); a method's `stream` and `needs` decide which are
kept. One-shot statistics can come from the statistics cache (`svdkit.stats_cache`) instead of a forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .blocks import Blocks, StreamedModel
from .dist import progress_bar, together, world
from .errors import ConfigError
from .methods.base import STREAMS
from .statistics import GroupAccumulator, block_statistics, input_groups
from .stats_cache import StatsCache
from .stream import Stream, as_blocks, capture

if TYPE_CHECKING:
    from .refine import BlockRefiner

log = logging.getLogger(__name__)


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
    train: torch.Tensor | None = None,
) -> None:
    """Walk the decoder blocks with calibration statistics; `on_block(i, block, groups, stats)` may swap
    the block's linears in place. Blocks for which `skip_block(i)` is true are only propagated;
    `after_block(i, block)` sees every block last, while it is still on the device (e.g. to write it out).

    `stream="original"` gathers the Gram matrices from the dense model's activations; `"compressed"` from those
    that went through the already-compressed blocks. `needs` may ask for `gram_c` / `cross` (both streams).
    `transform` rewrites the captured first-block inputs (e.g. AdaSVD's stack-of-batch). With a
    `stats_cache`, one-shot statistics (original stream, nothing else needed) are stored on the first walk
    and reused by later ones, which then run no forward pass at all. With a `refine` (`svdkit.refine`), each
    compressed block is trained right after `on_block` towards the dense block's outputs (both streams are kept);
    `train` adds windows that only the refinement sees (carried through the blocks beside the calibration
    windows, never in the statistics).
    """
    blocks = as_blocks(model, device)
    if stream not in STREAMS:
        raise ConfigError(f"stream must be one of {STREAMS}, got {stream!r}")
    w = world()
    if transform is not None and w.active:
        raise ConfigError("rewriting the calibration inputs (stack-of-batch) needs every window in one process")
    run = _Walk(blocks, on_block, stream, needs, skip_block, after_block, refine)
    cacheable = stats_cache is not None and stream == "original" and transform is None and not run.two_streams
    bar = progress_bar(range(len(blocks)), desc=desc, unit="block", disable=not progress)
    if cacheable and w.broadcast_object(stats_cache.complete(len(blocks)), 0):  # rank 0 writes the cache: it decides
        bar.set_description(f"{desc}, cached statistics")
        run.cached(bar, stats_cache)
        return
    original = capture(blocks, calib, batch_size, activations, streams=2 if run.two_streams else 1)
    if transform is not None:
        original = transform(original)
    if train is not None and train.shape[0] > 0 and refine is not None:
        run.more = capture(blocks, train, batch_size, activations, streams=2)
        if refine.config.correct:
            run.more_dense = run.more.clone()
    run.live(bar, original, stats_cache if cacheable else None)


def towards(targets: list[torch.Tensor], dense: list[torch.Tensor], c: float) -> list[torch.Tensor]:
    """Each batch's target moved a fraction `c` of the way to the dense model's hidden states (`c = 1`: those)."""
    return [t.lerp(d.to(t.dtype), c) if c < 1 else d for t, d in zip(targets, dense, strict=True)]


@dataclass
class _Walk:
    """One walk's blocks and callbacks (see `walk`), and its two ways through the blocks."""

    blocks: Blocks
    on_block: BlockFn
    stream: str
    needs: frozenset[str]
    skip_block: Callable[[int], bool] | None
    after_block: Callable[[int, nn.Module], None] | None
    refine: BlockRefiner | None
    more: Stream | None = None  # training-only windows: the compressed stream (stream target) or the dense one
    more_dense: Stream | None = None  # and their dense stream, for a stream target moved towards it (`correct`)

    @property
    def compared(self) -> bool:
        """Statistics of both streams (`gram_c`, `cross`)."""
        return bool(self.needs & {"gram_c", "cross"})

    @property
    def two_streams(self) -> bool:
        return self.compared or self.refine is not None

    def skipped(self, i: int) -> bool:
        return self.skip_block is not None and self.skip_block(i)

    def finish(self, i: int, block: nn.Module) -> None:
        if self.after_block is not None:
            with together(f"finishing block {i}"):
                self.after_block(i, block)

    def cached(self, bar, cache: StatsCache) -> None:
        """Every block's statistics from the cache: no forward pass at all."""
        for i in bar:
            if self.skipped(i) and self.after_block is None:
                continue
            with self.blocks.on_device(i) as block:
                if not self.skipped(i):
                    groups, stats = cache.get(i, self.blocks.device)
                    self.on_block(i, block, groups, stats)
                self.finish(i, block)

    def live(self, bar, original: Stream, cache: StatsCache | None) -> None:
        """Statistics from the streams, block by block; with a `cache`, stored as they are computed."""
        compressed = None
        if self.two_streams:
            compressed = original.clone()
        elif self.stream == "compressed":
            original, compressed = None, original
        for i in bar:
            with self.blocks.on_device(i) as block:
                if self.skipped(i):
                    original = original.run(block) if original is not None else None
                    compressed = compressed.run(block) if compressed is not None else None
                    self.more = self.more.run(block) if self.more is not None else None
                    self.more_dense = self.more_dense.run(block) if self.more_dense is not None else None
                else:
                    original = self._block(i, block, original, compressed, cache)
                    if compressed is not None:
                        compressed = compressed.run(block)
                    if self.more is not None and self.refine.target == "stream":
                        self.more = self.more.run(block)
                self.finish(i, block)

    def _block(self, i: int, block: nn.Module, original: Stream | None, compressed: Stream | None,
               cache: StatsCache | None) -> Stream | None:
        """Block `i`'s statistics, `on_block` and refinement; returns the next original stream."""
        ref = original if original is not None else compressed
        groups = input_groups(block, ref.batch(0), ref.extra)
        inputs, targets = original, None  # the anchored target: the dense block on the dense inputs
        if self.refine is not None and self.refine.target == "stream":  # the dense block on the compressed stream
            inputs, targets = compressed, compressed.outputs(block)
        more = self._more_pairs(block)  # while the block is still dense
        second = compressed if self.compared or self.stream == "compressed" else None
        stats, original = block_statistics(block, groups, original, second, self.stream, self.needs)
        with together(f"storing the statistics of block {i}"):  # only the main rank writes
            if cache is not None and world().main:
                cache.put(i, groups, stats)
        self.on_block(i, block, groups, stats)
        if self.refine is not None:
            if targets is not None and self.refine.config.correct:
                targets = towards(targets, original.hidden, self.refine.config.correct)
            pairs = [(inputs, targets if targets is not None else original.hidden)]
            self.refine.fit(i, block, pairs + ([more] if more is not None else []))
        return original

    def _more_pairs(self, block: nn.Module) -> tuple[Stream, list[torch.Tensor]] | None:
        """The training-only windows' inputs and the dense block's outputs on them (None without any), moved
        towards its outputs on their dense stream with `correct`; a dense stream moves on to its outputs."""
        if self.more is None:
            return None
        inputs, out = self.more, self.more.outputs(block)
        if self.refine.target == "anchored":
            self.more = inputs.replaced(out)
        if self.more_dense is not None:
            dense = self.more_dense.outputs(block)
            self.more_dense = self.more_dense.replaced(dense)
            out = towards(out, dense, self.refine.config.correct)
        return inputs, out
