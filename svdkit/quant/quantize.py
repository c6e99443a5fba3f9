"""`quantize_model(model, config, calib)`: replace every decoder-block linear (dense, or either factor of a
`LowRankLinear`) by a `QuantLinear`, with GPTQ on calibration statistics or plain round-to-nearest.

GPTQ walks the blocks with svdkit's engine (`capture_inputs`, `input_groups`, `block_statistics`,
`run_block`): each block sees the outputs of the already-quantized blocks before it. Inside a block the
linears are quantized in stages: first every linear whose input does not come from another float linear
of the block (dense linears and the `v` factors), then the `u` factors on the outputs of their *quantized*
`v` (the two factors form a chain). Each stage is one pass of the block with Gram hooks; linears that
receive the same input tensor share one Gram matrix.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..blocks import StreamedModel
from ..dist import progress_bar, together
from ..errors import ConfigError
from ..layout import Layout, is_linear, set_submodule, weight_matrix
from ..modules import LowRankLinear
from ..report import RunReport
from ..specs import build, split_spec
from ..statistics import block_statistics, input_groups
from ..stream import as_blocks, capture
from .gptq import gptq, layer_objective
from .grid import SCALE_DTYPES, dequantize_matrix, rtn
from .layer import QuantLinear

log = logging.getLogger(__name__)

QUANT_METHODS = ("gptq", "rtn")


@dataclass
class QuantConfig:
    """How to quantize: `method` gptq or rtn, `bits`, columns per scale/zero group (`group_size <= 0`: one
    group per row), GPTQ's `act_order` (on by default: with static groups it costs no storage, and on
    SmolLM2 it is what makes GPTQ beat RTN, docs/quantization.md), relative `damp`, `block_size`, the
    scales' storage dtype, and whether GPTQ keeps RTN's codes for a matrix where RTN has the lower
    calibration error."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    scale_dtype: str = "float16"
    rtn_fallback: bool = True

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"quantization method must be one of {QUANT_METHODS}, got {self.method!r}")
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be in [2, 8], got {self.bits}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.damp < 0 or self.block_size < 1:
            raise ConfigError("damp must be >= 0 and block_size >= 1")

    @property
    def needs_data(self) -> bool:
        """GPTQ fits on calibration activations; RTN only rounds the weights."""
        return self.method != "rtn"

    @property
    def name(self) -> str:
        """Short label such as `gptq-4`, `gptq-4-noao` (no act-order) or `rtn-3-g64`."""
        g = "" if self.group_size == 128 else f"-g{self.group_size}"
        ao = "-noao" if self.method == "gptq" and not self.act_order else ""
        return f"{self.method}-{self.bits}{g}{ao}"


def parse_quant(spec: str) -> QuantConfig:
    """A config from a spec such as `gptq`, `gptq:bits=3,group_size=64` or `rtn:bits=4` (see `svdkit.specs`)."""
    method, options = split_spec(spec)
    return build(QuantConfig, method, options, exclude=("method",), method=method)


@dataclass
class QuantMatrixReport:
    """One quantized matrix: full module name, shape, grid, method used, calibration output errors."""

    name: str
    shape: tuple[int, int]
    bits: int
    group_size: int
    method: str  # gptq, rtn, or rtn-fallback (GPTQ ran but RTN's codes had the lower calibration error)
    bytes: int
    rel_error: float | None = None  # ||(W - Q) X|| / ||W X|| on the calibration stream (GPTQ only)
    rtn_rel_error: float | None = None  # the same for RTN's codes on the same statistics
    damp: float | None = None
    seconds: float = 0.0


