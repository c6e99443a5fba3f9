"""How many parameters each matrix keeps: ratio -> rank, budget re-balancing, SVD-LLM V2 groups.

A ratio `R` is the fraction of a matrix's parameters removed; a rank-k pair stores `k (m + n)` numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

RATIO_MAX = 0.99  # per-matrix ratios are clipped to [0, RATIO_MAX] by the allocators


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """`floor((1 - R) m n / (m + n))`: the rank whose factor pair removes at least `R` of `m n`."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
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
        raise ValueError(f"target ratio {target} is outside the feasible range [{lo}, {hi}]")
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


def svdllm_v2_ratios(losses: Mapping[str, Mapping[str, float]], ratio: float) -> dict[str, float]:
    """SVD-LLM V2: inside each group of same-type matrices, `R_i = |G| R l_i / sum_j l_j`, `l_i = 1/log L_i`.

    `losses[type][key]` is the theoretical truncation loss of matrix `key` at the global ratio. The
    formula needs every `L_i > 1`; when some are not, all losses of the group are scaled by one constant
    so the smallest is `e` (ordering kept). Ratios are then clipped and the group's mean kept at `R`.
    """
    out: dict[str, float] = {}
    for _type, group in losses.items():
        keys = list(group)
        vals = [max(group[k], 1e-300) for k in keys]
        if min(vals) <= 1.0:
            vals = [v * math.e / min(vals) for v in vals]
        inv = [1.0 / math.log(v) for v in vals]
        raw = [len(keys) * ratio * li / sum(inv) for li in inv]
        for key, r in zip(keys, rebalance(raw, [1.0] * len(keys), ratio), strict=True):
            out[key] = r
    return out


def adacr_ratios(importance: Sequence[float], ratio: float, mrr: float | None = None) -> list[float]:
    """AdaSVD's adaCR: retention `CR_i = mrr + I_n,i (trr - mrr)` with `I_n` the importance over its mean
    and `trr = 1 - R`; per-block ratios `1 - CR_i`, clipped to [0, RATIO_MAX] with the mean kept at R.

    `mrr=None` uses `trr - 0.1`, which reproduces the paper's best settings (0.5 at R=0.4, 0.4 at 0.5,
    0.3 at 0.6).
    """
    trr = 1.0 - ratio
    mrr = max(trr - 0.1, 0.0) if mrr is None else mrr
    mean = sum(importance) / len(importance)
    if not mean > 0:
        raise ValueError("layer importances must have a positive mean")
    raw = [1.0 - (mrr + (i / mean) * (trr - mrr)) for i in importance]
    return rebalance(raw, [1.0] * len(raw), ratio)


def plc_ratios(n_blocks: int, ratio: float, k: int, beta: float = 0.0) -> list[float]:
    """ResSVD's partial-layer compression: the last `k` blocks at `R_l = N R / k`, the others dense."""
    r_l = n_blocks * ratio / k
    if not 0 < k <= n_blocks or r_l > 1.0 - beta or r_l >= 1.0:
        raise ValueError(f"cannot compress only the last {k} of {n_blocks} blocks at overall ratio {ratio}: "
                         f"their ratio {r_l:.3f} would exceed 1 - beta = {1.0 - beta:.3f}")
    return [0.0] * (n_blocks - k) + [r_l] * k


def plc_candidates(n_blocks: int, ratio: float, beta: float = 0.0) -> list[int]:
    """Every `k` for which `R_l = N R / k <= 1 - beta` (and `< 1`); an error when there is none."""
    ks = [k for k in range(1, n_blocks + 1) if n_blocks * ratio / k <= 1.0 - beta and n_blocks * ratio / k < 1.0]
    if not ks or ratio <= 0:
        raise ValueError(f"partial-layer compression is infeasible at ratio {ratio} with beta {beta}: even "
                         f"all {n_blocks} blocks would need ratio {ratio:.3f} > 1 - beta")
    return ks
