"""AdaSVD's adaCR: one ratio per decoder block from the block's importance (how much it changes its
hidden states), with the mean kept at the overall ratio."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..linalg import NumericalError
from .base import Allocation, Plan, PlanContext, per_block
from .budget import rebalance

IMPORTANCES = ("1-cos", "cos")


def adacr_ratios(importance: Sequence[float], ratio: float, mrr: float | None = None) -> list[float]:
    """AdaSVD's adaCR: retention `CR_i = mrr + I_n,i (trr - mrr)` with `I_n` the importance over its mean
    and `trr = 1 - R`; per-block ratios `1 - CR_i`, clipped to [0, RATIO_MAX] with the mean kept at R.

    `mrr=None` uses `trr - 0.1`, which reproduces the paper's best settings (0.5 at R=0.4, 0.4 at 0.5,
    0.3 at 0.6).
    """
    trr = 1.0 - ratio
    mrr = max(trr - 0.1, 0.0) if mrr is None else mrr
    bad = [i for i, v in enumerate(importance) if not math.isfinite(v)]
    if bad:
        raise NumericalError(f"block importance is not finite for blocks {bad[:5]}: the calibration activations "
                             f"overflow or hold NaN there")
    mean = sum(importance) / len(importance)
    if not mean > 0:
        raise ConfigError("layer importances must have a positive mean")
    raw = [1.0 - (mrr + (i / mean) * (trr - mrr)) for i in importance]
    return rebalance(raw, [1.0] * len(raw), ratio)


@dataclass(frozen=True)
class AdaCR(Allocation):
    """Block importance `1 - cos(x_in, x_out)` (ShortGPT's block influence; the paper's profile only fits this)
    or the paper's literal `cos`, then `adacr_ratios`."""

    importance: str = "1-cos"
    mrr: float | None = None
    name = "adacr"

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance must be one of {IMPORTANCES}, got {self.importance!r}")

    def plan(self, ctx: PlanContext) -> Plan:
        cos = ctx.profiler.block_similarity()
        importance = [1.0 - c for c in cos] if self.importance == "1-cos" else list(cos)
        block_ratios = adacr_ratios(importance, ctx.ratio, self.mrr)
        return Plan(per_block(ctx.layout, block_ratios), {"importance": importance, "block_ratios": block_ratios})
