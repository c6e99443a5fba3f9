"""SVD-LLM V2's heterogeneous ratios: inside each group of same-type matrices (q of all blocks, ...), ratios
follow each matrix's theoretical truncation loss at the overall ratio."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .base import Allocation, Plan, PlanContext
from .budget import rank_for_ratio, rebalance


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


@dataclass(frozen=True)
class V2(Allocation):
    """Ratios from the whitened truncation loss `L_i = sqrt(sum_{j>k} s_j^2)` of each matrix (the method's own
    whitened spectrum, `method.spectrum(w, stats)`), spread inside each type group."""

    name = "v2"

    def plan(self, ctx: PlanContext) -> Plan:
        losses: dict[str, dict[str, float]] = {}

        def loss(i: int, name: str, w, stats) -> None:
            s = ctx.method.spectrum(w, stats, 0).s  # the singular values only
            k = rank_for_ratio(*w.shape, ctx.ratio)
            losses.setdefault(name, {})[ctx.layout.full(i, name)] = math.sqrt(float((s[k:] ** 2).sum()))

        ctx.profiler.matrix_pass(loss, "v2 profile")
        return Plan(svdllm_v2_ratios(losses, ctx.ratio), {"truncation_losses": {
            full: value for group in losses.values() for full, value in group.items()}})
