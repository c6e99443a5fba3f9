"""The quantization grid: asymmetric per-group scale and zero point, round-to-nearest, dequantization.

Pure tensor math, no model code. A weight `W` is `rows x cols`; every run of `group_size` consecutive
columns of one row shares a scale `s` and an integer zero point `z`; a code `q` in `[0, 2^bits - 1]`
stands for `s * (q - z)`. Scales are rounded *up* to their storage dtype, so the stored grid still spans
the group's range and round-to-nearest keeps every element within `s / 2` of the original.
"""

from __future__ import annotations

import math

import torch

from ..linalg import NumericalError

SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}


def num_groups(cols: int, group_size: int) -> int:
    """How many groups a row of `cols` columns has (`group_size <= 0`: one group per row)."""
    return 1 if group_size <= 0 else math.ceil(cols / group_size)


def group_index(cols: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The group of every column, `(cols,)` long: `j // group_size` (all zeros for one group per row)."""
    j = torch.arange(cols, device=device)
    return torch.zeros_like(j) if group_size <= 0 else j // group_size


def round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` cast to `dtype`, rounded towards +inf (never below `x`), so a stored scale never shrinks the grid."""
    y = x.to(dtype)
    low = y.to(x.dtype) < x
    if low.any():
        y = torch.where(low, torch.nextafter(y, torch.full_like(y, math.inf)), y)
    return y


def find_params(w: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float16
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric grid of one group `w` (`rows x g`): `(scale in scale_dtype, zero as uint8)`.

    The range always contains 0 (GPTQ's convention); an all-zero row gets scale 1, zero 0.
    """
    maxq = 2**bits - 1
    w = w.double()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    stored = round_up_to(scale, scale_dtype)
    if not torch.isfinite(stored).all():
        raise NumericalError(f"a group's scale does not fit {scale_dtype} (max |w| {float(w.abs().max()):.3g}); "
                             "use scale_dtype='float32'")
    zero = torch.round(-xmin / stored.double()).clamp(0, maxq)
    return stored, zero.to(torch.uint8)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes `clamp(round(w / s) + z, 0, 2^bits - 1)` (uint8); `scale` and `zero` broadcast against `w`."""
    q = torch.round(w.double() / scale.double()) + zero.double()
    return q.clamp(0, 2**bits - 1).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """Values `s * (q - z)` in `dtype`; exact in float32 for fp16 scales (11-bit mantissa times <= 8-bit ints)."""
    return (q.to(dtype) - zero.to(dtype)) * scale.to(dtype)


def grid_params(w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros of every group of `w` (`rows x cols`): two `rows x groups` tensors."""
    cols = w.shape[1]
    gs = cols if group_size <= 0 else group_size
    pairs = [find_params(w[:, g : g + gs], bits, scale_dtype) for g in range(0, cols, gs)]
    return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)


def rtn(w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of `w` (`rows x cols`) on its per-group grid: `(codes, scales, zeros)`."""
    scales, zeros = grid_params(w, bits, group_size, scale_dtype)
    g = group_index(w.shape[1], group_size, w.device)
    return quantize(w, scales[:, g], zeros[:, g], bits), scales, zeros


def dequantize_matrix(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The `rows x cols` matrix that codes, per-group scales and zeros stand for."""
    g = group_index(codes.shape[1], group_size, codes.device)
    return dequantize(codes, scales[:, g], zeros[:, g], dtype)
