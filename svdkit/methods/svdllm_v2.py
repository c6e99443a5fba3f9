"""SVD-LLM V2: eigen-based whitening and heterogeneous per-type ratios (`svdkit.allocation.v2`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..allocation import V2, Allocation
from .svdllm import SVDLLM


@dataclass
class SVDLLMV2(SVDLLM):
    """Whitening through `H = Q L Q^T` (pseudo-inverse), ratios spread by theoretical truncation loss."""

    whitening: str = "eigen"
    name = "svdllm-v2"

    @property
    def allocation(self) -> Allocation:
        return V2()
