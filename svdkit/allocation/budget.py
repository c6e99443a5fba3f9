"""The parameter budget: ratio -> rank, whether a factor pair saves memory, re-balancing clipped ratios.

A ratio `R` is the fraction of a matrix's parameters removed; a rank-k pair stores `k (m + n)` numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError

RATIO_MAX = 0.99  # per-matrix ratios are clipped to [0, RATIO_MAX] by the allocators


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """`floor((1 - R) m n / (m + n))`: the rank whose factor pair removes at least `R` of `m n`."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio must be in [0, 1), got {ratio}")
    return int(math.floor((1.0 - ratio) * m * n / (m + n) + 1e-9))


def saves_memory(m: int, n: int, rank: int) -> bool:
    """True when a rank-`rank` pair is smaller than the dense matrix (and has rank >= 1)."""
    return 1 <= rank and rank * (m + n) < m * n


def rebalance(
    ratios: Sequence[float], weights: Sequence[float], target: float, lo: float = 0.0, hi: float = RATIO_MAX
) -> list[float]:
    """Shift all ratios by one constant and clip to [lo, hi] so the weighted mean equals `target`.

    The weighted mean of `clip(r + t)` is monotone in `t`, so bisection finds the shift; used after any
    allocator whose raw ratios leave the feasible range.
    """
    if not lo <= target <= hi:
        raise ConfigError(f"target ratio {target} is outside the feasible range [{lo}, {hi}]")
    total = float(sum(weights))

    def mean(t: float) -> float:
        return sum(w * min(max(r + t, lo), hi) for r, w in zip(ratios, weights, strict=True)) / total

    a, b = lo - max(ratios) - 1.0, hi - min(ratios) + 1.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean(mid) < target:
            a = mid
        else:
            b = mid
    t = 0.5 * (a + b)
    return [min(max(r + t, lo), hi) for r in ratios]
