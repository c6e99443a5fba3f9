"""ResSVD's partial-layer compression: compress only the last `k` blocks, at `R_l = N R / k`, with `k`
given or chosen by the error of the final hidden states on calibration windows."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import ConfigError
from .base import Allocation, Plan, PlanContext, per_block

log = logging.getLogger(__name__)


def plc_ratios(n_blocks: int, ratio: float, k: int, beta: float = 0.0) -> list[float]:
    """ResSVD's partial-layer compression: the last `k` blocks at `R_l = N R / k`, the others dense."""
    r_l = n_blocks * ratio / k
    if not 0 < k <= n_blocks or r_l > 1.0 - beta or r_l >= 1.0:
        raise ConfigError(f"cannot compress only the last {k} of {n_blocks} blocks at overall ratio {ratio}: "
                         f"their ratio {r_l:.3f} would exceed 1 - beta = {1.0 - beta:.3f}")
    return [0.0] * (n_blocks - k) + [r_l] * k


def plc_candidates(n_blocks: int, ratio: float, beta: float = 0.0) -> list[int]:
    """Every `k` for which `R_l = N R / k <= 1 - beta` (and `< 1`); an error when there is none."""
    ks = [k for k in range(1, n_blocks + 1) if n_blocks * ratio / k <= 1.0 - beta and n_blocks * ratio / k < 1.0]
    if not ks or ratio <= 0:
        raise ConfigError(f"partial-layer compression is infeasible at ratio {ratio} with beta {beta}: even "
                         f"all {n_blocks} blocks would need ratio {ratio:.3f} > 1 - beta")
    return ks


@dataclass(frozen=True)
class PLC(Allocation):
    """`k=None` searches every feasible `k` on `score_windows` calibration windows; `beta` is the share of
    the rank ResSVD's residual stage takes (it bounds the feasible ratio)."""

    k: int | None = None
    beta: float = 0.0
    score_windows: int = 8
    name = "plc"

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if self.score_windows < 1:
            raise ConfigError(f"score_windows must be >= 1, got {self.score_windows}")

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return self.k is None

    def plan(self, ctx: PlanContext) -> Plan:
        n = ctx.layout.n_blocks
        k, scores = self.k, {}
        if k is None:
            ks = plc_candidates(n, ctx.ratio, self.beta)
            scores = ctx.profiler.partial_scores(ks, lambda k: plc_ratios(n, ctx.ratio, k, self.beta),
                                                 self.score_windows)
            k = min(scores, key=scores.get)
            log.info("PLC: compressing the last %d of %d blocks (final hidden-state error %.4f)", k, n, scores[k])
        block_ratios = plc_ratios(n, ctx.ratio, k, self.beta)
        return Plan(per_block(ctx.layout, block_ratios), {"plc_k": k, "plc_scores": scores,
                                                          "block_ratios": block_ratios})
