"""Disk to disk: compress (and optionally quantize) a checkpoint block by block into a saved folder, holding
one block at a time, as the CLI and the sweep do. For a model already in memory use `compress` and `save`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .blocks import StreamedModel
from .compression import compress
from .dist import world
from .errors import ConfigError
from .io import FolderWriter, conv1d_names, module_tensors, resolve_format
from .methods.base import Method
from .models import open_model
from .quant.quantize import QuantConfig, QuantReport, quantize_model
from .report import Report
from .shards import unique_tensors

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
) -> tuple[Report, QuantReport | None]:
    """Compress `model` (a model name or folder, opened with its blocks on disk) with `method` and write the
    result to `out`, one block at a time; with `quantize`, then quantize that result (GPTQ calibrates on the
    compressed model's own activations) into `out`. `format` is `svdkit`, `transformers` (a folder plain
    transformers loads) or `auto` (see `io.resolve_format`). Nothing is written to `out` unless everything
    succeeded."""
    sm = model if isinstance(model, StreamedModel) else open_model(model, dtype)
    format = "svdkit" if dense else resolve_format(format, sm.model, quantize is not None)
    if quantize is not None and format != "svdkit":
        raise ConfigError("format='transformers' does not hold quantized layers: use format='svdkit'")
    common = {"device": device, "batch_size": batch_size, "activations": activations, "progress": progress}
    target = Path(out)
    w = world()
    stage = target if quantize is None else Path(w.broadcast_object(
        tempfile.mkdtemp(prefix=f".{target.name}.stage-", dir=_existing_parent(target)) if w.main else None, 0))
    try:
        with _writer(stage, dense=dense and quantize is None, overwrite=overwrite or quantize is not None,
                     format=format) as fw:
            sink = _BlockSink.start(fw, sm, dense and quantize is None)
            report = compress(sm, method, calib, sink=sink, calibration_info=calibration_info,
                              stats_cache=stats_cache, **common)
            if fw is not None:
                fw.finish(sm.model, tokenizer=sm.tokenizer, report=report)
        w.barrier()  # the folder is complete before any rank reads it
        if quantize is None:
            return report, None
        qreport = quantize_to(stage, target, quantize, calib, dense=dense, overwrite=overwrite, report=report,
                              calibration_info=calibration_info, **common)
        return report, qreport
    finally:
        if quantize is not None and w.main:
            shutil.rmtree(stage, ignore_errors=True)


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
) -> QuantReport:
    """Quantize every decoder-block linear of `model` (dense, or a compressed folder's factors) block by block
    into `out`; `report` is the compression report to keep in the recipe."""
    sm = model if isinstance(model, StreamedModel) else open_model(model, dtype)
    with _writer(out, dense=dense, overwrite=overwrite) as fw:
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
