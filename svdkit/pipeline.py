"""Disk to disk: compress (and optionally fine-tune, then quantize) a checkpoint block by block into a saved
folder, holding one block at a time (the whole compressed model while fine-tuning), as the CLI and the sweep do.
For a model already in memory use `compress` and `save`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ._fs import scratch_dir
from .blocks import StreamedModel, move_module
from .compression import compress, training_windows
from .dist import world
from .errors import ConfigError, OutputError
from .io import MAX_SHARD_BYTES, FolderWriter, conv1d_names, load, module_tensors, open_streamed, resolve_format, save
from .methods.base import Method
from .methods.finetune import FinetuneConfig
from .models import open_model
from .quant.quantize import QuantConfig, QuantReport, quantize_model
from .report import Report
from .shards import unique_tensors
from .speed import RankRules
from .stream import model_device

log = logging.getLogger(__name__)


class _BlockSink:
    """Writes each finished block to a `FolderWriter` (factors as they are, or multiplied back with `dense`)."""

    def __init__(self, writer: FolderWriter, sm: StreamedModel, dense: bool) -> None:
        self.writer, self.sm, self.dense = writer, sm, dense
        self.conv1d = conv1d_names(sm.config) if dense else frozenset()

    @classmethod
    def start(cls, writer: FolderWriter | None, sm: StreamedModel, dense: bool) -> _BlockSink | None:
        """A sink on `writer` that has already written the non-block tensors; None without a writer (the ranks
        that write nothing)."""
        if writer is None:
            return None
        sink = cls(writer, sm, dense)
        sink.nonblock()
        return sink

    def nonblock(self) -> None:
        """Write the tensors outside the decoder blocks (embeddings, final norm, head), tied ones once."""
        prefix = self.sm.layout.prefix + "."
        state = {k: v for k, v in self.sm.model.state_dict().items() if not k.startswith(prefix)}
        self.writer.add({k: v.detach().cpu() for k, v in unique_tensors(state).items()})

    def __call__(self, i: int, block: torch.nn.Module) -> None:
        prefix = self.sm.layout.block_prefix(i)
        conv1d = frozenset(n[len(prefix):] for n in self.conv1d if n.startswith(prefix))
        self.writer.add(module_tensors(block, prefix, self.sm.storage_dtype, self.dense, conv1d))


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Callable[[], Path]]:
    """Hands out scratch folders beside `target` (the same on every rank) and removes them at the end."""
    w = world()
    made: list[Path] = []

    def stage() -> Path:
        path = Path(w.broadcast_object(
            scratch_dir(_existing_parent(target), target.name, "stage") if w.main else None, 0))
        made.append(path)
        return path

    try:
        yield stage
    finally:
        if w.main:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)


def _checked_format(sm: StreamedModel, method: Method, calib: torch.Tensor | None, quantize: QuantConfig | None,
                   dense: bool, format: str) -> str:
    """The output format `compress_to` writes, refusing the combinations it cannot."""
    format = "svdkit" if dense else resolve_format(format, sm.model, quantize is not None)
    if quantize is not None and format != "svdkit":
        raise ConfigError("format='transformers' does not hold quantized layers: use format='svdkit'")
    if method.finetune_config is not None and calib is not None and world().active:
        raise ConfigError(f"{method.name} fine-tunes the whole model in one process: run it without torchrun/--nproc")
    return format


def _compress_into(folder: Path, sm: StreamedModel, method: Method, calib: torch.Tensor | None, *, dense: bool,
                   overwrite: bool, format: str, max_shard_bytes: int, **kwargs) -> Report:
    """Compress `sm` block by block, each finished block going on to `folder`'s writer."""
    with _writer(folder, dense=dense, overwrite=overwrite, format=format, max_shard_bytes=max_shard_bytes) as fw:
        report = compress(sm, method, calib, sink=_BlockSink.start(fw, sm, dense), finetune=False, **kwargs)
        if fw is not None:
            fw.finish(sm.model, tokenizer=sm.tokenizer, report=report)
    return report


