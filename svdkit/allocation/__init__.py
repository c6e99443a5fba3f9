"""How many parameters each matrix keeps. `budget` holds the ratio/rank arithmetic; each allocation is a
small module with a spec dataclass (what a method declares) whose `plan` gives one ratio per matrix:
`uniform`, `v2` (SVD-LLM V2), `adacr` (AdaSVD), `plc` (ResSVD), `global` (per-matrix ranks from loss spectra,
K-FAC). `ALLOCATIONS` maps their names to them."""

from .adacr import AdaCR, adacr_ratios
from .base import LABELS, Allocation, Plan, PlanContext, Profiler, per_block
from .budget import RATIO_MAX, rank_for_ratio, rebalance, saves_memory
from .global_ranks import GlobalRanks, allocate, max_saving_rank, min_ranks_for, ratio_for_rank, uniform_budget
from .plc import PLC, plc_candidates, plc_ratios
from .uniform import Uniform
from .v2 import V2, svdllm_v2_ratios

ALLOCATIONS: dict[str, type[Allocation]] = {cls.name: cls for cls in (Uniform, V2, AdaCR, PLC, GlobalRanks)}

__all__ = [
    "LABELS",
    "ALLOCATIONS",
    "PLC",
    "RATIO_MAX",
    "V2",
    "AdaCR",
    "Allocation",
    "GlobalRanks",
    "Plan",
    "PlanContext",
    "Profiler",
    "Uniform",
    "adacr_ratios",
    "allocate",
    "max_saving_rank",
    "min_ranks_for",
    "per_block",
    "plc_candidates",
    "plc_ratios",
    "rank_for_ratio",
    "ratio_for_rank",
    "rebalance",
    "saves_memory",
    "svdllm_v2_ratios",
    "uniform_budget",
]
