"""The calibration passes allocations ask for (`svdkit.allocation.Profiler`), on the engine's walk: per-matrix
statistics for loss-driven ratios (SVD-LLM V2), block similarity for adaCR, the partial-compression
scores of ResSVD's search for `k`, and K-FAC's output-gradient Grams (global ranks, two-sided whitening).
Each pass takes every block onto the device once (the gradient pass twice: forward, then backward)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from .allocation import rank_for_ratio
from .allocation.base import MatrixFn
from .blocks import Blocks
from .dist import progress_bar, together, world
from .engine import walk
from .layout import block_linears, set_submodule, weight_matrix
from .methods.base import LayerStats, Method
from .methods.svdllm import truncate
from .modules import LowRankLinear
from .output_grams import GradientStore, OutputGrams
from .statistics import GroupAccumulator, block_statistics, input_groups, layer_stats
from .stats_cache import StatsCache
from .stream import capture

log = logging.getLogger(__name__)


def group_stats(groups: dict[str, str], stats: dict[str, GroupAccumulator]) -> dict[str, LayerStats]:
    """One `LayerStats` per linear, shared by linears with the same input (so whitening runs once per group)."""
    shared = {rep: layer_stats(acc) for rep, acc in stats.items()}
    return {name: shared[rep] for name, rep in groups.items()}


class Profiler:
    """Calibration passes over `blocks` with `calib`; `method` supplies the whitened spectrum of a matrix."""

    def __init__(self, blocks: Blocks, calib: torch.Tensor, method: Method, *, batch_size: int = 8,
                 progress: bool = True, stats_cache: StatsCache | None = None, activations: str = "auto",
                 scratch: str | os.PathLike | None = None) -> None:
        self.blocks, self.calib, self.method = blocks, calib, method
        self.batch_size, self.progress, self.stats_cache, self.activations = (batch_size, progress, stats_cache,
                                                                              activations)
        self.scratch = scratch  # where scratch folders go (None: the system's temporary folder)
        self._grams: dict[str, OutputGrams] = {}

    def output_grams(self, grad_samples: int | None, labels: str) -> OutputGrams:
        """K-FAC's output-side Grams of every matrix (`svdkit.output_grams`), from one gradient pass per
        calibration set, whose output gradients live in the statistics cache (without one, in a scratch folder
        removed with them); each walk takes its own `walker()`."""
        n = self.calib.shape[0] if grad_samples is None else min(grad_samples, self.calib.shape[0])
        key = f"{labels}-{n}"
        if key not in self._grams:
            self._grams = {}  # one set at a time: they are large
            store = GradientStore(self.stats_cache, key, self.scratch)
            self._grams[key] = OutputGrams(self.blocks, self.calib, n, labels, store, self.progress)
        return self._grams[key]

    def matrix_pass(self, fn: MatrixFn, desc: str = "profile", grams: OutputGrams | None = None) -> None:
        """`fn(block, name, W, stats)` for every decoder-block linear, on the original stream; with `grams`, each
        matrix's `stats.out_gram` is its output-gradient Gram."""
        walker = grams.walker() if grams is not None else None

        def on_block(i, block, groups, stats):
            shared = group_stats(groups, stats)
            out = walker.grams(i, block) if walker is not None else {}
            for name, mod in block_linears(block).items():
                st = shared[name]
                if walker is not None:
                    st = replace(st, out_gram=out[self.blocks.layout.full(i, name)].to(self.blocks.device))
                fn(i, name, weight_matrix(mod).detach().double(), st)

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
