"""Pure tensor math shared by the methods: Gram statistics, whitening, truncation, robust solves.

No model code here. Conventions: a weight `W` is `m x n` (out x in); calibration inputs are rows of
`x` (tokens x n); `H = X X^T = sum_t x_t x_t^T` is `n x n`. Products are float32, sums float64,
factorizations float64.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import ConfigError, SvdkitError

log = logging.getLogger(__name__)

JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4)  # relative to mean(diag H), tried in order
EIG_RTOL = 1e-10  # eigenvalues below rtol * lambda_max are dropped (pseudo-inverse)
PIVOT_RTOL = 1e-10  # a Cholesky pivot below this x mean(diag G) marks a nearly singular solve (see solve_psd_right)
WHITENINGS = ("cholesky", "eigen")


class NumericalError(SvdkitError, ArithmeticError):
    """Raised when statistics or weights contain non-finite values."""


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise NumericalError(f"{what} has {bad} non-finite entries")


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full-precision float32 matmuls inside the block (TF32 would round the products' inputs to 10 mantissa
    bits on recent GPUs); the previous setting is restored after."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def accumulate_gram(h: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """`h += x^T y` (x, y: tokens x n, default y = x): float32 products summed into the float64 `h`."""
    x = x.reshape(-1, x.shape[-1]).float()
    y = x if y is None else y.reshape(-1, y.shape[-1]).float()
    h += (x.T @ y).double()


# --------------------------------------------------------------------------------------------- whitening
TRIANGLE_BLOCK = 1024  # columns per product in `lower_right`


def lower_right(w: torch.Tensor, low: torch.Tensor, block: int = TRIANGLE_BLOCK) -> torch.Tensor:
    """`W L` for a lower-triangular `L` (n x n), skipping its zeros: columns `j..j+b` of the product need only
    rows `j..n` of `L`, so the work is about `(1 + b/n) / 2` of a dense product (0.54 at n = 14,336)."""
    n = low.shape[0]
    if n <= block:
        return w @ low
    out = torch.empty(w.shape[0], n, dtype=torch.promote_types(w.dtype, low.dtype), device=w.device)
    for j in range(0, n, block):
        out[:, j : j + block] = w[:, j:] @ low[j:, j : j + block]
    return out


@dataclass
class Whitener:
    """A square root `S` of a Gram matrix (`S S^T ~= H`) and its (pseudo-)inverse, applied from the right.

    Cholesky: `S` is lower-triangular `n x n`, inverted by triangular solves. Eigen: `S = Q_r L_r^{1/2}`
    (`n x r`, small eigenvalues dropped), inverted by the pseudo-inverse `L_r^{-1/2} Q_r^T`.
    """

    kind: str
    factor: torch.Tensor  # L (n x n) or Q_r (n x r)
    scale: torch.Tensor | None = None  # sqrt eigenvalues (r,) for the eigen route
    jitter: float = 0.0

    def right(self, w: torch.Tensor) -> torch.Tensor:
        """`W S`."""
        if self.kind == "cholesky":
            return lower_right(w, self.factor)
        return (w @ self.factor) * self.scale

    def left(self, b: torch.Tensor) -> torch.Tensor:
        """`S B`."""
        if self.kind == "cholesky":
            return self.factor @ b
        return self.factor @ (self.scale[:, None] * b)

    def right_inverse(self, b: torch.Tensor) -> torch.Tensor:
        """`B S^{-1}` (or `B S^+`), never forming an explicit inverse."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.factor, b, upper=False, left=False)
        return (b / self.scale) @ self.factor.T

    @property
    def dropped(self) -> int:
        """How many directions of `H` the eigen route discarded as numerically zero."""
        return 0 if self.kind == "cholesky" else self.factor.shape[0] - self.factor.shape[1]


def symmetrize_(h: torch.Tensor, tile: int = 2048) -> torch.Tensor:
    """`h <- (h + h^T) / 2` in place, tile by tile (no second matrix of its size); returns `h`. Float32 products
    summed into a Gram are symmetric only up to rounding; LAPACK reads one triangle, so the mean is taken."""
    n = h.shape[0]
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            a, b = h[i : i + tile, j : j + tile], h[j : j + tile, i : i + tile]
            mean = 0.5 * (a + b.T)
            a.copy_(mean)
            b.copy_(mean.T)
    return h


