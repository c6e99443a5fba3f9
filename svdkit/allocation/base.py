"""The interface every allocation implements: a spec dataclass a method declares, whose `plan` turns the
overall ratio into one ratio per matrix, using calibration passes only through the `Profiler` it is given.

Allocations never import the engine: `compress` hands them a `Profiler` (see `svdkit.profiler`) that runs
the forward passes, so the pure formulas and the plumbing stay in separate layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from ..layout import Layout

LABELS = ("data", "model")  # next-token labels of a gradient pass: the text's (empirical Fisher) or model-drawn

MatrixFn = Callable[[int, str, torch.Tensor, object], None]


class Profiler(Protocol):
    """The calibration passes an allocation may ask for (implemented by `svdkit.profiler.Profiler`)."""

    def matrix_pass(self, fn: MatrixFn, desc: str, grams: object = None) -> None:
        """Call `fn(block, name, W (float64), stats)` for every decoder-block linear, on the original stream; with
        `grams` (from `output_grams`), `stats.out_gram` holds the matrix's output-gradient Gram."""

    def block_similarity(self) -> list[float]:
        """Per block, the mean over calibration tokens of `cos(x_in, x_out)` of its hidden states."""

    def partial_scores(self, ks: Sequence[int], ratios_for: Callable[[int], list[float]],
                       windows: int) -> dict[int, float]:
        """For each `k`, the relative error of the final hidden states on the first `windows` calibration windows
        when blocks are compressed at the per-block ratios `ratios_for(k)` (whitened truncation)."""

    def output_grams(self, grad_samples: int | None, labels: str) -> object:
        """K-FAC's `G = sum_t g_t g_t^T` of the loss gradients at each matrix's output, on the first `grad_samples`
        calibration windows (None: all), with `data` or `model`-drawn labels (`svdkit.output_grams.OutputGrams`:
        handed block by block to a walk, see `matrix_pass`)."""


@dataclass
class PlanContext:
    """What a plan may use: the model's layout, the overall ratio, the method (for its own spectrum) and the
    calibration passes."""

    layout: Layout
    ratio: float
    method: object
    profiler: Profiler


@dataclass
class Plan:
    """One ratio per matrix (full module name -> fraction removed) and what the report should say about it."""

    ratios: dict[str, float]
    extra: dict = field(default_factory=dict)


class Allocation:
    """Base of the allocation specs: `plan(ctx)` returns the per-matrix ratios."""

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True  # False: the plan runs no calibration pass

    def plan(self, ctx: PlanContext) -> Plan:
        raise NotImplementedError


def per_block(layout: Layout, block_ratios: Sequence[float]) -> dict[str, float]:
    """One ratio per block, spread over every linear of that block."""
    return {layout.full(i, name): block_ratios[i] for i, block in enumerate(layout.linears) for name in block}
