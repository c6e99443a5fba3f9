"""Global per-matrix ranks for the uniform ratio's exact parameter budget, driven by each matrix's estimated
effect on the final loss (the method's `loss_spectrum`: K-FAC's curvature-whitened spectrum).

Matrix `l` (`m_l x n_l`) at rank `k` stores `k (m_l + n_l)` numbers; keeping its `i`-th singular direction
is worth `gain_l[i]` (e.g. `sigma_i^2` of `L_G^T W L_H`: the loss that dropping it would cost, in units shared
by every matrix). With non-increasing gains, adding one rank at a time to the matrix whose next rank is worth
most per parameter solves the budgeted problem up to the last rank. The greedy is pure; the plan gets the
spectra through the profiler's passes.
"""

from __future__ import annotations

import heapq
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import LABELS, Allocation, Plan, PlanContext
from .budget import rank_for_ratio

log = logging.getLogger(__name__)



def max_saving_rank(m: int, n: int) -> int:
    """The largest rank whose factor pair is still smaller than the dense `m x n` matrix."""
    return (m * n - 1) // (m + n)


def allocate(
    gains: Mapping[str, torch.Tensor],
    costs: Mapping[str, int],
    budget: int,
    min_ranks: Mapping[str, int],
    max_ranks: Mapping[str, int],
) -> dict[str, int]:
    """Ranks maximising `sum_l sum_{i < k_l} gains[l][i]` with `sum_l k_l costs[l] <= budget` and
    `min_ranks <= k <= max_ranks`; the unused budget is smaller than the cost of any rank still addable."""
    keys = list(gains)
    if set(keys) != set(costs) or set(keys) != set(min_ranks) or set(keys) != set(max_ranks):
        raise ConfigError("gains, costs, min_ranks and max_ranks must name the same matrices")
    ranks = {k: int(min_ranks[k]) for k in keys}
    for k in keys:
        if not 0 <= ranks[k] <= max_ranks[k] or max_ranks[k] > gains[k].numel():
            raise ConfigError(f"{k}: need 0 <= min_rank {ranks[k]} <= max_rank {max_ranks[k]} <= {gains[k].numel()}")
        if costs[k] <= 0:
            raise ConfigError(f"{k}: the cost of one rank must be positive, got {costs[k]}")
    spent = sum(ranks[k] * costs[k] for k in keys)
    if spent > budget:
        raise ConfigError(f"the minimum ranks already need {spent:,} parameters, more than the budget {budget:,}")
    g = {k: gains[k].double().cpu().tolist() for k in keys}
    heap = [(-g[k][ranks[k]] / costs[k], i, k) for i, k in enumerate(keys) if ranks[k] < max_ranks[k]]
    heapq.heapify(heap)
    while heap:
        _, i, k = heapq.heappop(heap)
        if spent + costs[k] > budget:
            continue  # never fits again: the budget left only shrinks
        ranks[k] += 1
        spent += costs[k]
        if ranks[k] < max_ranks[k]:
            heapq.heappush(heap, (-g[k][ranks[k]] / costs[k], i, k))
    return ranks


def ratio_for_rank(m: int, n: int, rank: int) -> float:
    """The per-matrix ratio whose `rank_for_ratio` is exactly `rank` (checked)."""
    ratio = 1.0 - rank * (m + n) / (m * n)
    if not 0.0 <= ratio < 1.0 or rank_for_ratio(m, n, ratio) != rank:
        raise ConfigError(f"rank {rank} of a {m} x {n} matrix has no exact ratio")
    return ratio


def uniform_budget(shapes: Mapping[str, tuple[int, int]], ratio: float) -> int:
    """Parameters the uniform ratio keeps: `sum_l rank_for_ratio(m_l, n_l, R) (m_l + n_l)`."""
    return sum(rank_for_ratio(m, n, ratio) * (m + n) for m, n in shapes.values())


def min_ranks_for(shapes: Mapping[str, tuple[int, int]], ratio: float, fraction: float) -> dict[str, int]:
    """A floor for every matrix: `fraction` of its uniform rank, at least 1."""
    return {k: max(1, int(math.floor(fraction * rank_for_ratio(m, n, ratio)))) for k, (m, n) in shapes.items()}


@dataclass(frozen=True)
class GlobalRanks(Allocation):
    """Per-matrix ranks from `allocate` on the method's loss spectra (`method.loss_spectrum(w, stats)`, with
    `stats.out_gram` set from `grad_samples` calibration windows and `labels`), for the uniform ratio's budget,
    never below `min_rank` times the uniform rank nor above the largest rank that still saves memory."""

    min_rank: float = 0.25
    grad_samples: int | None = 32
    labels: str = "data"
    windows: int | None = None  # deprecated name of `grad_samples`
    name = "global"

    def __post_init__(self) -> None:
        if self.windows is not None:
            message = f"option windows={self.windows} is deprecated: use grad_samples={self.windows}"
            warnings.warn(message, DeprecationWarning, stacklevel=3)
            log.warning(message)
            object.__setattr__(self, "grad_samples", self.windows)
            object.__setattr__(self, "windows", None)
        if not 0.0 <= self.min_rank <= 1.0:
            raise ConfigError(f"min_rank must be in [0, 1] (a fraction of the uniform rank), got {self.min_rank}")
        if self.grad_samples is not None and self.grad_samples < 1:
            raise ConfigError(f"grad_samples must be >= 1 or None (all), got {self.grad_samples}")
        if self.labels not in LABELS:
            raise ConfigError(f"labels must be one of {LABELS}, got {self.labels!r}")

    def plan(self, ctx: PlanContext) -> Plan:
        spectrum = getattr(ctx.method, "loss_spectrum", None)
        if spectrum is None:
            raise ConfigError(f"global ranks need a method with a loss spectrum (kfac), not {ctx.method.name}")
        shapes = ctx.layout.matrices()
        gains: dict[str, torch.Tensor] = {}

        def gain(i: int, name: str, w: torch.Tensor, stats) -> None:
            s = spectrum(w, stats).double().cpu()  # stats.out_gram: the matrix's output-gradient Gram
            gains[ctx.layout.full(i, name)] = torch.cat([s, s.new_zeros(min(w.shape) - s.numel())])  # dropped: 0

        grams = ctx.profiler.output_grams(self.grad_samples, self.labels)
        ctx.profiler.matrix_pass(gain, "global profile", grams=grams)
        budget = uniform_budget(shapes, ctx.ratio)
        ranks = allocate(gains, {k: m + n for k, (m, n) in shapes.items()}, budget,
                         min_ranks_for(shapes, ctx.ratio, self.min_rank),
                         {k: max_saving_rank(m, n) for k, (m, n) in shapes.items()})
        uniform = {k: rank_for_ratio(m, n, ctx.ratio) for k, (m, n) in shapes.items()}

        def estimate(r: dict[str, int]) -> float:
            return sum(float(gains[k][r[k]:].sum()) for k in gains)

        kept = sum(ranks[k] * (m + n) for k, (m, n) in shapes.items())
        log.info("global ranks: %d of %d budget parameters; loss estimate %.4g (uniform ranks: %.4g)",
                 kept, budget, estimate(ranks), estimate(uniform))
        return Plan({k: ratio_for_rank(m, n, ranks[k]) for k, (m, n) in shapes.items()},
                    {"global_ranks": ranks, "global_budget": budget, "global_kept": kept,
                     "global_loss_estimate": estimate(ranks), "uniform_loss_estimate": estimate(uniform)})
