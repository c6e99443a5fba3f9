"""ResSVD residual compensation (REC): truncate to `r - r_r`, truncate the residual `W - W_1` to
`r_r = beta m n / (m + n)`, and concatenate both pairs into one rank-r pair (same storage and speed).

With the same metric in both stages this equals one rank-r truncation (Eckart-Young: the residual's
top singular triplets are the first stage's next ones), so REC only changes anything when the stages
use different metrics. Partial-layer compression (PLC) is an allocation: `svdkit.allocation.PLC`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..allocation import PLC, Allocation, Uniform
from ..errors import ConfigError
from ..linalg import EIG_RTOL, truncated_svd
from .adasvd import adacomp
from .base import Factors, LayerStats, Method
from .svdllm import Whitened, truncate
from .svdllm_update import TARGETS

METRICS = ("whitened", "plain")


def residual_rank(m: int, n: int, rank: int, beta: float) -> int:
    """`r_r = floor(beta m n / (m + n))`, leaving at least rank 1 to the first stage."""
    return max(0, min(int(math.floor(beta * m * n / (m + n))), rank - 1))


@dataclass
class ResSVD(Whitened, Method):
    """REC with a choice of metric per stage, plus PLC (compress only the last `k` blocks).

    `k=None` searches `k` on calibration data (error of the final hidden states); `plc=False` keeps
    every block at the uniform ratio. REC is off by default (`beta=0`): the paper's `beta=0.05` with a
    plain residual measured worse than no residual on SmolLM2 at 0.2 and 0.4 (README, Results), and a
    whitened residual is the identity. `ressvd:beta=0.05` switches it on. `tau > 0` runs AdaSVD's
    adaComp (on the compressed stream, towards `target`) on the concatenated factors: PLC + adaComp.
    """

    beta: float = 0.0
    first_metric: str = "whitened"
    residual_metric: str = "plain"
    plc: bool = True
    k: int | None = None
    score_windows: int = 8
    tau: int = 0
    target: str = "compressed"
    whitening: str = "cholesky"
    eig_rtol: float = EIG_RTOL
    name = "ressvd"

    def __post_init__(self) -> None:
        super().__post_init__()
        for metric in (self.first_metric, self.residual_metric):
            if metric not in METRICS:
                raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"beta must be in [0, 1), got {self.beta}")
        if self.tau < 0 or self.target not in TARGETS:
            raise ConfigError(f"tau must be >= 0 and target one of {TARGETS}, got {self.tau}, {self.target!r}")
        PLC(self.k, self.beta, self.score_windows)  # validates k and score_windows now

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"gram_c", "cross"}) if self.tau > 0 else frozenset()

    @property
    def allocation(self) -> Allocation:
        return PLC(self.k, self.beta, self.score_windows) if self.plc else Uniform()

    def _stage(self, w: torch.Tensor, stats: LayerStats, rank: int, metric: str) -> Factors:
        if metric == "whitened":
            return truncate(self.spectrum(w, stats, rank), rank)
        w_u, w_v, _ = truncated_svd(w, rank)
        return Factors(w_u, w_v, {})

    def factorize(self, w: torch.Tensor, stats: LayerStats, rank: int) -> Factors:
        f = self._rec(w, stats, rank)
        if self.tau == 0:
            return f
        out, trace = adacomp(w, f, stats, self.target, self.tau)
        out.info["adacomp_objective"] = trace
        return out

    def _rec(self, w: torch.Tensor, stats: LayerStats, rank: int) -> Factors:
        m, n = w.shape
        r_res = residual_rank(m, n, rank, self.beta)
        first = self._stage(w, stats, rank - r_res, self.first_metric)
        info = {"first_rank": rank - r_res, "residual_rank": r_res}
        if r_res == 0:
            return Factors(first.w_u, first.w_v, {**first.info, **info})
        second = self._stage(w - first.w_u @ first.w_v, stats, r_res, self.residual_metric)
        return Factors(torch.cat([first.w_u, second.w_u], dim=1), torch.cat([first.w_v, second.w_v], dim=0), info)
