"""K-FAC's output-side Gram matrices `G = sum_t g_t g_t^T` of every block linear, `g_t` the loss gradient at
the linear's output, with scratch bounded by activations instead of by the Grams.

The Grams take `8 m^2` bytes per linear in float64 (119 GB for a LLaMA-3-8B shape, over a terabyte at 70B), so
at such widths they are never stored. The gradient pass stores the loss gradient at each block's output instead
(`gradients.block_output_gradients`: `tokens x width` numbers per block in the compute dtype, 8.6 GB for an 8B
shape with 32 x 512 tokens in float32, half that in bf16), and a walk computes block `i`'s Grams when it reaches
block `i`, while that block is still dense: the gradient windows' dense inputs, carried from block to block by
the walk itself, are back-propagated through the block with the stored gradient (`gradients.block_backward`),
exactly as the pass back-propagated them. The Grams are the numbers the pass would have summed, and one block's
Grams exist at a time. Where a block's Grams in float32 take no more room than its gradients (small widths, many
tokens: `stores_grams`), the pass stores those instead, and no walk back-propagates again.

With several processes each rank stores the gradients (or Grams) of its own windows (one store's worth per
machine in all) and the Grams are all-reduced in float64 block by block.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ._fs import Scratch, check_space
from .blocks import Blocks
from .dist import together, world
from .gradients import _Sums, block_backward, block_output_gradients, block_output_grams, gram_accumulators
from .layout import Layout
from .linalg import check_finite
from .stats_cache import StatsCache
from .stream import Stream, capture

log = logging.getLogger(__name__)


def gradient_bytes(blocks: Blocks, windows: int, seqlen: int) -> int:
    """Scratch a gradient pass over `windows` windows of `seqlen` tokens needs at its peak, counting every rank's
    windows (ranks on one machine share its disk): one `tokens x width` tensor per block, first the spilled
    inputs, then as many stored output gradients (each input file goes as its block's gradient comes)."""
    width = int(blocks.model.config.get_text_config().hidden_size)
    return (len(blocks) + 1) * windows * seqlen * width * blocks.compute_dtype.itemsize


def gram_bytes(layout: Layout) -> int:
    """What the largest block's output-gradient Grams take stored in float32: `4 m^2` per linear."""
    return max(sum(4 * m * m for m, _ in block.values()) for block in layout.linears)


def stores_grams(blocks: Blocks, windows: int, seqlen: int) -> bool:
    """Whether a block's Grams (float32) take no more room than its output gradients over `windows` windows of
    `seqlen` tokens (`windows` per rank): then the gradient pass stores the Grams and no walk back-propagates
    again. True for small models with many tokens (SmolLM2 over 32 x 512), false at 8B widths (1.9 GB of Grams
    against 134 MB of bf16 gradients per block)."""
    width = int(blocks.model.config.get_text_config().hidden_size)
    return gram_bytes(blocks.layout) <= windows * seqlen * width * blocks.compute_dtype.itemsize


class GradientStore:
    """What the gradient pass leaves for the walks, for this rank's windows, one safetensors file per block: the
    loss gradients at each block's output (`grams=False`), or the output-gradient Grams themselves in float32
    (`grams=True`); in a statistics cache (a sweep reuses them across methods) or in a scratch folder of this
    process."""

    def __init__(self, cache: StatsCache | None, key: str, scratch: str | Path | None = None) -> None:
        self.key, self.grams = key, False
        self._scratch = Scratch("grams", scratch) if cache is None else None
        self.cache = cache if cache is not None else StatsCache(self._scratch.path)

    @property
    def name(self) -> str:
        """The set's name in the cache: what it holds, the key, and with several processes this rank's part."""
        w = world()
        name = f"{'outgram' if self.grams else 'outgrad'}-{self.key}"
        return name if not w.active else f"{name}-rank{w.rank}of{w.size}"  # each rank its own windows

    @property
    def path(self) -> Path | None:
        return self.cache.path

    def complete(self, n_blocks: int) -> bool:
        return self.cache.has_set(self.name, n_blocks)

    def put(self, i: int, grads: list[torch.Tensor]) -> None:
        self.cache.put_set(self.name, i, {str(b): g for b, g in enumerate(grads)})

    def get(self, i: int) -> list[torch.Tensor]:
        stored = self.cache.get_set(self.name, i)
        return [stored[str(b)] for b in range(len(stored))]

    def put_grams(self, i: int, grams: dict[str, torch.Tensor]) -> None:
        self.cache.put_set(self.name, i, {k: g.float() for k, g in grams.items()})

    def get_grams(self, i: int) -> dict[str, torch.Tensor]:
        return {k: g.double() for k, g in self.cache.get_set(self.name, i).items()}


class OutputGrams:
    """The output-side Grams of every block linear for the first `grad_samples` calibration windows (None: all),
    from one gradient pass (run here unless `store` already holds it). Each walk over the blocks takes a
    `walker()` and asks it for block `i`'s Grams in block order, while the block is still dense.

    The pass stores the Grams themselves where they take no more room than the gradients (`stores_grams`;
    `grams=True` / `False` forces one or the other), else the gradients, from which each walk computes the Grams
    by back-propagating again."""

    def __init__(self, blocks: Blocks, calib: torch.Tensor, grad_samples: int | None, labels: str,
                 store: GradientStore, progress: bool = True, grams: bool | None = None) -> None:
        n = calib.shape[0] if grad_samples is None else min(grad_samples, calib.shape[0])
        self.blocks, self.calib, self.store = blocks, calib[:n], store
        w = world()
        store.grams = stores_grams(blocks, n // w.size, calib.shape[1]) if grams is None else grams
        missing = not store.complete(len(blocks))
        if w.sum([float(missing)])[0] > 0:  # the pass is collective: every rank runs it if any rank lacks its part
            with together("checking the free disk for the output gradients"):
                if store.path is not None:
                    check_space(store.path, gradient_bytes(blocks, n, calib.shape[1]),
                                "the output gradients of the K-FAC statistics")
            if store.grams:
                block_output_grams(blocks, self.calib, store.put_grams, labels=labels, progress=progress,
                                   spill=store.path)
            else:
                block_output_gradients(blocks, self.calib, store.put, labels=labels, progress=progress,
                                       spill=store.path)
        else:
            log.info("output-gradient %s read from the statistics cache (%s)",
                     "Grams" if store.grams else "gradients", store.name)

    def walker(self) -> GramWalker:
        return GramWalker(self.blocks, self.calib, self.store)


class GramWalker:
    """Block `i`'s output-gradient Grams on demand, in block order: read from the store where the pass stored
    them, else computed: the gradient windows' dense inputs enter block 0 (captured one window per batch, as the
    gradient pass did) and follow the dense blocks."""

    def __init__(self, blocks: Blocks, calib: torch.Tensor, store: GradientStore) -> None:
        w = world()
        self.blocks, self.store, self.next = blocks, store, 0
        self.x: Stream | None = None
        if not store.grams:
            mine = calib[w.shard(calib.shape[0])] if w.active else calib
            self.x = capture(blocks, mine, 1, shard=False)

    def grams(self, i: int, block: nn.Module) -> dict[str, torch.Tensor]:
        """Block `i`'s Grams by full linear name (float64, on the host, summed over ranks); `block` is block `i`,
        dense, on the compute device. Moves the walker on to block `i + 1`."""
        with together(f"computing the output-gradient Grams of block {i}"):
            self._check(i)
            grams = self.store.get_grams(i) if self.store.grams else self._computed(i, block)
            self.next += 1
        for name, g in grams.items():  # the collective runs where the process group's backend wants its tensors
            grams[name] = g.to(self.blocks.device)
            world().all_reduce(grams[name])
        for name, g in grams.items():
            check_finite(g, f"output-gradient Gram matrix of {name}")
            grams[name] = g.cpu()
        return grams

    def _computed(self, i: int, block: nn.Module) -> dict[str, torch.Tensor]:
        """Block `i`'s Grams from the stored gradients, back-propagated through the dense block."""
        layout: Layout = self.blocks.layout
        grams = gram_accumulators(layout, i, self.blocks.device)
        outputs: list[torch.Tensor] = []  # the backward's forward gives the next block's inputs
        block_backward(block, layout, i, self.x, self.store.get(i), _Sums(grams=grams), outputs)
        self.x = self.x.replaced(outputs)
        return grams

    @torch.no_grad()
    def skip(self, i: int, block: nn.Module) -> None:
        """Move on past block `i` (left dense: no Grams wanted)."""
        self._check(i)
        if self.x is not None:
            self.x = self.x.run(block)
        self.next += 1

    def _check(self, i: int) -> None:
        if i != self.next:
            raise RuntimeError(f"svdkit bug: output-gradient Grams asked for block {i}, expected block {self.next}")


def output_gradient_grams(blocks: Blocks, calib: torch.Tensor, grad_samples: int | None = None,
                          labels: str = "data", progress: bool = True, scratch: str | Path | None = None,
                          stored: bool | None = None) -> dict[str, torch.Tensor]:
    """Every block linear's output-gradient Gram at once, by full name (float64, on the host): for small models
    and tests, since together they take `8 m^2` bytes per linear. A compression never holds more than one
    block's (`OutputGrams.walker`). `stored` as `OutputGrams`' `grams` (None: whichever takes less room)."""
    store = GradientStore(None, f"{labels}-all", scratch)
    grams = OutputGrams(blocks, calib, grad_samples, labels, store, progress, stored)
    walker, out = grams.walker(), {}
    for i in range(len(blocks)):
        with blocks.on_device(i) as block:
            out.update(walker.grams(i, block))
    return out
