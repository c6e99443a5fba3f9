"""Bit-packing of integer codes into a uint8 stream: `ceil(n * bits / 8)` bytes for `n` codes of `bits` bits.

Code `i` occupies bits `[i * bits, (i + 1) * bits)` of the stream, least significant bit first (so for
4 bits, byte `j` holds code `2j` in its low nibble and `2j + 1` in its high nibble). Widths that divide 8
take a shift-and-or fast path; any other width (3, 5, 6, 7) goes through an explicit bit array.
"""

from __future__ import annotations

import math

import torch


def packed_size(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits take: `ceil(n * bits / 8)`."""
    return math.ceil(n * bits / 8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten `codes` (integers in `[0, 2^bits)`) row-major and pack them into a 1-D uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int32)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to be packed in {bits} bits")
    if 8 % bits == 0:
        per = 8 // bits
        flat = torch.nn.functional.pad(flat, (0, (-n) % per))
        shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * bits
        return (flat.view(-1, per) << shifts).sum(1).to(torch.uint8)
    weights = torch.arange(bits, dtype=torch.int32, device=flat.device)
    stream = ((flat.unsqueeze(1) >> weights) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    return (stream.view(-1, 8) << torch.arange(8, dtype=torch.int32, device=flat.device)).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` codes of a stream written by `pack`, as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.numel() != packed_size(n, bits):
        raise ValueError(f"{n} codes of {bits} bits take {packed_size(n, bits)} bytes, got {packed.numel()}")
    p = packed.reshape(-1).to(torch.int32)
    mask = 2**bits - 1
    if 8 % bits == 0:
        shifts = torch.arange(8 // bits, dtype=torch.int32, device=p.device) * bits
        return ((p.unsqueeze(1) >> shifts) & mask).reshape(-1)[:n].to(torch.uint8)
    stream = ((p.unsqueeze(1) >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1).reshape(-1)
    bitvals = stream[: n * bits].view(n, bits) << torch.arange(bits, dtype=torch.int32, device=p.device)
    return bitvals.sum(1).to(torch.uint8)
