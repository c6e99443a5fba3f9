"""ASVD: activation-aware SVD with a diagonal scaling by mean input magnitude (the SVD-LLM baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import sigma_tail, truncated_svd
from .base import Factors, LayerStats, Method


@dataclass
class ASVD(Method):
    """SVD of `W D`, `D = diag(mean|x_j|)^alpha`, then `W' = U_k S_k V_k^T D^{-1}`: the best rank-k matrix in
    ASVD's own metric `||(W - W') D||_F`, whose relative value is the singular-value tail of `W D`
    (reported as `scaled_sigma_tail`)."""

    alpha: float = 0.5
    name = "asvd"

    def factorize(self, w: torch.Tensor, stats: LayerStats, rank: int) -> Factors:
        if stats.abs_mean is None:
            raise ValueError("ASVD needs the mean absolute input of each channel")
        mag = stats.abs_mean.double()
        d = mag.clamp_min(1e-6 * float(mag.max().clamp_min(1e-30))) ** self.alpha  # dead channels stay finite
        w_u, w_v, s = truncated_svd(w * d, rank)
        return Factors(w_u, w_v / d, {"scaled_sigma_tail": sigma_tail(s, rank)})
