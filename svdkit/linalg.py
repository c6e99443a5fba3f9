"""Pure tensor math shared by the methods: Gram statistics, whitening, truncation, robust solves.

No model code here. Conventions: a weight `W` is `m x n` (out x in); calibration inputs are rows of
`x` (tokens x n); `H = X X^T = sum_t x_t x_t^T` is `n x n`. Products are float32, sums float64,
factorizations float64.
"""

from __future__ import annotations

import contextlib
import logging
import math
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
            return w @ self.factor
        return (w @ self.factor) * self.scale

    def right_inverse(self, b: torch.Tensor) -> torch.Tensor:
        """`B S^{-1}` (or `B S^+`), never forming an explicit inverse."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.factor, b, upper=False, left=False)
        return (b / self.scale) @ self.factor.T

    @property
    def dropped(self) -> int:
        """How many directions of `H` the eigen route discarded as numerically zero."""
        return 0 if self.kind == "cholesky" else self.factor.shape[0] - self.factor.shape[1]


def whiten(h: torch.Tensor, method: str = "cholesky", eig_rtol: float = EIG_RTOL) -> Whitener:
    """Square root of a PSD Gram matrix: Cholesky with scale-aware jitter escalation, else eigen."""
    h = h.double()
    check_finite(h, "Gram matrix")
    h = 0.5 * (h + h.T)
    scale = float(h.diagonal().mean())
    if scale <= 0:
        raise NumericalError("Gram matrix is zero: the layer saw no (non-zero) calibration input")
    if method == "cholesky":
        eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        for rel in JITTERS:
            chol, info = torch.linalg.cholesky_ex(h + (rel * scale) * eye if rel else h)
            if int(info) == 0 and torch.isfinite(chol).all() and bool((chol.diagonal() > 0).all()):
                if rel:
                    log.debug("Cholesky needed jitter %.0e x mean(diag H)", rel)
                return Whitener("cholesky", chol, jitter=rel * scale)
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


def truncated_svd(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-k factors of `a` (Eckart-Young), plus all singular values."""
    check_finite(a, "matrix to factorize")
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
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
    """`||delta X||_F^2 = tr(delta H delta^T)` for a weight difference `delta` (m x n)."""
    return float(((delta @ h) * delta).sum())


def relative_output_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    """`||(W - W') X||_F / ||W X||_F` from the Gram matrix alone."""
    ref = output_error_sq(w, h)
    return math.sqrt(max(output_error_sq(w - approx, h), 0.0) / ref) if ref > 0 else float("nan")


def sigma_tail(s: torch.Tensor, k: int) -> float:
    """Relative energy of the dropped singular values: `sqrt(sum_{i>k} s_i^2 / sum s_i^2)`."""
    total = float((s**2).sum())
    return math.sqrt(float((s[k:] ** 2).sum()) / total) if total > 0 else float("nan")
