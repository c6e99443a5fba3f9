"""SVD-LLM: truncation-aware data whitening.

With `S S^T = H`, the output error of any `W'` is `||(W - W') S||_F`, so truncating the SVD of `W S`
drops exactly the tail singular values: the best rank-k output error on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..linalg import (
    EIG_RTOL,
    WHITENINGS,
    Whitener,
    above_noise_floor,
    gram_spectrum,
    sigma_tail,
    split_sigma,
    svd,
    svd_route,
    symmetrize_,
)
from .base import Factors, LayerStats, Method


@dataclass
class Spectrum:
    """The SVD of the whitened weight `W S = U diag(s) V^T` and the whitening `S` it was taken with; or, on the
    output route (`whitener` None, `w` kept), `U` and `s` alone from the output Gram `W H W^T = U diag(s^2) U^T`."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor | None
    whitener: Whitener | None
    w: torch.Tensor | None = None


def whitened_svd(w: torch.Tensor, wh: Whitener, rank: int | None = None) -> Spectrum:
    """SVD of `W S` in float64, exact in its leading `rank` directions (`linalg.svd`; None: all)."""
    u, s, vh = svd(wh.right(w.double()), rank)
    return Spectrum(u, s, vh, wh)


def output_spectrum(w: torch.Tensor, h: torch.Tensor, rank: int | None) -> Spectrum | None:
    """The whitened SVD's `U` and `s` without any whitening: `W S (W S)^T = W H W^T`, so its eigendecomposition
    (`m x m`) gives them, and the optimal factors are `W_u = U_k S_k^{1/2}`, `W_v = S_k^{-1/2} U_k^T W` (the
    projection of `W` onto the top-`k` output directions: `S^{-1}` cancels). For `m <= n` this skips the Cholesky
    of `H`, the product `W S` and the triangular solve, and uses `H` itself (no jitter). None where the kept
    spectrum nears the squared condition number's noise floor (see `linalg.svd`): then whiten as usual."""
    w = w.double()
    s, u = gram_spectrum(symmetrize_(w @ h.double() @ w.T))
    if not above_noise_floor(s, w.shape[0] if rank is None else rank):
        return None
    return Spectrum(u, s, None, None, w)


def truncate(sp: Spectrum, rank: int) -> Factors:
    """`W_u = U_k S_k^{1/2}`, `W_v = S_k^{1/2} V_k^T S^{-1}` (a triangular solve, never an inverse); on the output
    route `W_v = S_k^{-1/2} U_k^T W` (directions with `s = 0` carry nothing: their rows are zero)."""
    if sp.whitener is None:
        root = sp.s[:rank].sqrt()
        inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
        w_u = sp.u[:, :rank] * root
        info = {"sigma_tail": sigma_tail(sp.s, rank), "whitening": "output", "jitter": 0.0, "dropped": 0}
        return Factors(w_u, inv[:, None] * (sp.u[:, :rank].T @ sp.w), info)
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
        """The whitened SVD, exact in its leading `rank` directions (None: all; 0: the singular values only). With
        Cholesky whitening, a matrix with no more outputs than inputs takes the output route (`output_spectrum`:
        the same factors, without the whitening) where it is safe."""
        if self.whitening == "cholesky" and w.shape[0] <= w.shape[1] and svd_route() == "auto":
            sp = output_spectrum(w, stats.gram, rank)
            if sp is not None:
                return sp
        return whitened_svd(w, self.whitener(stats), rank)


@dataclass
class SVDLLM(Whitened, Method):
    """Whitened truncation (Cholesky in float64, jitter escalation, eigen fallback)."""

    whitening: str = "cholesky"
    eig_rtol: float = EIG_RTOL
    name = "svdllm"

    def factorize(self, w: torch.Tensor, stats: LayerStats, rank: int) -> Factors:
        return truncate(self.spectrum(w, stats, rank), rank)
