"""FWSVD: Fisher-weighted SVD, rows weighted by the squared gradients of the calibration loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..linalg import sigma_tail, truncated_svd
from .base import Factors, LayerStats, Method


@dataclass
class FWSVD(Method):
    """SVD of `D W`, `D = diag(sqrt(I))` with `I_i = sum_j (dL/dW_ij)^2`; `W' = D^{-1} U_k S_k V_k^T`: the best
    rank-k matrix in FWSVD's own metric `||D (W - W')||_F`, whose relative value is the singular-value tail
    of `D W` (reported as `scaled_sigma_tail`)."""

    fisher_samples: int | None = None  # calibration windows used for gradients (None: all)
    name = "fwsvd"
    needs = frozenset({"fisher"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fisher_samples is not None and self.fisher_samples < 1:
            raise ConfigError(f"fisher_samples must be >= 1, got {self.fisher_samples}")

    def factorize(self, w: torch.Tensor, stats: LayerStats, rank: int) -> Factors:
        if stats.row_importance is None:
            raise ValueError("FWSVD needs the Fisher row importance of each matrix")
        imp = stats.row_importance.double()
        d = imp.clamp_min(1e-12 * float(imp.max().clamp_min(1e-30))).sqrt()
        w_u, w_v, s = truncated_svd(d[:, None] * w, rank)
        return Factors(w_u / d[:, None], w_v, {"scaled_sigma_tail": sigma_tail(s, rank)})
