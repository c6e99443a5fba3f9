"""`compress(model, method, calib)`: the one verb that turns a dense model into a low-rank one.

An in-memory model is changed in place. A `StreamedModel` (blocks on disk) is compressed block by block:
each block is read, compressed on the device and handed to `sink` (e.g. a shard writer) before the next
one is read, so memory does not grow with depth. Method-specific behaviour comes only through the
method's declared interface: `allocation` (a spec whose `plan` gives per-matrix ratios), `needs`,
`fisher_windows`, `out_gram_windows`, `out_gram_labels`, `input_transform`, `stream`, `factorize` and
`finetuning` (training the factors of the whole compressed model afterwards: in memory only, see `compress`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, replace

import torch
from torch import nn

from .allocation import PlanContext, rank_for_ratio, ratio_for_rank
from .blocks import Blocks, StreamedModel, move_module
from .dist import assign, progress_bar, together, world
from .engine import walk
from .errors import ConfigError, SvdkitError
from .gradients import fisher_row_importance
from .layout import Layout, block_linears, count_parameters, set_submodule, weight_matrix
from .linalg import check_finite, relative_output_error
from .methods.base import Method, deprecated
from .modules import LowRankLinear
from .parking import Parking, PendingStatistics
from .profiler import Profiler
from .refine import BlockRefiner
from .report import MatrixReport, Report
from .speed import RankRules, apply_rank_rules
from .statistics import GroupAccumulator
from .stats_cache import StatsCache
from .stream import as_blocks

log = logging.getLogger(__name__)

Sink = Callable[[int, nn.Module], None]  # (block index, the finished block on the compute device)
REPORT_FLOAT64_ENTRIES = 4 * 2**20  # matrices up to this size get their reported error in float64 (SmolLM2: all)
# a block whose statistics take this much waits on disk, one group at a time in memory (LLaMA-3-8B: ~10 GB a block)
PARK_BYTES = 2**30


class CompressionError(SvdkitError, RuntimeError):
    """A compression that failed part-way: says which block failed and what state the model was left in."""


def _check_calib(calib: torch.Tensor | None, method: Method) -> None:
    if calib is None:
        if method.needs_data or method.allocation.needs_data or method.refine_config is not None:
            raise ConfigError(f"{method.name} needs calibration data: pass calib, see svdkit.calibration")
        return
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
        raise ConfigError("calib must be a (n, seqlen) LongTensor of token ids; see svdkit.calibration")
    if calib.shape[0] < 1 or calib.shape[1] < 2:
        raise ConfigError(f"calib must hold at least one window of two tokens, got shape {tuple(calib.shape)}")


def _check_train(train: torch.Tensor | None, calib: torch.Tensor | None) -> None:
    if train is None:
        return
    if calib is None:
        raise ConfigError("training windows (train) come beside calibration windows: pass calib too")
    if not isinstance(train, torch.Tensor) or train.dim() != 2 or train.dtype != torch.long:
        raise ConfigError("train must be a (n, seqlen) LongTensor of token ids, like calib")
    if train.shape[1] != calib.shape[1]:
        raise ConfigError(f"train windows have {train.shape[1]} tokens, calib windows {calib.shape[1]}: they must "
                          "be alike")


def training_windows(calib: torch.Tensor, train: torch.Tensor | None) -> torch.Tensor:
    """What refinement and fine-tuning train on: the calibration windows, then the training-only ones."""
    return calib if train is None or train.shape[0] == 0 else torch.cat([calib, train])


def _check_ranks(layout: Layout, ratios: dict[str, float]) -> None:
    """Refuse, before anything is modified, ratios outside [0, 1) or that leave a matrix with rank 0."""
    for full, (m, n) in layout.matrices().items():
        ratio = ratios.get(full, 0.0)
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"ratio {ratio} for {full} is outside [0, 1)")
        if ratio > 0.0 and rank_for_ratio(m, n, ratio) < 1:
            raise ConfigError(f"ratio {ratio:.3f} leaves rank 0 for {full} ({m} x {n}); use a smaller ratio")


def _check_finetune(method: Method, blocks: Blocks):
    """The method's end-to-end fine-tuning (None: none), refused where the whole model is not in one process."""
    fine = method.finetune_config
    if fine is not None and blocks.streamed:
        raise ConfigError(f"{method.name} fine-tunes the whole compressed model, which a model streamed from disk "
                          "never is: use svdkit.pipeline.compress_to (as the CLI does) or an in-memory model")
    if fine is not None and world().active:
        raise ConfigError(f"{method.name} fine-tunes the whole model in one process: run it without torchrun/--nproc")
    return fine


