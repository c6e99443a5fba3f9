"""Weight quantization after (or instead of) low-rank factorization: GPTQ and round-to-nearest on a
per-group asymmetric grid, the packed `QuantLinear`, and stored-byte accounting."""

from .gptq import GPTQResult, gptq, layer_objective
from .grid import dequantize_matrix, rtn
from .layer import QuantLinear, quantized_matrix_bytes
from .packing import pack, packed_size, unpack
from .quantize import (
    QuantConfig,
    QuantMatrixReport,
    QuantReport,
    parse_quant,
    quant_map,
    quantize_model,
    set_dequant_cache,
    stored_bytes,
)

__all__ = [
    "GPTQResult",
    "QuantConfig",
    "QuantLinear",
    "QuantMatrixReport",
    "QuantReport",
    "dequantize_matrix",
    "gptq",
    "layer_objective",
    "pack",
    "packed_size",
    "parse_quant",
    "quant_map",
    "quantize_model",
    "quantized_matrix_bytes",
    "rtn",
    "set_dequant_cache",
    "stored_bytes",
    "unpack",
]
