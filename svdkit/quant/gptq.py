"""GPTQ (Frantar et al., 2023) as one pure tensor function: quantize `W` column by column, pushing each
column's rounding error onto the not-yet-quantized columns through the Cholesky factor of `H^{-1}`.

`H = X X^T` is the Gram matrix of the layer's calibration inputs; GPTQ greedily reduces the layer
objective `||(W - Q) X||_F^2 = tr((W - Q) H (W - Q)^T)`. Damping adds `damp * mean(diag H)` to the
diagonal (escalated x10 while the Cholesky fails); input columns that never fire (`H_jj = 0`) are
quantized from zero. With `act_order` columns are visited by decreasing `H_jj`; the group grids are then
fixed up front from `W` ("static groups"), so codes are stored in the original column order and need no
permutation index. Without it, each group's grid is taken from the error-updated weights when the loop
reaches the group's first column, as in the reference implementation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..linalg import NumericalError, check_finite
from .grid import dequantize, find_params, grid_params, num_groups

log = logging.getLogger(__name__)

DAMP_TRIES = 6  # damping escalates x10 per failed Cholesky, this many times at most


@dataclass
class GPTQResult:
    """Codes (`rows x cols` uint8), per-group scales and zeros (`rows x groups`), the dequantized matrix
    (float64, what the error feedback used), and the relative damping that made `H` positive definite."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    dequantized: torch.Tensor
    damp: float


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of `(H + damp * mean(diag H) I)^{-1}`, escalating `damp` until it succeeds."""
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(DAMP_TRIES):
        d = damp * 10**attempt
        lower, info = torch.linalg.cholesky_ex(h + d * mean_diag * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                if attempt:
                    log.info("GPTQ: Hessian needed damping %.3g (asked %.3g)", d, damp)
                return upper, d
    raise NumericalError(f"GPTQ: Hessian not positive definite even with damping {damp * 10 ** (DAMP_TRIES - 1):.3g}")


@torch.no_grad()
def _prepared(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 copies of `w` and the symmetrised `h`, with dead inputs (a zero diagonal) given a unit diagonal
    and zero weights, as GPTQ does."""
    check_finite(h, "GPTQ Hessian")
    check_finite(w, "GPTQ weight")
    w = w.detach().double().clone()
    h = h.detach().double().clone()
    h = 0.5 * (h + h.T)
    dead = h.diagonal() == 0
    if bool(dead.all()):
        raise NumericalError("GPTQ: the layer saw no (non-zero) calibration input")
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> GPTQResult:
    """GPTQ-quantize `w` (`rows x cols`) against the input Gram matrix `h` (`cols x cols`); float64 inside."""
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"Gram matrix {tuple(h.shape)} does not match weight {tuple(w.shape)}")
    w, h = _prepared(w, h)
    gs = cols if group_size <= 0 else group_size
    scales = torch.empty(rows, num_groups(cols, group_size), dtype=scale_dtype, device=w.device)
    zeros = torch.empty(rows, scales.shape[1], dtype=torch.uint8, device=w.device)
    perm = torch.arange(cols, device=w.device)
    if act_order:
        scales, zeros = grid_params(w, bits, group_size, scale_dtype)  # static groups from the original W
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    hinv, used_damp = _inverse_cholesky(h, damp)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    deq = torch.empty_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col])
            g = orig // gs
            if not act_order and orig % gs == 0:  # the group's grid, from the error-updated weights
                current = torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :gs]
                scales[:, g], zeros[:, g] = find_params(current, bits, scale_dtype)
            s, z = scales[:, g].double(), zeros[:, g]
            q = torch.round(w1[:, i] / s) + z.double()
            q = q.clamp(0, 2**bits - 1).to(torch.uint8)
            dq = dequantize(q, s, z, torch.float64)
            codes[:, col], deq[:, col] = q, dq
            err = (w1[:, i] - dq) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if act_order:
        inv = torch.argsort(perm)
        codes, deq = codes[:, inv], deq[:, inv]
    return GPTQResult(codes, scales, zeros, deq, used_damp)


def layer_objective(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """`||(W - Q) X||_F^2 = tr((W - Q) H (W - Q)^T)`, from the Gram matrix alone (float64)."""
    d = w.double() - q.double()
    return float(((d @ h.double()) * d).sum())
