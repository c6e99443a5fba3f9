"""Two-sided (K-FAC) whitening: truncate the weight seen through the loss curvature on both sides.

K-FAC approximates the Fisher of a linear layer by `H ⊗ G`, `H = X X^T` (inputs) and `G = sum_t g_t g_t^T`
(gradients of the loss with respect to the outputs), so the loss increase of a change `dW` is about
`tr(dW^T G dW H) / 2N`. With `L_H L_H^T = H` and `L_G L_G^T = G`, that is `||L_G^T dW L_H||_F^2`: the SVD
`L_G^T W L_H = U S V^T` truncated to `k` gives `W_u = L_G^{-T} U_k S_k^{1/2}`, `W_v = S_k^{1/2} V_k^T L_H^{-1}`,
whose error on that metric is exactly the singular-value tail. `G = I` is SVD-LLM's whitening.

`G` is damped, `G + damping * mean(diag G) I`: the Fisher comes from a few windows and the quadratic model
is poor for large changes, so directions with almost no gradient must still count a little.

adaComp composes: for fixed `W_v` the weighted least-squares `W_u` does not depend on `G` (any invertible
weight on the output side has the same minimiser), while the `W_v` step becomes
`V^T = (U^T G U)^{-1} U^T G W K^T H'^+`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..allocation import LABELS, AdaCR, Allocation, GlobalRanks, Uniform
from ..errors import ConfigError
from ..linalg import (
    EIG_RTOL,
    Whitener,
    above_noise_floor,
    gram_spectrum,
    sigma_tail,
    split_sigma,
    svd,
    svd_route,
    symmetrize_,
    whiten,
)
from .adasvd import adacomp, check_adacomp
from .base import Factors, LayerStats, Method, deprecated
from .finetune import FinetuneOptions
from .svdllm import Whitened, truncate

ALLOCS = ("uniform", "adacr", "global")
GAINS = ("kfac", "trace")


def damp_(g: torch.Tensor, damping: float) -> torch.Tensor:
    """`G + damping * mean(diag G) * I`, in place on a float64 `g` (returned): no second matrix of its size."""
    if g.dtype != torch.float64:
        g = g.double()
    if damping > 0:
        g.diagonal().add_(damping * float(g.diagonal().mean()))
    return g


def damped(g: torch.Tensor, damping: float) -> torch.Tensor:
    """`G + damping * mean(diag G) * I` in float64, as a new matrix (`g` is left as it is)."""
    return damp_(g.double().clone(), damping)


def output_whitener(out_gram: torch.Tensor, damping: float, kind: str = "cholesky",
                    eig_rtol: float = EIG_RTOL) -> Whitener:
    """`L_G` with `L_G L_G^T` the damped output-gradient Gram matrix (`linalg.whiten`); `out_gram` is left as it
    is (a copy is damped)."""
    return whiten(damped(out_gram, damping), kind, eig_rtol)


def two_sided_matrix(w: torch.Tensor, wh: Whitener, wg: Whitener) -> torch.Tensor:
    """`L_G^T W L_H` in float64, from the input whitener `wh` and the output whitener `wg`."""
    return wh.right(wg.right(w.double().T).T)  # (W^T L_G)^T L_H


def two_sided_factors(w: torch.Tensor, wh: Whitener, wg: Whitener, rank: int) -> Factors:
    """Rank-`rank` factors minimising `||L_G^T (W - W_u W_v) L_H||_F` (see the module docstring)."""
    u, s, vh = svd(two_sided_matrix(w, wh, wg), rank)
    left, right = split_sigma(u, s, vh, rank)
    w_u = wg.right_inverse(left.T).T  # L_G^{-T} U_k S_k^{1/2}
    w_v = wh.right_inverse(right)  # S_k^{1/2} V_k^T L_H^{-1}
    # the tail on the two-sided metric: not the report's `sigma_tail`, which is the one-sided `rel_error`
    info = {"two_sided_sigma_tail": sigma_tail(s, rank), "whitening": wh.kind, "jitter": wh.jitter,
            "dropped": wh.dropped, "out_whitening": wg.kind, "out_jitter": wg.jitter}
    return Factors(w_u, w_v, info)


def tall_two_sided_factors(w: torch.Tensor, wh: Whitener, g: torch.Tensor, rank: int, guard: bool = True
                           ) -> tuple[Factors, torch.Tensor, torch.Tensor] | None:
    """`two_sided_factors` of a tall `W` (m > n) without a square root of `G`: the right singular vectors `V` of
    `A = L_G^T W L_H` are the eigenvectors of `A^T A = L_H^T (W^T G W) L_H` (n x n), and `U_k = A V_k S_k^{-1}`
    gives `W_u = L_G^{-T} U_k S_k^{1/2} = W L_H V_k S_k^{-1/2}`. No Cholesky of `G` (m^3/3), no `m x m`
    triangle products or solves, no `m x m` factor in memory: for `gate_proj` of a 70B shape about half the
    float64 work and 6.6 GB less. `g` (the damped `G`) is made exactly symmetric in place. Returns the factors,
    `W^T G W` and `R = L_H V_k S_k^{-1/2}` (`W_u = W R`: adaComp's objective then needs no product with `G`), or
    None where the kept spectrum nears the Gram route's noise floor (`guard`; see `linalg.svd`): then
    `two_sided_factors`."""
    w = w.double()
    wgw = w.T @ (symmetrize_(g) @ w)  # W^T G W
    s, v = gram_spectrum(symmetrize_(wh.right(wh.right(wgw).T)))  # (L_H^T (W^T G W)) L_H, symmetric
    if guard and not above_noise_floor(s, rank):
        return None
    root = s[:rank].sqrt()
    inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    r = wh.left(v[:, :rank]) * inv  # W_u = W R
    w_v = wh.right_inverse(root[:, None] * v[:, :rank].T)
    info = {"two_sided_sigma_tail": sigma_tail(s, rank), "whitening": wh.kind, "jitter": wh.jitter,
            "dropped": wh.dropped, "out_whitening": "none", "out_jitter": 0.0}
    return Factors(w @ r, w_v, info), wgw, r


@dataclass
class KFAC(FinetuneOptions, Whitened, Method):
    """Curvature-aware SVD: two-sided (K-FAC) whitening, optional adaComp, and a choice of rank allocation.

    `two_sided=False` factorizes with SVD-LLM's one-sided whitening (G is then used only by `alloc=global`).
    `alloc`: `uniform` ratios, AdaSVD's per-block `adacr` (`importance`, `mrr` as for adasvd), or `global`
    per-matrix ranks for the same parameter budget (`svdkit.allocation.GlobalRanks`), chosen greedily by the
    K-FAC loss estimate (`gain=kfac`: the two-sided spectrum; `gain=trace`: the one-sided spectrum times the
    mean output-gradient energy `tr(G)/m`), never below `min_rank` times the uniform rank. `grad_samples`
    calibration windows give `G` (one backward pass each), with the text's next tokens as labels
    (`labels=data`, the empirical Fisher) or labels drawn from the model (`labels=model`, the curvature of
    the KL divergence from the dense model; `fisher` is the option's deprecated old name). `damping` is
    relative to `mean(diag G)`. `tau > 0` runs adaComp on the compressed stream with the G-weighted V-step. The
    `ft_*` options fine-tune the factors afterwards (`svdkit.finetune`, off by default).
    """

    two_sided: bool = True
    damping: float = 0.1
    grad_samples: int | None = 32
    labels: str = "data"
    fisher: str | None = None  # deprecated name of `labels`
    tau: int = 0
    target: str = "compressed"
    alloc: str = "uniform"
    gain: str = "kfac"
    min_rank: float = 0.25
    importance: str = "1-cos"
    mrr: float | None = None
    whitening: str = "cholesky"
    eig_rtol: float = EIG_RTOL
    name = "kfac"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_adacomp(self.target, self.tau)
        if self.alloc not in ALLOCS:
            raise ConfigError(f"alloc must be one of {ALLOCS}, got {self.alloc!r}")
        if self.gain not in GAINS:
            raise ConfigError(f"gain must be one of {GAINS}, got {self.gain!r}")
        if self.damping < 0:
            raise ConfigError(f"damping must be >= 0, got {self.damping}")
        if self.grad_samples is not None and self.grad_samples < 1:
            raise ConfigError(f"grad_samples must be >= 1 or None (all windows), got {self.grad_samples}")
        if self.fisher is not None:
            deprecated(f"option fisher={self.fisher} is deprecated: use labels={self.fisher}")
            self.labels, self.fisher = self.fisher, None
        if self.labels not in LABELS:
            raise ConfigError(f"labels must be one of {LABELS}, got {self.labels!r}")
        AdaCR(self.importance, self.mrr)  # validates importance now, not at compression time
        GlobalRanks(self.min_rank, self.grad_samples, self.labels)  # and min_rank

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        out = {"gram_c", "cross"} if self.tau > 0 else set()
        if self.two_sided:
            out.add("out_gram")
        return frozenset(out)

    @property
    def allocation(self) -> Allocation:
        if self.alloc == "global":
            return GlobalRanks(self.min_rank, self.grad_samples, self.labels)
        return AdaCR(self.importance, self.mrr) if self.alloc == "adacr" else Uniform()

    def damped_gram(self, stats: LayerStats) -> torch.Tensor:
        """The matrix's damped output-gradient Gram, damped in place: `stats.out_gram` is each matrix's own (the
        largest matrices' Grams are gigabytes: one damped copy serves the whitening and adaComp)."""
        if stats.out_gram is None:
            raise ConfigError("two-sided whitening needs the output-gradient Gram matrix of each linear")
        return damp_(stats.out_gram, self.damping)

    def loss_spectrum(self, w: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """Per singular direction, its share of the K-FAC loss estimate (what the global allocation ranks):
        `sigma_i^2` of `L_G^T W L_H` (`gain=kfac`), or of `W L_H` times `mean(diag G)` (`gain=trace`)."""
        if self.gain == "kfac":
            wg = whiten(self.damped_gram(stats), self.whitening, self.eig_rtol)
            return svd(two_sided_matrix(w, self.whitener(stats), wg), 0)[1] ** 2
        if stats.out_gram is None:
            raise ConfigError("the trace gain needs the output-gradient Gram matrix of each linear")
        energy = float(stats.out_gram.diagonal().double().mean()) * (1.0 + self.damping)
        return self.spectrum(w, stats, 0).s ** 2 * energy

    def factorize(self, w: torch.Tensor, stats: LayerStats, rank: int) -> Factors:
        g, tall, wgw, r = None, None, None, None
        if self.two_sided:
            g, route = self.damped_gram(stats), svd_route()
            if w.shape[0] > w.shape[1] and route != "gesdd":  # tall: G enters through W^T G W alone
                tall = tall_two_sided_factors(w, self.whitener(stats), g, rank, guard=route == "auto")
            if tall is None:
                f = two_sided_factors(w, self.whitener(stats), whiten(g, self.whitening, self.eig_rtol), rank)
            else:
                f, wgw, r = tall
        else:
            f = truncate(self.spectrum(w, stats, rank), rank)
        if self.tau == 0:
            return f
        if not self.two_sided:  # one-sided: exactly AdaSVD's adaComp
            out, trace = adacomp(w, f, stats, self.target, self.tau)
        else:
            out, trace = adacomp(w, f, stats, self.target, self.tau, g, wgw, r)
        out.info["adacomp_objective"] = trace
        return out


@dataclass
class AdaKFAC(KFAC):
    """A named composition: two-sided whitening with `damping=1`, AdaSVD's adaCR block ratios
    and one round of adaComp on the compressed stream (`kfac:damping=1;alloc=adacr;tau=1`), every option still
    overridable. With block-local refinement on top it is `ada-kfac-rf`, the default of `svdkit compress`."""

    damping: float = 1.0
    alloc: str = "adacr"
    tau: int = 1
    name = "ada-kfac"


@dataclass
class AdaKFACRF(AdaKFAC):
    """`ada-kfac`, then block-local refinement of each block's factors right after it is factorized (128 AdamW
    steps, one window a step, lr 3e-4, token-weighted loss against the dense block on the compressed stream).
    The default of `svdkit compress`: better than `ada-kfac` on the mean over seeds at every ratio measured, with
    memory that stays at one block (`svdkit.refine`; README, Results)."""

    rf_steps: int = 128
    rf_batch: int = 1
    rf_lr: float = 3e-4
    rf_loss: str = "token"
    name = "ada-kfac-rf"


@dataclass
class AdaKFACFT(AdaKFAC):
    """`ada-kfac`, then SVD-LLM's sequential low-rank update (`ft_steps=64` per phase on the calibration
    windows): the best measured quality, but fine-tuning needs the whole compressed model in memory, so it is
    not the default of `svdkit compress`."""

    ft_steps: int = 64
    name = "ada-kfac-ft"
