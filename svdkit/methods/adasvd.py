"""AdaSVD: adaComp (alternating refits of both factors) on top of SVD-LLM whitening; adaCR is the allocation
`svdkit.allocation.AdaCR`, switched on by `adacr=True`; stack-of-batch rewrites the calibration inputs.

Objective, with `P = U V^T`, inputs `X'` (the compressed stream) and target `W Y` (`Y = X'` or the
original stream `X`), in Gram form with `H' = X' X'^T` and `K = X' Y^T`:
    f(U, V) = ||U V^T X' - W Y||^2 = tr(P H' P^T) - 2 tr(P K W^T) + const.
U-step: `U = W K^T V (V^T H' V)^+`.  V-step: `V^T = U^+ W K^T H'^+` (for `Y = X'`: `V^T = U^+ W`).
Each step minimises `f` exactly over one factor, so `f` never increases. If `X' = X` the whitened
factors are already the global optimum and adaComp leaves the loss unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..allocation import AdaCR, Allocation, Uniform
from ..errors import ConfigError
from ..linalg import EIG_RTOL, solve_psd_right
from .base import Factors, LayerStats, Method
from .svdllm import Whitened, after_update, truncate
from .svdllm_update import (
    OutputSide,
    _input_cross,
    check_target,
    closed_form_update,
    input_side,
    objective,
    output_side,
)


def pinv_rows(u: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """`U^+` (k x m) through an SVD of `U`, inverting only singular values above `rtol * s_max`."""
    uu, s, vh = torch.linalg.svd(u, full_matrices=False)
    inv = torch.where(s > rtol * s[0], 1.0 / s, torch.zeros_like(s))
    return (vh.T * inv) @ uu.T


def v_step(w: torch.Tensor, w_u: torch.Tensor, stats: LayerStats, target: str, g: torch.Tensor | None = None,
           outs: OutputSide | None = None) -> torch.Tensor:
    """The minimising `V^T` for fixed `U`: `U^+ W` for the compressed target, else `U^+ W K^T H'^+`. With an
    output weight `g`, `U^+` becomes the `G`-weighted `(U^T G U)^{-1} U^T G` (`U^+` again at `G = I`), from `outs`
    (`output_side(w_u, w, g)`, computed here if not given)."""
    if g is None:
        left = pinv_rows(w_u) @ w
    else:
        outs = outs if outs is not None else output_side(w_u, w, g)
        left = solve_psd_right(outs.ugu, outs.guw.T).T
    if target == "compressed":
        return left
    return solve_psd_right(stats.gram_c, left @ _input_cross(stats, target).T)


def check_adacomp(target: str, tau: int) -> None:
    """Refuse adaComp options that cannot run: an unknown update target, or a negative number of rounds."""
    check_target(target)
    if tau < 0:
        raise ConfigError(f"tau must be >= 0, got {tau}")


def _through_wgw(r: torch.Tensor, wgw: torch.Tensor) -> OutputSide:
    """`output_side` of `W_u = W R` from `W^T G W`: `(R^T W^T G W R, R^T W^T G W)`."""
    rm = r.T @ wgw
    return OutputSide(rm @ r, rm)


def adacomp(w: torch.Tensor, f: Factors, stats: LayerStats, target: str, tau: int, g: torch.Tensor | None = None,
            wgw: torch.Tensor | None = None, r: torch.Tensor | None = None) -> tuple[Factors, list[float]]:
    """`tau` rounds of U-step then V-step; returns the new factors and the objective after each step. With an
    output weight `g` (K-FAC's damped `G`) the objective is `G`-weighted: the U-step is unchanged (any invertible
    output weight has the same minimiser for fixed `W_v`), the V-step weighted (`v_step`). Each factor's products
    with the statistics (`input_side`, `output_side`) are formed once and shared by the steps and the trace.
    `wgw` (`W^T G W`, for a tall `W`) spares the U-step's `G W_u` (`m^2 k`): `W_u = W R`, so `(G W_u)^T W = R^T
    W^T G W` and `W_u^T G W_u = R^T W^T G W R` need only `n x n` products; `r`, where `f.w_u = W r`, spares the
    first objective's."""
    w_u, w_v = f.w_u, f.w_v
    ins = input_side(w_v, stats, target)
    trace = [objective(ins, output_side(w_u, w, g) if wgw is None or r is None else _through_wgw(r, wgw))]
    for _ in range(tau):
        if wgw is None:
            w_u = closed_form_update(w, w_v, stats, target, ins)
            outs = output_side(w_u, w, g)
        else:
            r = solve_psd_right(ins.zz, ins.vk.T)  # the U-step's W_u = W K^T W_v^T (W_v H' W_v^T)^-1 = W R
            w_u, outs = w @ r, _through_wgw(r, wgw)
        trace.append(objective(ins, outs))
        w_v = v_step(w, w_u, stats, target, g, outs)
        ins = input_side(w_v, stats, target)
        trace.append(objective(ins, outs))
    return Factors(w_u, w_v, after_update(f.info) if tau > 0 else dict(f.info)), trace


def stack_of_batch(seqs: torch.Tensor, buckets: int, seed: int = 0) -> torch.Tensor:
    """AdaSVD's stack-of-batch: shuffle the `N` calibration sequences (`N x seqlen x width`) and average them
    element-wise into `buckets` sequences, each the mean of about `N / buckets`."""
    if not 1 <= buckets <= seqs.shape[0]:
        raise ConfigError(f"stack-of-batch needs 1 <= buckets <= {seqs.shape[0]} calibration windows, got {buckets}")
    perm = torch.randperm(seqs.shape[0], generator=torch.Generator().manual_seed(seed)).to(seqs.device)
    return torch.stack([chunk.mean(dim=0) for chunk in seqs[perm].chunk(buckets)])


@dataclass
class AdaSVD(Whitened, Method):
    """SVD-LLM whitening, then adaComp on the compressed stream; `adacr` spreads ratios over blocks.

    `tau=0` disables adaComp; `adacr=False` keeps the ratio uniform. `mrr` is the minimum retention
    ratio of adaCR (None: `1 - ratio - 0.1`, the paper's best values at 40/50/60 %).
    """

    tau: int = 1
    target: str = "compressed"
    adacr: bool = True
    importance: str = "1-cos"
    mrr: float | None = None
    stack_buckets: int | None = None
    whitening: str = "cholesky"
    eig_rtol: float = EIG_RTOL
    name = "adasvd"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_adacomp(self.target, self.tau)
        AdaCR(self.importance, self.mrr)  # validates importance now, not at compression time
        if self.stack_buckets is not None and self.stack_buckets < 1:
            raise ConfigError(f"stack_buckets must be >= 1, got {self.stack_buckets}")

    @property
    def input_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Stack-of-batch buckets when `stack_buckets` is set."""
        return None if self.stack_buckets is None else functools.partial(stack_of_batch, buckets=self.stack_buckets)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"gram_c", "cross"}) if self.tau > 0 else frozenset()

    @property
    def allocation(self) -> Allocation:
        return AdaCR(self.importance, self.mrr) if self.adacr else Uniform()

    def factorize(self, w: torch.Tensor, stats: LayerStats, rank: int) -> Factors:
        f = truncate(self.spectrum(w, stats, rank), rank)
        if self.tau == 0:
            return f
        out, trace = adacomp(w, f, stats, self.target, self.tau)
        out.info["adacomp_objective"] = trace
        return out
