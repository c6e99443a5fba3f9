"""What every method shares: the statistics it receives, the factors it returns, its config base class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

PROPAGATIONS = ("original", "sequential")


@dataclass
class LayerStats:
    """Calibration statistics of one matrix's input, gathered by the engine (all float64).

    `gram` is `X X^T` on the stream the method whitens with; `gram_c` and `cross` (`X' X^T`, compressed
    stream times original stream) exist for methods that correct for already-compressed earlier blocks.
    """

    gram: torch.Tensor
    tokens: int
    abs_mean: torch.Tensor | None = None
    gram_c: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    row_importance: torch.Tensor | None = None  # FWSVD: sum_j (dL/dW_ij)^2 per output row


@dataclass
class Factors:
    """`W ~= w_u @ w_v` (float64), with method-specific facts for the report (e.g. `sigma_tail`)."""

    w_u: torch.Tensor
    w_v: torch.Tensor
    info: dict = field(default_factory=dict)


@dataclass
class Method:
    """Base config: `ratio` is the fraction of each compressed matrix's parameters removed."""

    ratio: float = 0.2
    propagation: str = "original"

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # extra statistics: "gram_c", "cross", "fisher"
    allocation: ClassVar[str] = "uniform"
    needs_data: ClassVar[bool] = True  # False: factorize() ignores the statistics (compress accepts calib=None)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1) (fraction of parameters removed), got {self.ratio}")
        if self.propagation not in PROPAGATIONS:
            raise ValueError(f"propagation must be one of {PROPAGATIONS}, got {self.propagation!r}")

    def factorize(self, w: torch.Tensor, stats: LayerStats, rank: int) -> Factors:
        """Rank-`rank` factors of the `m x n` float64 weight `w` given its input statistics."""
        raise NotImplementedError
