"""`QuantLinear`: a linear layer whose weight is stored as packed integer codes with per-group scales and
zero points; the forward dequantizes and multiplies.

State-dict keys are plain tensors (safetensors stores them, no pickles): `qweight` (uint8, the codes of
the row-major `out x in` weight packed by `packing.pack`), `scales` (`out x groups`, float16 or float32),
`qzeros` (uint8, the integer zero points packed the same way) and an optional `bias` parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from .grid import SCALE_DTYPES, dequantize_matrix, num_groups
from .packing import pack, packed_size, unpack

_INT_VIEW = {torch.float16: torch.int16, torch.float32: torch.int32}


def quantized_matrix_bytes(rows: int, cols: int, bits: int, group_size: int, scale_bytes: int = 2) -> int:
    """Stored bytes of one quantized `rows x cols` matrix: packed codes, scales and packed zero points,
    `ceil(rows cols bits / 8) + rows groups scale_bytes + ceil(rows groups bits / 8)`."""
    groups = num_groups(cols, group_size)
    return packed_size(rows * cols, bits) + rows * groups * scale_bytes + packed_size(rows * groups, bits)


class QuantLinear(nn.Module):
    """Drop-in for `nn.Linear(in_features, out_features)` with a `bits`-bit, group-wise quantized weight.

    `cache=True` keeps the dequantized weight between calls (same numbers, faster repeated forwards,
    full-precision memory); the default recomputes it every call, so the module holds only packed bytes.
    """

    is_quantized = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = 128,
        bias: bool = False,
        scale_dtype: torch.dtype | str = torch.float16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cache: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(scale_dtype, str):
            scale_dtype = SCALE_DTYPES[scale_dtype]
        if scale_dtype not in _INT_VIEW:
            raise ValueError(f"scale_dtype must be float16 or float32, got {scale_dtype}")
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.scale_dtype = bits, group_size, scale_dtype
        groups = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(packed_size(out_features * in_features, bits), dtype=torch.uint8,
                                                     device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("qzeros", torch.zeros(packed_size(out_features * groups, bits), dtype=torch.uint8,
                                                   device=device))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
                                if bias else None)
        self.cache = cache
        self.method = ""  # how the codes were found (gptq, rtn, ...): metadata recorded by svdkit.save
        self._cached: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Build from `codes` (`out x in`, ints in `[0, 2^bits)`), `scales` and `zeros` (`out x groups`)."""
        out_features, in_features = codes.shape
        if scales.shape != (out_features, num_groups(in_features, group_size)) or zeros.shape != scales.shape:
            raise ValueError(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not fit codes "
                             f"{tuple(codes.shape)} with group size {group_size}")
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None, scale_dtype=scales.dtype,
                    device="meta")
        layer.qweight = pack(codes, bits)
        layer.scales = scales.detach().clone().contiguous()
        layer.qzeros = pack(zeros, bits)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone().contiguous())
        return layer.to(codes.device)

    # ------------------------------------------------------------------------------------------- storage
    def codes(self) -> torch.Tensor:
        """The unpacked `out x in` integer codes (uint8)."""
        n = self.out_features * self.in_features
        return unpack(self.qweight, self.bits, n).view(self.out_features, self.in_features)

    def zeros(self) -> torch.Tensor:
        """The unpacked `out x groups` integer zero points (uint8)."""
        return unpack(self.qzeros, self.bits, self.scales.numel()).view(self.scales.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The `out x in` weight the codes stand for, `scale * (code - zero)` per group, in `dtype`."""
        return dequantize_matrix(self.codes(), self.scales, self.zeros(), self.group_size, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the bias's dtype (float32 without bias), for inspection and dense export."""
        return self.dequantize(self.bias.dtype if self.bias is not None else torch.float32)

    def stored_bytes(self) -> int:
        """Bytes of the quantized weight as stored (codes, scales, zeros; the bias is not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.qzeros))

    def _apply(self, fn, recurse: bool = True):
        """Move/cast like any module, but keep the scales' storage dtype: `model.to(bfloat16)` must not
        round float16 scales (they travel as same-size integers through the conversion)."""
        dt = self._buffers["scales"].dtype
        self._buffers["scales"] = self._buffers["scales"].view(_INT_VIEW[dt])
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers["scales"] = self._buffers["scales"].view(dt)
            self._cached = None

    # ------------------------------------------------------------------------------------------- compute
    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cache:
            self._cached = None
            return self.dequantize(x.dtype)
        key = (x.dtype, x.device, *(t._version for t in (self.qweight, self.scales, self.qzeros)),
               *(t.data_ptr() for t in (self.qweight, self.scales, self.qzeros)))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.dequantize(x.dtype))
        return self._cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, self._weight_for(x), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, scale_dtype={str(self.scale_dtype).removeprefix('torch.')}, "
                f"bias={self.bias is not None}")