def _calibration_facts(calib: torch.Tensor | None, info: dict | None) -> dict:
    return {"windows": calib.shape[0], "seqlen": calib.shape[1], **(info or {})} if calib is not None else {}


def uniform_ratios(model: nn.Module, ratio: float) -> dict[str, float]:
    """Every decoder-block linear at the same ratio, keyed by its full module name."""
    return dict.fromkeys(Layout.of(model).matrices(), ratio)


@torch.no_grad()
def compress(
    model: nn.Module | StreamedModel,
    method: Method,
    calib: torch.Tensor | None,
    *,
    ratios: dict[str, float] | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    calibration_info: dict | None = None,
    stats_cache: StatsCache | None = None,
    activations: str = "auto",
    sink: Sink | None = None,
    finetune: bool = True,
    rank_rules: RankRules | None = None,
    scratch: str | os.PathLike | None = None,
    fine_tune: bool | None = None,
    train: torch.Tensor | None = None,
) -> Report:
    """Compress every decoder-block linear of `model` with `method`; returns the report.

    `ratios` overrides the per-matrix ratio (full module name -> fraction removed); a matrix at ratio 0 stays
    dense and the report says so. A method that ignores activations (`needs_data = False`, plain SVD) accepts
    `calib=None`: no forward pass, no calibration error in the report. `sink(i, block)` sees every block once it
    is done, still on the device (e.g. to write it out).
    `rank_rules` rounds the planned ranks for speed and may keep slow pairs dense (`svdkit.speed.RankRules`).
    Scratch (spilled activations, output gradients) goes under `scratch` (None: the system's temporary folder).
    A method with `finetuning` (`ft_*` options) then trains the whole in-memory model's factors on `calib`
    (`svdkit.finetune`); `finetune=False` leaves that to the caller (`pipeline.compress_to` does it on disk);
    `fine_tune` is its deprecated old name. `train` holds more windows (like `calib`) that refinement and
    fine-tuning train on beside `calib`; no statistics see them.
    """
    _check_calib(calib, method)
    _check_train(train, calib)
    blocks = as_blocks(model, device)
    if fine_tune is not None:
        deprecated("compress(fine_tune=...) is deprecated: use finetune=...")
        finetune = fine_tune
    fine = _check_finetune(method, blocks) if finetune else None
    if blocks.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(blocks.device)
    start = time.perf_counter()
    report = Report(method=method.name, config=asdict(method), params_before=count_parameters(blocks.model),
                    calibration=_calibration_facts(calib, calibration_info))
    # plan: the gradient statistics the method needs, then the per-matrix ratios
    fisher = (fisher_row_importance(blocks, calib, method.fisher_samples, progress, spill=scratch)
              if "fisher" in method.needs else None)
    profiler = Profiler(blocks, calib, method, batch_size=batch_size, progress=progress, stats_cache=stats_cache,
                        activations=activations, scratch=scratch)
    grams = (profiler.output_grams(method.grad_samples, method.labels)
             if "out_gram" in method.needs else None)  # before the plan: an allocation asking for them reuses them
    ratios, speed_notes = _plan(method, blocks.layout, profiler, ratios, rank_rules, report)
    # walk: factorize block by block
    run = _BlockCompressor(method, blocks, ratios, report, fisher, grams, sink, progress, scratch)
    run.walk(calib, batch_size=batch_size, stats_cache=stats_cache, activations=activations, train=train)
    # report
    if run.refiner is not None:
        report.extra["refine"] = run.refiner.report()
    if fine is not None:
        report.extra["finetune"] = _finetune(blocks, training_windows(calib, train), fine, progress)
    for entry in report.matrices:
        entry.note = speed_notes.get(blocks.layout.full(entry.block, entry.name), entry.note)
    report.matrices.sort(key=lambda e: e.block)
    report.params_after = count_parameters(blocks.model)
    report.seconds = time.perf_counter() - start
    if blocks.device.type == "cuda":
        report.extra["peak_device_bytes"] = torch.cuda.max_memory_allocated(blocks.device)
    log.info("%s: %d -> %d parameters (%.1f%% of decoder-block linears removed) in %.1f s", method.name,
             report.params_before["total"], report.params_after["total"], 100 * report.linear_ratio, report.seconds)
    return report




