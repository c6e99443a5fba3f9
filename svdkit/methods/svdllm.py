"""SVD-LLM: truncation-aware data whitening.

With `S S^T = H`, the output error of any `W'` is `||(W - W') S||_F`, so truncating the SVD of `W S`
drops exactly the tail singular values: the best rank-k output error on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import EIG_RTOL, sigma_tail, split_sigma, whiten
from .base import Factors, LayerStats, Method


def whitened_factors(
    w: torch.Tensor, gram: torch.Tensor, rank: int, whitening: str = "cholesky", eig_rtol: float = EIG_RTOL
) -> Factors:
    """`W_u = U_k S_k^{1/2}`, `W_v = S_k^{1/2} V_k^T S^{-1}` from the SVD of the whitened `W S`."""
    wh = whiten(gram, whitening, eig_rtol)
    u, s, vh = torch.linalg.svd(wh.right(w.double()), full_matrices=False)
    w_u, b = split_sigma(u, s, vh, rank)
    info = {"sigma_tail": sigma_tail(s, rank), "whitening": wh.kind, "jitter": wh.jitter, "dropped": wh.dropped}
    return Factors(w_u, wh.right_inverse(b), info)


@dataclass
class SVDLLM(Method):
    """Whitened truncation (Cholesky in float64, jitter escalation, eigen fallback)."""

    whitening: str = "cholesky"
    eig_rtol: float = EIG_RTOL
    name = "svdllm"

    def factorize(self, w: torch.Tensor, stats: LayerStats, rank: int) -> Factors:
        return whitened_factors(w, stats.gram, rank, self.whitening, self.eig_rtol)
