"""SVD-LLM: truncation-aware data whitening.

With `S S^T = H`, the output error of any `W'` is `||(W - W') S||_F`, so truncating the SVD of `W S`
drops exactly the tail singular values: the best rank-k output error on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..linalg import EIG_RTOL, WHITENINGS, Whitener, sigma_tail, split_sigma, svd
from .base import Factors, LayerStats, Method


@dataclass
class Spectrum:
    """The SVD of the whitened weight `W S = U diag(s) V^T`, and the whitening `S` it was taken with."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    whitener: Whitener


def whitened_svd(w: torch.Tensor, wh: Whitener, rank: int | None = None) -> Spectrum:
    """SVD of `W S` in float64, exact in its leading `rank` directions (`linalg.svd`; None: all)."""
    u, s, vh = svd(wh.right(w.double()), rank)
    return Spectrum(u, s, vh, wh)


def truncate(sp: Spectrum, rank: int) -> Factors:
    """`W_u = U_k S_k^{1/2}`, `W_v = S_k^{1/2} V_k^T S^{-1}` (a triangular solve, never an inverse)."""
    w_u, b = split_sigma(sp.u, sp.s, sp.vh, rank)
    wh = sp.whitener
    info = {"sigma_tail": sigma_tail(sp.s, rank), "whitening": wh.kind, "jitter": wh.jitter, "dropped": wh.dropped}
    return Factors(w_u, wh.right_inverse(b.to(wh.factor.device)), info)


def after_update(info: dict) -> dict:
    """A truncation's report facts once an update (adaComp, the closed-form `W_u`) has changed its factors:
    a tail (`sigma_tail`, `two_sided_sigma_tail`) is the error of the truncated factors only, so it moves to
    `..._before_update` and the report never claims it equals the updated factors' `rel_error`."""
    return {f"{k}_before_update" if k.endswith("sigma_tail") else k: v for k, v in info.items()}


def whitened_factors(w: torch.Tensor, wh: Whitener, rank: int) -> Factors:
    """Rank-`rank` factors of `w` that minimise the output error on the data `wh` whitens."""
    return truncate(whitened_svd(w, wh, rank), rank)


class Whitened:
    """Mixin of the methods built on SVD-LLM's whitening (fields `whitening`, `eig_rtol`): the whitening and
    the whitened spectrum of a matrix, which the allocations' profiles use too."""

    whitening: str
    eig_rtol: float

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        if self.whitening not in WHITENINGS:
            raise ConfigError(f"whitening must be one of {WHITENINGS}, got {self.whitening!r}")

    def whitener(self, stats: LayerStats) -> Whitener:
        return stats.whitener(self.whitening, self.eig_rtol)

    def spectrum(self, w: torch.Tensor, stats: LayerStats, rank: int | None = None) -> Spectrum:
        """The whitened SVD, exact in its leading `rank` directions (None: all; 0: the singular values only)."""
        return whitened_svd(w, self.whitener(stats), rank)


@dataclass
class SVDLLM(Whitened, Method):
    """Whitened truncation (Cholesky in float64, jitter escalation, eigen fallback)."""

    whitening: str = "cholesky"
    eig_rtol: float = EIG_RTOL
    name = "svdllm"

    def factorize(self, w: torch.Tensor, stats: LayerStats, rank: int) -> Factors:
        return truncate(self.spectrum(w, stats, rank), rank)
