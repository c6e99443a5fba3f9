"""The calibration passes allocations ask for (`svdkit.allocation.Profiler`), on the engine's walk: per-matrix
statistics for loss-driven ratios (SVD-LLM V2), block similarity for adaCR, the partial-compression
scores of ResSVD's search for `k`, and K-FAC's output-gradient Grams (global ranks, two-sided whitening).
Each pass takes every block onto the device once (the gradient pass twice: forward, then backward)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from ._fs import Scratch, check_space
from .allocation import rank_for_ratio
from .allocation.base import MatrixFn
from .blocks import Blocks
from .dist import progress_bar, together, world
from .engine import GroupAccumulator, StatsCache, block_statistics, capture, input_groups, walk
from .gradients import output_gradient_grams, spill_bytes
from .layout import Layout, block_linears, set_submodule, weight_matrix
from .methods.base import LayerStats, Method
from .methods.svdllm import truncate
from .modules import LowRankLinear

log = logging.getLogger(__name__)


def layer_stats(acc: GroupAccumulator) -> LayerStats:
    """The method-facing statistics of one input group."""
    return LayerStats(gram=acc.gram, tokens=acc.tokens, abs_mean=acc.abs_sum / max(acc.tokens, 1),
                      gram_c=acc.gram_c, cross=acc.cross)


def group_stats(groups: dict[str, str], stats: dict[str, GroupAccumulator]) -> dict[str, LayerStats]:
    """One `LayerStats` per linear, shared by linears with the same input (so whitening runs once per group)."""
    shared = {rep: layer_stats(acc) for rep, acc in stats.items()}
    return {name: shared[rep] for name, rep in groups.items()}


class BlockSet(Mapping[str, torch.Tensor]):
    """Per-block statistics `name` of a cache by full matrix name, read on demand one block at a time (the
    block read last is kept: the consumers go through the matrices block by block)."""

    def __init__(self, cache: StatsCache, name: str, block_of: dict[str, int], keep: object = None) -> None:
        self.cache, self.name, self.block_of = cache, name, block_of
        self._keep = keep  # e.g. the temporary folder the cache lives in: removed only when this mapping goes
        self._i: int | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        i = self.block_of[key]
        if i != self._i:
            self._tensors, self._i = {}, None  # the previous block goes before the next one comes
            self._tensors, self._i = self.cache.get_set(self.name, i), i
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.block_of)

    def __len__(self) -> int:
        return len(self.block_of)


def gram_bytes(layout: Layout) -> int:
    """Bytes of the float64 output-gradient Grams of every block linear (`8 m^2` each)."""
    return sum(8 * m * m for block in layout.linears for m, _ in block.values())


def _ignore(_i: int, _grams: dict[str, torch.Tensor]) -> None:
    """The sink of ranks that do not write the shared cache (the main rank does)."""


class Profiler:
    """Calibration passes over `blocks` with `calib`; `method` supplies the whitened spectrum of a matrix."""

    def __init__(self, blocks: Blocks, calib: torch.Tensor, method: Method, *, batch_size: int = 8,
                 progress: bool = True, stats_cache: StatsCache | None = None, activations: str = "auto") -> None:
        self.blocks, self.calib, self.method = blocks, calib, method
        self.batch_size, self.progress, self.stats_cache, self.activations = (batch_size, progress, stats_cache,
                                                                              activations)
        self._grams: dict[str, BlockSet] = {}
        self._tmp: Scratch | None = None

    def output_grams(self, windows: int | None, labels: str) -> Mapping[str, torch.Tensor]:
        """K-FAC's output-side Grams of every matrix (`gradients.output_gradient_grams`), computed once per
        calibration set: written block by block to the statistics cache (without one, to a temporary folder)
        and read back one block at a time, so that host memory holds one block's Grams, not the model's."""
        n = self.calib.shape[0] if windows is None else min(windows, self.calib.shape[0])
        key = f"outgrad-{labels}-{n}"
        if key not in self._grams:
            self._grams = {}  # one set at a time: they are large
            store, w, layout = self._gram_store(), world(), self.blocks.layout
            if w.broadcast_object(store.has_set(key, len(self.blocks)), 0):
                log.info("output-gradient Gram matrices read from the statistics cache (%s)", key)
            else:
                # Only the main rank writes a shared cache folder; a store only this process sees (in memory,
                # or this profiler's temporary folder) is written by every rank.
                writes = w.main or store.path is None or store is not self.stats_cache
                with together("checking the free disk for the output-gradient Grams"):  # every rank learns of it
                    if writes and store.path is not None:  # the Grams, and one pass's spilled block inputs
                        spilled = spill_bytes(self.blocks, n * self.calib.shape[1])
                        check_space(store.path, gram_bytes(layout) + spilled, "the output-gradient Gram matrices")
                output_gradient_grams(self.blocks, self.calib, n, labels, self.progress, spill=store.path,
                                      sink=(lambda i, grams: store.put_set(key, i, grams)) if writes else _ignore)
                w.barrier()  # the main rank's last block is written before anyone reads
            block_of = {layout.full(i, name): i for i, block in enumerate(layout.linears) for name in block}
            self._grams[key] = BlockSet(store, key, block_of, keep=self._tmp)
        return self._grams[key]

    def _gram_store(self) -> StatsCache:
        """The statistics cache, or a temporary folder owned by this profiler (removed with it)."""
        if self.stats_cache is not None:
            return self.stats_cache
        if self._tmp is None:
            self._tmp = Scratch("grams")
        return StatsCache(self._tmp.path)

    def matrix_pass(self, fn: MatrixFn, desc: str = "profile") -> None:
        """`fn(block, name, W, stats)` for every decoder-block linear, on the original stream."""

        def on_block(i, block, groups, stats):
            shared = group_stats(groups, stats)
            for name, mod in block_linears(block).items():
                fn(i, name, weight_matrix(mod).detach().double(), shared[name])

        walk(self.blocks, self.calib, on_block, batch_size=self.batch_size, progress=self.progress, desc=desc,
             stats_cache=self.stats_cache, activations=self.activations)

    @torch.no_grad()
    def block_similarity(self) -> list[float]:
        """Per block, the mean over calibration tokens of `cos(x_in, x_out)` on the dense model's hidden states."""
        x = capture(self.blocks, self.calib, self.batch_size, self.activations)
        out = []
        for i in progress_bar(range(len(self.blocks)), desc="importance", unit="block", disable=not self.progress):
            total, count = 0.0, 0
            with together(f"profiling block {i}"), self.blocks.on_device(i) as block:
                y = x.run(block)
                for a, b in zip(x.hidden, y.hidden, strict=True):
                    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
                    total += float(cos.double().sum())
                    count += cos.numel()
            total, count = world().sum([total, count])
            out.append(total / count)
            x = y
        return out

    @torch.no_grad()
    def partial_scores(self, ks: Sequence[int], ratios_for: Callable[[int], list[float]],
                       windows: int) -> dict[int, float]:
        """Relative error of the final hidden states on the first `windows` calibration windows for each `k`
        (the last `k` blocks compressed by whitened truncation at `ratios_for(k)`), in one walk: block `i`
        runs the original stream and one stream per candidate that already started compressing."""
        blocks, n, w = self.blocks, len(self.blocks), world()
        first = n - max(ks)
        cached = self.stats_cache is not None and w.broadcast_object(self.stats_cache.complete(n), 0)
        calib = self.calib[:windows] if cached else self.calib
        mine = len(range(w.rank, min(windows, calib.shape[0]), w.size))  # this rank's share of the scored windows
        original = capture(blocks, calib, self.batch_size, self.activations, streams=1 + len(ks))
        dense = original.head(mine)
        candidates = {}
        for i in progress_bar(range(n), desc="plc search", unit="block", disable=not self.progress):
            with blocks.on_device(i) as block:
                if i < first:
                    original = original.run(block)
                    dense = original.head(mine)
                    continue
                if cached:
                    groups, stats = self.stats_cache.get(i, blocks.device)
                    original = original.run(block)
                else:
                    groups = input_groups(block, original.batch(0), original.extra)
                    stats, original = block_statistics(block, groups, original, None, "original", frozenset())
                    with together(f"storing the statistics of block {i}"):  # only the main rank writes
                        if self.stats_cache is not None and w.main:
                            self.stats_cache.put(i, groups, stats)
                shared = group_stats(groups, stats)
                linears = block_linears(block)
                spectra = {name: self.method.spectrum(weight_matrix(m).detach().double(), shared[name])
                           for name, m in linears.items()}
                if n - i in ks:
                    candidates[n - i] = dense
                with together(f"scoring candidates at block {i}"):
                    self._advance(candidates, block, linears, spectra, ratios_for, i)
                dense = original.head(mine)
        final = torch.cat([t.float() for t in dense.hidden]) if mine else None
        norm2 = w.sum([float((final.double() ** 2).sum()) if mine else 0.0])[0]
        scores = {}
        for k in sorted(candidates):
            err2 = float(((torch.cat([t.float() for t in candidates[k].hidden]) - final).double() ** 2).sum()) \
                if mine else 0.0
            scores[k] = (w.sum([err2])[0] / norm2) ** 0.5
        return scores

    def _advance(self, candidates: dict, block, linears: dict, spectra: dict, ratios_for, i: int) -> None:
        """Run each started candidate's stream through block `i` truncated at that candidate's ratio."""
        blocks = self.blocks
        for k, stream in candidates.items():
            ratio = ratios_for(k)[i]
            trial = copy.deepcopy(block)
            for name, mod in linears.items():
                f = truncate(spectra[name], rank_for_ratio(*weight_matrix(mod).shape, ratio))
                set_submodule(trial, name, LowRankLinear.from_float64(
                    f.w_u, f.w_v, mod.bias, blocks.storage_dtype, blocks.device, blocks.compute_dtype, name))
            candidates[k] = stream.run(trial)
            del trial