def whiten(h: torch.Tensor, method: str = "cholesky", eig_rtol: float = EIG_RTOL) -> Whitener:
    """Square root of a PSD Gram matrix: Cholesky with scale-aware jitter escalation, else eigen.

    Memory: `h` (made exactly symmetric in place, see `symmetrize_`) and its factor, nothing else of their size
    on the Cholesky route: each jitter is added to `h`'s diagonal in place and the diagonal restored from a saved
    copy afterwards, so `h` holds its own values again when this returns (a 70B `gate_proj`'s output-side Gram
    is 6.6 GB in float64: each copy counts)."""
    h = h.double()
    check_finite(h, "Gram matrix")
    symmetrize_(h)
    scale = float(h.diagonal().mean())
    if scale <= 0:
        raise NumericalError("Gram matrix is zero: the layer saw no (non-zero) calibration input")
    if method == "cholesky":
        diag = h.diagonal().clone()
        chol = torch.empty_like(h)
        info = torch.empty((), dtype=torch.int32, device=h.device)
        try:
            for rel in JITTERS:
                if rel:
                    h.diagonal().copy_(diag).add_(rel * scale)
                torch.linalg.cholesky_ex(h, out=(chol, info))
                if int(info) == 0 and torch.isfinite(chol).all() and bool((chol.diagonal() > 0).all()):
                    if rel:
                        log.debug("Cholesky needed jitter %.0e x mean(diag H)", rel)
                    return Whitener("cholesky", chol, jitter=rel * scale)
        finally:
            h.diagonal().copy_(diag)
        del chol
        log.debug("Cholesky failed at every jitter; falling back to the eigendecomposition")
    elif method != "eigen":
        raise ConfigError(f"unknown whitening method {method!r}: expected 'cholesky' or 'eigen'")
    evals, evecs = torch.linalg.eigh(h)
    keep = evals > eig_rtol * evals[-1].clamp_min(0)
    if not bool(keep.any()):
        raise NumericalError("Gram matrix has no positive eigenvalue")
    return Whitener("eigen", evecs[:, keep], evals[keep].sqrt())