@dataclass(kw_only=True)
class QuantReport(RunReport):
    """A quantization run: its config, calibration, stored bytes before and after, and every matrix."""

    matrices: list[QuantMatrixReport] = field(default_factory=list)
    bytes_before: dict = field(default_factory=dict)
    bytes_after: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The recipe entry: config, calibration, byte totals and how many matrices each method produced."""
        methods: dict[str, int] = {}
        for m in self.matrices:
            methods[m.method] = methods.get(m.method, 0) + 1
        return {"config": self.config, "calibration": self.calibration, "matrices": len(self.matrices),
                "methods": methods, "bytes_before": self.bytes_before, "bytes_after": self.bytes_after}

    def to_dict(self) -> dict:
        """The JSON-ready report: the summary, the wall time and every matrix."""
        return {**self.summary(), "seconds": self.seconds, "matrices": self.matrix_dicts()}


# --------------------------------------------------------------------------------------------- bytes
def block_linear_names(model: nn.Module) -> set[str]:
    """Full names of the decoder-block linears (float or quantized; a `LowRankLinear`'s two factors)."""
    layout = Layout.of(model)
    return {layout.full(i, n) for i, b in enumerate(layout.blocks(model)) for n, m in b.named_modules()
            if n and (is_linear(m) or isinstance(m, QuantLinear))}


def _saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors `svdkit.save` writes: parameters (tied ones once) and persistent buffers. Works on meta
    tensors too (a streamed model's skeleton), since nothing is read."""
    out = dict(model.named_parameters())  # de-duplicates tied parameters by identity
    for mod_name, mod in model.named_modules():
        for k, b in mod.named_buffers(recurse=False):
            if b is not None and k not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{k}" if mod_name else k] = b
    return out


def stored_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the tensors `svdkit.save` writes: `total`, split into packed `codes`, `scales_zeros` and
    `unquantized` (embeddings, norms, lm_head, biases, float linears); `block_linears` is the part inside
    the decoder blocks' linears (codes, scales, zeros, float weights and biases)."""
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    linears = block_linear_names(model)
    out = {"total": 0, "codes": 0, "scales_zeros": 0, "unquantized": 0, "block_linears": 0}
    for k, t in _saved_tensors(model).items():
        owner, _, leaf = k.rpartition(".")
        b = t.numel() * t.element_size()
        out["total"] += b
        if owner in quant and leaf == "qweight":
            out["codes"] += b
        elif owner in quant and leaf in ("scales", "qzeros"):
            out["scales_zeros"] += b
        else:
            out["unquantized"] += b
        if owner in linears:
            out["block_linears"] += b
    return out


def quant_map(model: nn.Module) -> dict[str, dict]:
    """Full module name -> how each `QuantLinear` was built (what `svdkit.load` needs to rebuild it)."""
    return {
        name: {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
               "group_size": m.group_size, "scale_dtype": str(m.scale_dtype).removeprefix("torch."),
               "bias": m.bias is not None, "method": m.method}
        for name, m in model.named_modules() if isinstance(m, QuantLinear)
    }


# --------------------------------------------------------------------------------------------- quantize
def _float_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The block's linears still in floating point, by dotted name inside the block."""
    return {n: m for n, m in block.named_modules() if n and is_linear(m)}


def _ready(block: nn.Module, pending: dict[str, nn.Module]) -> list[str]:
    """Pending linears whose inputs no pending linear produces: all but the `u` of a `LowRankLinear`
    whose `v` is still in floating point."""
    out = []
    for name in pending:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        if isinstance(parent, LowRankLinear) and child == "u" and is_linear(parent.v):
            continue
        out.append(name)
    return out


def _quantize_one(w: torch.Tensor, h: torch.Tensor | None, config: QuantConfig) -> tuple[tuple, dict]:
    """Codes, scales and zeros of one `out x in` weight (GPTQ when `h` is given, else RTN), plus report fields."""
    sd = SCALE_DTYPES[config.scale_dtype]
    codes, scales, zeros = rtn(w, config.bits, config.group_size, sd)
    if h is None:
        return (codes, scales, zeros), {"method": "rtn"}
    res = gptq(w, h, config.bits, config.group_size, damp=config.damp, block_size=config.block_size,
               act_order=config.act_order, scale_dtype=sd)
    base = layer_objective(w, torch.zeros_like(w), h)
    obj_g = layer_objective(w, res.dequantized, h)
    obj_r = layer_objective(w, dequantize_matrix(codes, scales, zeros, config.group_size, torch.float64), h)
    info = {"rel_error": math.sqrt(obj_g / base) if base > 0 else 0.0,
            "rtn_rel_error": math.sqrt(obj_r / base) if base > 0 else 0.0, "damp": res.damp, "method": "gptq"}
    if config.rtn_fallback and obj_r < obj_g:
        info.update(method="rtn-fallback", rel_error=info["rtn_rel_error"])
        return (codes, scales, zeros), info
    return (res.codes, res.scales, res.zeros), info


def _swap(root: nn.Module, name: str, full: str, mod: nn.Module, h: torch.Tensor | None, config: QuantConfig,
          report: QuantReport) -> None:
    """Quantize linear `name` of `root` (statistics `h` or None) and put a `QuantLinear` in its place."""
    t0 = time.perf_counter()
    w = weight_matrix(mod).detach()
    (codes, scales, zeros), info = _quantize_one(w, h, config)
    bias = mod.bias.detach() if mod.bias is not None else None
    q = QuantLinear.from_codes(codes.to(w.device), scales.to(w.device), zeros.to(w.device), config.bits,
                               config.group_size, bias)
    q.method = info["method"]
    set_submodule(root, name, q)
    report.matrices.append(QuantMatrixReport(name=full, shape=tuple(w.shape), bits=config.bits,
                                             group_size=config.group_size, bytes=q.stored_bytes(),
                                             seconds=time.perf_counter() - t0, **info))


@torch.no_grad()
def quantize_model(
    model: nn.Module | StreamedModel,
    config: QuantConfig,
    calib: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    *,
    batch_size: int = 8,
    calibration_info: dict | None = None,
    activations: str = "auto",
    sink: Callable[[int, nn.Module], None] | None = None,
) -> QuantReport:
    """Quantize every decoder-block linear of `model` (GPTQ needs `calib`, an `(n, seqlen)` LongTensor of token
    ids; RTN ignores it); returns the per-matrix report. An in-memory model changes in place; a
    `StreamedModel`'s blocks go to `sink(i, block)` one at a time, as `compress` does."""
    start = time.perf_counter()
    blocks = as_blocks(model, device)
    layout = blocks.layout
    report = QuantReport(config=asdict(config), calibration={}, bytes_before=stored_bytes(blocks.model))
    if config.needs_data and (not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long):
        raise ConfigError("GPTQ needs calib, a (n, seqlen) LongTensor of token ids; see svdkit.calibration")
    x = None
    if config.needs_data:
        report.calibration = {"windows": calib.shape[0], "seqlen": calib.shape[1], **(calibration_info or {})}
        x = capture(blocks, calib, batch_size, activations)
    for i in progress_bar(range(len(blocks)), desc=f"quantize ({config.name})", unit="block", disable=not progress):
        with blocks.on_device(i) as block:
            if x is None:
                for name, mod in _float_linears(block).items():
                    _swap(block, name, layout.full(i, name), mod, None, config, report)
            else:
                while pending := _float_linears(block):
                    ready = _ready(block, pending)
                    shared = input_groups(block, x.batch(0), x.extra)
                    reps: dict[str, str] = {}
                    groups = {n: reps.setdefault(shared[n], n) for n in ready}
                    stats, _ = block_statistics(block, groups, x, None, "original", frozenset())
                    for name in ready:
                        _swap(block, name, layout.full(i, name), pending[name], stats[groups[name]].gram, config,
                              report)
                x = x.run(block)
            with together(f"writing block {i}"):
                if sink is not None:
                    sink(i, block)
    report.bytes_after = stored_bytes(blocks.model)
    report.seconds = time.perf_counter() - start
    fallbacks = sum(m.method == "rtn-fallback" for m in report.matrices)
    log.info("%s: %d matrices quantized, stored bytes %d -> %d (%.1f s)%s", config.name, len(report.matrices),
             report.bytes_before["total"], report.bytes_after["total"], report.seconds,
             f"; {fallbacks} kept RTN's codes" if fallbacks else "")
    return report


def set_dequant_cache(model: nn.Module, enabled: bool = True) -> int:
    """Turn the dequantized-weight cache of every `QuantLinear` on or off; returns how many were set."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache, m._cached = enabled, None
            n += 1
    return n
