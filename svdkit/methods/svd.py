"""Plain truncated SVD of the weight: the baseline that ignores activations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import sigma_tail, truncated_svd
from .base import Factors, LayerStats, Method


@dataclass
class SVD(Method):
    """Keep the top-k singular triplets of `W` (best in weight space, blind to the data)."""

    name = "svd"
    needs_data = False

    def factorize(self, w: torch.Tensor, stats: LayerStats | None, rank: int) -> Factors:
        w_u, w_v, s = truncated_svd(w, rank)
        return Factors(w_u, w_v, {"weight_sigma_tail": sigma_tail(s, rank)})