# --------------------------------------------------------------------------------------------- factors
def split_sigma(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k factors with the singular values split symmetrically: `(U_k S_k^{1/2}, S_k^{1/2} V_k^T)`."""
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


SVD_ROUTES = ("auto", "gesdd", "gram")
# The Gram route squares the condition number: a singular value s_i comes out with an absolute error of about
# eps * s_1^2 / s_i, so the directions that must be exact need s_i above this fraction of s_1 (their squares then
# sit ten decades above float64's rounding in the Gram); otherwise LAPACK's SVD is used.
GRAM_ROUTE_FLOOR = 1e-5


def svd_route() -> str:
    """`auto` (default), or the route `SVDKIT_SVD` forces: `gesdd` (LAPACK's SVD, the reference) or `gram`."""
    route = os.environ.get("SVDKIT_SVD", "auto")
    if route not in SVD_ROUTES:
        raise ConfigError(f"SVDKIT_SVD must be one of {', '.join(SVD_ROUTES)}, got {route!r}")
    return route


def gram_spectrum(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The singular values (descending) and left vectors of `A` from its Gram `A A^T` (eigenvalues clamped at 0)."""
    evals, evecs = torch.linalg.eigh(gram)
    return evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1)


def above_noise_floor(s: torch.Tensor, need: int) -> bool:
    """Whether the `need`-th of the descending singular values `s` (from a Gram route, which squares the condition
    number) is finite and above `GRAM_ROUTE_FLOOR` of the largest: the kept directions are then exact."""
    return need == 0 or (bool(torch.isfinite(s).all()) and bool(s[need - 1] > GRAM_ROUTE_FLOOR * s[0]))


def svd(a: torch.Tensor, rank: int | None = None, route: str | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD `a = U diag(s) V^T` in float64, `s` descending; exact in its leading `rank` directions (None: all;
    0: the singular values only).

    The `gram` route takes the eigendecomposition of the smaller Gram (`A A^T` or `A^T A`) and the other side's
    vectors by one product (`V^T = U^T A / s`): 3.7-4.9x faster than `gesdd` on LLaMA shapes, the same rank-k
    truncation to 2e-14 (benchmarks/scale.py svd-route). `auto` takes it unless the `rank`-th singular value is
    below `GRAM_ROUTE_FLOOR` of the largest (there the squared condition number loses digits), then `gesdd`.
    Directions with a zero singular value get zero vectors on the Gram route (the truncation never keeps them).
    """
    a = a.double()
    route = route or svd_route()
    if route == "gesdd":
        return torch.linalg.svd(a, full_matrices=False)
    m, n = a.shape
    wide = m <= n
    s, evecs = gram_spectrum(a @ a.T if wide else a.T @ a)
    need = min(m, n) if rank is None else rank
    if route == "auto" and not above_noise_floor(s, need):
        log.debug("kept spectrum near the Gram route's noise floor (rank %d): LAPACK's SVD instead", need)
        return torch.linalg.svd(a, full_matrices=False)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    if wide:
        return evecs, s, (evecs.T @ a) * inv[:, None]
    return (a @ evecs) * inv, s, evecs.T


def truncated_svd(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-k factors of `a` (Eckart-Young), plus all singular values."""
    check_finite(a, "matrix to factorize")
    u, s, vh = svd(a, k)
    w_u, w_v = split_sigma(u, s, vh, k)
    return w_u, w_v, s


def solve_psd_right(g: torch.Tensor, b: torch.Tensor, rtol: float = EIG_RTOL, what: str = "Gram matrix"
                    ) -> torch.Tensor:
    """`X` with `X G = B` for a symmetric PSD `G`, kept bounded when `G` is nearly singular.

    A Cholesky factor is used only when every pivot `L_ii^2` is at least `PIVOT_RTOL * mean(diag G)`: a smaller
    pivot means a direction the data barely spans, along which an exact solve divides noise by almost zero.
    Then the jitters of `JITTERS` (relative to `mean(diag G)`) are tried in order, with the same check; if none
    passes, the pseudo-inverse on the eigenvalues above `rtol * lambda_max` (minimum-norm least squares).
    A zero `G` gives `X = 0` (the minimum-norm solution); non-finite input is a `NumericalError`.
    """
    check_finite(g, what)
    check_finite(b, f"right-hand side for the {what}")
    g = 0.5 * (g + g.T)
    scale = float(g.diagonal().mean())
    if scale <= 0:
        return torch.zeros_like(b)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for rel in JITTERS:
        chol, info = torch.linalg.cholesky_ex(g + (rel * scale) * eye if rel else g)
        if int(info) != 0 or not bool(torch.isfinite(chol).all()):
            continue
        if float(chol.diagonal().square().min()) < PIVOT_RTOL * scale:
            continue
        x = torch.cholesky_solve(b.T, chol).T
        if bool(torch.isfinite(x).all()):
            if rel:
                log.debug("%s solve needed jitter %.0e x mean(diag)", what, rel)
            return x
    log.debug("%s is nearly singular at every jitter; solving on its eigenvalues", what)
    evals, evecs = torch.linalg.eigh(g)
    inv = torch.where(evals > rtol * evals[-1].clamp_min(0), 1.0 / evals, torch.zeros_like(evals))
    return ((b @ evecs) * inv) @ evecs.T


# --------------------------------------------------------------------------------------------- errors
def output_error_sq(delta: torch.Tensor, h: torch.Tensor) -> float:
    """`||delta X||_F^2 = tr(delta H delta^T)` for a weight difference `delta` (m x n), in `delta`'s dtype."""
    return float(((delta @ h.to(delta.dtype)) * delta).double().sum())


def relative_output_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor,
                          dtype: torch.dtype = torch.float64) -> float:
    """`||(W - W') X||_F / ||W X||_F` from the Gram matrix alone; the products in `dtype` (float32 is a few times
    faster for a report's figure on a large matrix, about 1e-5 relative)."""
    w, delta = w.to(dtype), (w - approx).to(dtype)
    ref = output_error_sq(w, h)
    return math.sqrt(max(output_error_sq(delta, h), 0.0) / ref) if ref > 0 else float("nan")


def sigma_tail(s: torch.Tensor, k: int) -> float:
    """Relative energy of the dropped singular values: `sqrt(sum_{i>k} s_i^2 / sum s_i^2)`."""
    total = float((s**2).sum())
    return math.sqrt(float((s[k:] ** 2).sum()) / total) if total > 0 else float("nan")