def _plan(method: Method, layout: Layout, profiler: Profiler, ratios: dict[str, float] | None,
          rank_rules: RankRules | None, report: Report) -> tuple[dict[str, float], dict[str, str]]:
    """The per-matrix ratios (the method's allocation unless given), checked, then rounded by `rank_rules`; and a
    note for each matrix the rules keep dense. The plan's facts go to the report."""
    if ratios is None:
        plan = method.allocation.plan(PlanContext(layout, method.ratio, method, profiler))
        ratios = plan.ratios
        report.extra.update(plan.extra)
    _check_ranks(layout, ratios)
    notes: dict[str, str] = {}
    if rank_rules is not None and rank_rules.active:
        ratios, notes = _apply_rank_rules(layout, ratios, rank_rules)
        report.extra["rank_rules"] = {**asdict(rank_rules), "kept_dense": sorted(notes)}
    report.extra["ratios"] = ratios
    return ratios, notes


class _BlockCompressor:
    """The walk of one compression: each block's matrices factorized (each on one rank, greedy by cost, then
    shared), the block refined if the method asks, handed to the sink; blocks at ratio 0 only passed through."""

    def __init__(self, method: Method, blocks: Blocks, ratios: dict[str, float], report: Report, fisher, grams,
                 sink: Sink | None, progress: bool, scratch: str | os.PathLike | None = None) -> None:
        self.method, self.blocks, self.ratios, self.report = method, blocks, ratios, report
        self.scratch = scratch  # where a block's statistics are parked when they are large
        self.fisher, self.sink, self.progress = fisher, sink, progress
        self.walker = grams.walker() if grams is not None else None  # block i's output-gradient Grams
        self.refiner = BlockRefiner(method.refine_config, progress) if method.refine_config is not None else None
        layout = blocks.layout
        self.dense = {i for i, names in enumerate(layout.linears)
                      if all(ratios.get(layout.full(i, name), 0.0) <= 0.0 for name in names)}
        for i in sorted(self.dense):  # only propagated: no statistics, no factorization
            for name, (m, n) in layout.linears[i].items():
                report.matrices.append(MatrixReport(block=i, name=name, shape=(m, n), rank=None, ratio=0.0,
                                                    params_before=m * n, params_after=m * n,
                                                    note="kept dense: ratio 0"))
        self.done: list[int] = []

    def on_block(self, i: int, block: nn.Module, groups: dict[str, str],
                 stats: dict[str, GroupAccumulator] | None) -> None:
        """Factorize the block's matrices, each on one rank (greedy by cost), and give every rank all of them."""
        w, layout, blocks = world(), self.blocks.layout, self.blocks
        linears = block_linears(block)
        ratio_of = {name: self.ratios.get(layout.full(i, name), 0.0) for name in linears}
        owner = assign([_cost(*layout.linears[i][name], ratio_of[name]) for name in linears], w.size)
        names = [name for name, r in zip(linears, owner, strict=True) if r == w.rank]
        # this rank keeps only the statistics of its own matrices (parked on disk when they are large)
        wanted, pending = {groups.get(name) for name in names}, None
        try:
            with together(f"parking the statistics of block {i}"):  # a disk error on one rank stops every rank
                pending = PendingStatistics(stats, wanted, self._parking(i, stats, wanted, names))
            grams = self.walker.grams(i, block) if self.walker is not None else {}  # while the block is dense
            if self.refiner is not None and self.refiner.config.loss == "fisher":
                self.refiner.set_metric(i, grams[layout.full(i, layout.output_linear(i))])
            with together(f"factorizing block {i}"):
                pending.add_grams(grams, {layout.full(i, name) for name in names})
                mine = self._factorize_all(i, {name: linears[name] for name in names}, ratio_of, groups, pending)
        finally:
            if pending is not None:
                pending.close()
        for (name, mod), r in zip(linears.items(), owner, strict=True):
            entry, new = mine[name] if r == w.rank else (None, None)
            if w.active:
                entry, new = _share(entry, new, r, mod, blocks)
            self.report.matrices.append(entry)
            if new is not None:
                set_submodule(block, name, new)
        self.done.append(i)

    def _parking(self, i: int, stats: dict[str, GroupAccumulator] | None, wanted: set, names: list[str]
                 ) -> Parking | None:
        """A scratch folder for the statistics this rank keeps of block `i` (input groups `wanted`, the output
        Grams of `names`) where they take `PARK_BYTES` (or the environment's `SVDKIT_PARK_BYTES`) or more."""
        held = sum(t.numel() * t.element_size() for rep, acc in (stats or {}).items() if rep in wanted
                   for t in (acc.gram, acc.gram_c, acc.cross) if t is not None)
        if self.walker is not None:
            held += sum(8 * self.blocks.layout.linears[i][name][0] ** 2 for name in names)
        return Parking(self.scratch, need=held) if held >= _park_bytes() else None

    def _factorize_all(self, i: int, linears: dict[str, nn.Module], ratio_of: dict[str, float],
                       groups: dict[str, str], pending: PendingStatistics) -> dict:
        """This rank's matrices of block `i` (`linears`), the widest input first; each matrix's output Gram and
        each input group's statistics are taken when first needed and dropped once they have served, so that
        the widest statistics (an MLP's down projection) are gone before the next group's are used."""
        layout = self.blocks.layout
        order = sorted(linears, key=lambda name: -layout.linears[i][name][1])  # stable: block order within a width
        left = Counter(groups.get(name) for name in order)
        done = {}
        for name in order:
            rep = groups.get(name)
            out_gram = pending.out_gram(layout.full(i, name)) if self.walker is not None else None
            done[name] = _factorize(i, name, linears[name], self.method, ratio_of[name], pending.group(rep),
                                    self.fisher, out_gram, layout, self.blocks)
            del out_gram
            left[rep] -= 1
            if left[rep] == 0:
                pending.release(rep)
        return done

    def after_block(self, i: int, block: nn.Module) -> None:
        if self.walker is not None and i in self.dense:
            self.walker.skip(i, block)
        if self.sink is not None:
            self.sink(i, block)

    def walk(self, calib: torch.Tensor | None, **options) -> None:
        """Every block once; a failure says at which block, and what state the model is left in."""
        method, blocks = self.method, self.blocks
        desc = f"compress ({method.name})"
        try:
            if calib is None:  # data-free: factorize the weights block by block, no forward pass
                for i in progress_bar(range(len(blocks)), desc=desc, unit="block", disable=not self.progress):
                    with blocks.on_device(i) as block:
                        if i not in self.dense:
                            self.on_block(i, block, {}, None)
                        with together(f"finishing block {i}"):
                            self.after_block(i, block)
                return
            transform = method.input_transform
            walk(blocks, calib, self.on_block, stream=method.stream, needs=method.needs, progress=self.progress,
                 desc=desc, skip_block=lambda i: i in self.dense, after_block=self.after_block, refine=self.refiner,
                 transform=(lambda s: s.regroup(transform)) if transform is not None else None, **options)
        except Exception as e:
            done = self.done
            state = ("the model was not changed" if not done else "nothing was written" if blocks.streamed
                     else f"blocks {done[0]}-{done[-1]} of the in-memory model are already compressed; reload it")
            failed = done[-1] + 1 if done else 0
            if isinstance(e, SvdkitError):
                raise CompressionError(f"{method.name} failed at block {failed}: {e} ({state})") from e
            e.add_note(f"svdkit: {method.name} failed at block {failed} ({state})")
            raise