def compress_to(
    model: str | os.PathLike | StreamedModel,
    out: str | os.PathLike,
    method: Method,
    calib: torch.Tensor | None,
    *,
    quantize: QuantConfig | None = None,
    dense: bool = False,
    format: str = "svdkit",
    overwrite: bool = False,
    dtype: str | torch.dtype = "auto",
    device: torch.device | str | None = None,
    batch_size: int = 8,
    activations: str = "auto",
    calibration_info: dict | None = None,
    progress: bool = True,
    stats_cache=None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    rank_rules: RankRules | None = None,
    scratch: str | os.PathLike | None = None,
    train: torch.Tensor | None = None,
) -> tuple[Report, QuantReport | None]:
    """Compress `model` (a model name or folder, opened with its blocks on disk) with `method` and write the
    result to `out`, one block at a time; with `quantize`, then quantize that result (GPTQ calibrates on the
    compressed model's own activations) into `out`. `format` is `svdkit`, `transformers` (a folder plain
    transformers loads) or `auto` (see `io.resolve_format`). Nothing is written to `out` unless everything
    succeeded. Each block's tensors go to the writer as soon as the block is done, and on to disk (nothing holds
    a whole shard). `rank_rules` and `train` as for `compress`. Scratch folders (spilled activations, output
    gradients) go under `scratch`, by default beside `out`.

    A method that fine-tunes (`method.finetune_config`, the `ft_*` options) is compressed block by block into a
    staging folder first, which is then loaded whole, fine-tuned on `calib` on `device` (`svdkit.finetune`)
    and written on: that step needs the whole compressed model in memory, and one process."""
    sm = model if isinstance(model, StreamedModel) else open_model(model, dtype)
    format = _checked_format(sm, method, calib, quantize, dense, format)
    fine = method.finetune_config if calib is not None else None
    common = {"device": device, "batch_size": batch_size, "activations": activations, "progress": progress}
    target = Path(out)
    scratch = scratch if scratch is not None else _existing_parent(target)
    last = quantize is None and fine is None  # the compression writes `out` itself
    if not last and not overwrite and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OutputError(f"{target} already exists and is not empty (pass overwrite=True / --overwrite)")
    with _staging(target) as stage:
        first = target if last else stage()
        report = _compress_into(first, sm, method, calib, dense=dense and last, overwrite=overwrite or not last,
                                format=format if last else "svdkit", max_shard_bytes=max_shard_bytes,
                                calibration_info=calibration_info, stats_cache=stats_cache, rank_rules=rank_rules,
                                scratch=scratch, train=train, **common)
        world().barrier()  # the folder is complete before any rank reads it
        source = first
        if fine is not None:
            source = target if quantize is None else stage()
            finetune_to(first, source, fine, training_windows(calib, train), report, storage=sm.storage_dtype,
                        dense=dense and quantize is None, format=format if quantize is None else "svdkit",
                        overwrite=overwrite or quantize is not None, device=device, progress=progress)
        if quantize is None:
            return report, None
        qreport = quantize_to(source, target, quantize, calib, dense=dense, overwrite=overwrite, report=report,
                              calibration_info=calibration_info, max_shard_bytes=max_shard_bytes, **common)
        return report, qreport


def finetune_to(
    source: str | os.PathLike,
    out: str | os.PathLike,
    config: FinetuneConfig,
    calib: torch.Tensor,
    report: Report,
    *,
    storage: torch.dtype | None = None,
    dense: bool = False,
    format: str = "svdkit",
    overwrite: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict:
    """Load the compressed folder `source` whole in float32 on `device`, fine-tune its factors on `calib`
    (`svdkit.finetune.finetune`) and save it to `out` in the `storage` dtype (None: the folder's); `report`
    (the compression's) gets the fine-tuning's trace under `extra["finetune"]` and its time, and is saved with it."""
    from .finetune import finetune

    storage = storage or open_streamed(source, with_tokenizer=False).storage_dtype
    model, tokenizer = load(source, dtype=torch.float32, device=device or "cpu")
    trace = finetune(model, calib, config, progress=progress)
    move_module(model, model_device(model), storage)
    report.extra["finetune"] = trace
    report.seconds += trace["seconds"]
    save(model, out, tokenizer=tokenizer, report=report, dense=dense, overwrite=overwrite, format=format)
    return trace


def quantize_to(
    model: str | os.PathLike | StreamedModel,
    out: str | os.PathLike,
    config: QuantConfig,
    calib: torch.Tensor | None,
    *,
    dense: bool = False,
    overwrite: bool = False,
    report: Report | None = None,
    dtype: str | torch.dtype = "auto",
    device: torch.device | str | None = None,
    batch_size: int = 8,
    activations: str = "auto",
    calibration_info: dict | None = None,
    progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> QuantReport:
    """Quantize every decoder-block linear of `model` (dense, or a compressed folder's factors) block by block
    into `out`; `report` is the compression report to keep in the recipe."""
    sm = model if isinstance(model, StreamedModel) else open_model(model, dtype)
    with _writer(out, dense=dense, overwrite=overwrite, max_shard_bytes=max_shard_bytes) as fw:
        sink = _BlockSink.start(fw, sm, dense)
        qreport = quantize_model(sm, config, calib, device=device, batch_size=batch_size, activations=activations,
                                 calibration_info=calibration_info, sink=sink, progress=progress)
        if fw is not None:
            fw.finish(sm.model, tokenizer=sm.tokenizer, report=report, quant_report=qreport)
    world().barrier()
    return qreport


def _writer(path: Path | str | os.PathLike, **kwargs) -> contextlib.AbstractContextManager[FolderWriter | None]:
    """A `FolderWriter` on the main rank; nothing on the others (only rank 0 writes files)."""
    return FolderWriter(path, **kwargs) if world().main else contextlib.nullcontext()


def _existing_parent(path: Path) -> Path:
    """The nearest existing folder above `path` (created folders start there)."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent
