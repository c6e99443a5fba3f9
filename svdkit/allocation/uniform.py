"""The uniform allocation: every decoder-block linear at the overall ratio."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Allocation, Plan, PlanContext


@dataclass(frozen=True)
class Uniform(Allocation):
    """Every matrix removes the same fraction of its parameters."""

    name = "uniform"
    needs_data = False

    def plan(self, ctx: PlanContext) -> Plan:
        return Plan({full: ctx.ratio for full in ctx.layout.matrices()})