def _park_bytes() -> int:
    value = os.environ.get("SVDKIT_PARK_BYTES")
    if value is None:
        return PARK_BYTES
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"SVDKIT_PARK_BYTES must be a number of bytes, got {value!r}") from None


def _finetune(blocks: Blocks, calib: torch.Tensor, config, progress: bool) -> dict:
    """Train the in-memory model's factors on the compute device (the whole model goes there for the run)."""
    from .finetune import finetune

    move_module(blocks.model, blocks.device, None)
    try:
        with torch.enable_grad():
            return finetune(blocks.model, calib, config, progress=progress)
    finally:
        move_module(blocks.model, blocks.home, None)


def _apply_rank_rules(layout: Layout, ratios: dict[str, float], rules: RankRules
                      ) -> tuple[dict[str, float], dict[str, str]]:
    """The per-matrix ratios after `rules` (each an exact rank), and a note per matrix they keep dense."""
    shapes = layout.matrices()
    planned = {full: _planned_rank(*shapes[full], ratio) for full, ratio in ratios.items()}
    ranks = {full: k for full, k in planned.items() if k is not None}
    new, notes = apply_rank_rules({full: shapes[full] for full in ranks}, ranks, rules)
    out = dict(ratios)
    for full in ranks:
        out[full] = ratio_for_rank(*shapes[full], new[full]) if full in new else 0.0
    return out, notes


