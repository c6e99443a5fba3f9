"""SVD-LLM's closed-form parameter update (arXiv v1): refit `W_u` on inputs from the compressed model.

With `W_v` from whitening fixed and `Z = W_v X'` (X': this layer's inputs when the earlier blocks are
already compressed), `W_u = argmin ||W_u Z - T||_F` is a least-squares solve in Gram form:
target `T = W X'` gives `W_u = W H' W_v^T (W_v H' W_v^T)^{-1}`; target `T = W X` (the original model's
outputs) gives `W_u = W C^T W_v^T (W_v H' W_v^T)^{-1}` with `C = X' X^T`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..linalg import EIG_RTOL, solve_psd_right
from .base import Factors, LayerStats, Method
from .svdllm import Whitened, after_update, truncate

TARGETS = ("compressed", "original")


def check_target(target: str) -> None:
    """Refuse an update target other than `TARGETS` (the methods with a `target` option share this check)."""
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {TARGETS}, got {target!r}")


def _input_cross(stats: LayerStats, target: str) -> torch.Tensor:
    """`X' Y^T` where `Y` is the input whose outputs `W Y` are the target: `H'` or `C^T = X' X^T`."""
    if stats.gram_c is None or (target == "original" and stats.cross is None):
        raise ValueError("the closed-form update needs compressed-stream (and cross) Gram matrices")
    return stats.gram_c if target == "compressed" else stats.cross


@dataclass
class InputSide:
    """What the objective and the U-step need of `W_v`: `W_v H' W_v^T` (k x k) and `W_v K` (k x n, `K = X' Y^T`).
    Computed once per `W_v`: `W_v H'` is 0.8 TFLOP for a 14,336-wide input at rank 1,911, and a round's objectives
    and U-step would otherwise form it up to seven times."""

    zz: torch.Tensor
    vk: torch.Tensor


@dataclass
class OutputSide:
    """What the objective and the G-weighted V-step need of `W_u`: `W_u^T G W_u` (k x k) and `(G W_u)^T W`
    (k x n); `G = I` without an output weight. Computed once per `W_u` (`G W_u` is `m^2 k` work)."""

    ugu: torch.Tensor
    guw: torch.Tensor


def input_side(w_v: torch.Tensor, stats: LayerStats, target: str) -> InputSide:
    """`InputSide` of `w_v`; for the compressed target `K = H'`, so one product serves both."""
    k = _input_cross(stats, target)  # raises without the compressed stream's statistics
    vh = w_v @ stats.gram_c
    return InputSide(vh @ w_v.T, vh if k is stats.gram_c else w_v @ k)


def output_side(w_u: torch.Tensor, w: torch.Tensor, g: torch.Tensor | None = None,
                gu: torch.Tensor | None = None) -> OutputSide:
    """`OutputSide` of `w_u` for the weight `w` and output weight `g` (None: identity); `gu` is `G W_u` if known."""
    if gu is None:
        gu = w_u if g is None else g @ w_u
    return OutputSide(w_u.T @ gu, gu.T @ w)


def objective(ins: InputSide, outs: OutputSide) -> float:
    """`tr(G U V H' V^T U^T) - 2 tr(G U V K W^T) = <U^T G U, V H' V^T> - 2 <V K, (G U)^T W>`: the objective of
    `update_objective` from the two sides' products."""
    return float((outs.ugu * ins.zz).sum() - 2 * (ins.vk * outs.guw).sum())


def update_objective(w_u: torch.Tensor, w_v: torch.Tensor, w: torch.Tensor, stats: LayerStats, target: str,
                     g: torch.Tensor | None = None, gu: torch.Tensor | None = None) -> float:
    """`||W_u W_v X' - T||_F^2` up to the constant `||T||^2`, from Gram matrices only; with an output weight `g`
    (K-FAC's `G = L_G L_G^T`), `||L_G^T (W_u W_v X' - T)||_F^2` up to its constant. Computed in factored form
    (`objective`), never forming the `m x n` product; `gu` is `G W_u` when the caller has it."""
    return objective(input_side(w_v, stats, target), output_side(w_u, w, g, gu))


def closed_form_update(w: torch.Tensor, w_v: torch.Tensor, stats: LayerStats, target: str,
                       ins: InputSide | None = None) -> torch.Tensor:
    """The least-squares `W_u` for fixed `W_v` (see module docstring): `W K^T W_v^T (W_v H' W_v^T)^{-1}`, with
    `W K^T W_v^T = W (W_v K)^T` from `ins` (`input_side(w_v)`, computed here if not given)."""
    ins = ins if ins is not None else input_side(w_v, stats, target)
    return solve_psd_right(ins.zz, w @ ins.vk.T)


@dataclass
class SVDLLMUpdate(Whitened, Method):
    """Whitening on the original stream, then the closed-form `W_u` update on the compressed stream."""

    target: str = "compressed"
    whitening: str = "cholesky"
    eig_rtol: float = EIG_RTOL
    name = "svdllm-update"
    needs = frozenset({"gram_c", "cross"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_target(self.target)

    def factorize(self, w: torch.Tensor, stats: LayerStats, rank: int) -> Factors:
        f = truncate(self.spectrum(w, stats, rank), rank)
        ins = input_side(f.w_v, stats, self.target)
        before = objective(ins, output_side(f.w_u, w))
        w_u = closed_form_update(w, f.w_v, stats, self.target, ins)
        after = objective(ins, output_side(w_u, w))
        return Factors(w_u, f.w_v, {**after_update(f.info), "update_objective_before": before,
                                    "update_objective_after": after})