def _planned_rank(m: int, n: int, ratio: float) -> int | None:
    """The rank `ratio` gives an `m x n` matrix, or None where it stays dense (ratio 0). A ratio above 0 always
    saves memory (`rank (m + n) <= (1 - ratio) m n`), and `_check_ranks` has refused rank 0."""
    return rank_for_ratio(m, n, ratio) if ratio > 0.0 else None


def _cost(m: int, n: int, ratio: float) -> float:
    """Work of factorizing an `m x n` matrix: its SVD, `m n min(m, n)` (a kept-dense matrix costs nothing)."""
    return float(m * n * min(m, n)) if ratio > 0 else 0.0


def _share(entry: MatrixReport | None, new: LowRankLinear | None, src: int, mod: nn.Module, blocks: Blocks
           ) -> tuple[MatrixReport, LowRankLinear | None]:
    """Rank `src`'s report entry and factors, on every rank (the factors as saved: exact in the compute dtype)."""
    w = world()
    entry = w.broadcast_object(entry, src)
    if entry.rank is None:
        return entry, None
    (m, n), k = entry.shape, entry.rank
    if w.rank == src:  # collectives need contiguous tensors (W_u is kept column-major in memory)
        u, v = new.u.weight.detach().contiguous(), new.v.weight.detach().contiguous()
    else:
        u = torch.empty(m, k, dtype=blocks.compute_dtype, device=blocks.device)
        v = torch.empty(k, n, dtype=blocks.compute_dtype, device=blocks.device)
    w.broadcast(u, src)
    w.broadcast(v, src)
    if w.rank == src:
        return entry, new
    bias = mod.bias.detach() if mod.bias is not None else None
    return entry, LowRankLinear.from_factors(u, v, bias)


def _factorize(i: int, name: str, mod: nn.Module, method: Method, ratio: float, stats, fisher, out_gram,
               layout: Layout, blocks: Blocks) -> tuple[MatrixReport, LowRankLinear | None]:
    """One matrix: its report entry, and its low-rank replacement (None when it stays dense)."""
    t0 = time.perf_counter()
    full = layout.full(i, name)
    w = weight_matrix(mod).detach().double()
    check_finite(w, f"the weight of {full}")
    m, n = w.shape
    rank = _planned_rank(m, n, ratio)
    entry = MatrixReport(block=i, name=name, shape=(m, n), rank=None, ratio=ratio, params_before=m * n,
                         params_after=m * n)
    if rank is None:
        entry.note = "kept dense: ratio 0"
        return entry, None
    if fisher is not None:
        stats = replace(stats, row_importance=fisher[full].to(w.device))
    if out_gram is not None:
        stats = replace(stats, out_gram=out_gram.to(w.device))
    f = method.factorize(w, stats, rank)
    new = LowRankLinear.from_float64(f.w_u, f.w_v, mod.bias, blocks.storage_dtype, blocks.device,
                                     blocks.compute_dtype, full)
    entry.rank, entry.params_after = rank, rank * (m + n)
    if stats is not None:  # the report's figure: float32 products where float64 would cost minutes (1e-5 relative)
        precise = m * n < REPORT_FLOAT64_ENTRIES
        entry.rel_error = relative_output_error(w, new.u.weight.double() @ new.v.weight.double(), stats.gram,
                                                torch.float64 if precise else torch.float32)
    entry.sigma_tail = f.info.pop("sigma_tail", None)
    entry.info = f.info
    entry.seconds = time.perf_counter() - t0
    return entry, new
