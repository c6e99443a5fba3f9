"""Calibration passes that decide allocations before compressing: SVD-LLM V2's truncation losses,
AdaSVD's layer importance, and ResSVD's search for how many last blocks to compress."""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import plc_candidates, plc_ratios, rank_for_ratio, svdllm_v2_ratios
from .engine import StatsCache, capture_inputs, run_block, set_submodule, walk
from .linalg import split_sigma, whiten
from .models import block_linears, find_blocks, weight_matrix
from .modules import LowRankLinear

log = logging.getLogger(__name__)


def v2_ratios(model: nn.Module, method, calib: torch.Tensor, device, batch_size: int, progress: bool,
              stats_cache: StatsCache | None = None) -> dict[str, float]:
    """SVD-LLM V2 allocation: a dense pass computes each matrix's whitened truncation loss at the global
    ratio, then ratios are spread inside each group of same-type matrices (q of all blocks, ...)."""
    prefix, _ = find_blocks(model)
    losses: dict[str, dict[str, float]] = {}

    def on_block(i, block, groups, stats):
        for name, mod in block_linears(block).items():
            w = weight_matrix(mod).detach().double()
            s = torch.linalg.svdvals(whiten(stats[groups[name]].gram, method.whitening, method.eig_rtol).right(w))
            k = rank_for_ratio(*w.shape, method.ratio)
            losses.setdefault(name, {})[f"{prefix}.{i}.{name}"] = math.sqrt(float((s[k:] ** 2).sum()))

    walk(model, calib, on_block, device=device, batch_size=batch_size, progress=progress, desc="v2 profile",
         stats_cache=stats_cache)
    return svdllm_v2_ratios(losses, method.ratio)


@torch.no_grad()
def block_importance(model: nn.Module, calib: torch.Tensor, variant: str = "1-cos", device=None,
                     batch_size: int = 8, progress: bool = True) -> list[float]:
    """Per decoder block, the mean over calibration tokens of `1 - cos(x_in, x_out)` (ShortGPT's block
    influence) or of `cos(x_in, x_out)`, on the dense model's hidden states."""
    _, blocks = find_blocks(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x, extra = capture_inputs(model, calib, batch_size, device)
    out = []
    for block in tqdm(blocks, desc="importance", unit="block", disable=not progress):
        home = next(block.parameters()).device
        block.to(device)
        total, count = 0.0, 0
        for b, t in enumerate(x):
            y = run_block(block, t, extra, b)
            cos = torch.nn.functional.cosine_similarity(t.float(), y.float(), dim=-1)
            total += float(cos.double().sum())
            count += cos.numel()
            x[b] = y
        block.to(home)
        mean_cos = total / count
        out.append(1.0 - mean_cos if variant == "1-cos" else mean_cos)
    return out


@torch.no_grad()
def plc_search(model: nn.Module, method, calib: torch.Tensor, device=None, batch_size: int = 8,
               progress: bool = True, stats_cache: StatsCache | None = None) -> tuple[int, dict[int, float]]:
    """Choose ResSVD's `k` (last blocks compressed) by the relative error of the final hidden states on
    `method.score_windows` calibration windows, over every feasible `k`.

    One dense pass caches each matrix's whitened SVD, so scoring a candidate costs only slicing factors
    and running the last `k` blocks on the scoring windows. Candidates are scored with plain whitened
    truncation (REC with a whitened residual is identical; a plain residual changes it by `beta`).
    """
    prefix, blocks = find_blocks(model)
    n = len(blocks)
    ks = plc_candidates(n, method.ratio, method.beta)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    svds: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]] = {}

    def on_block(i, block, groups, stats):
        if i < n - max(ks):
            return
        for name, mod in block_linears(block).items():
            wh = whiten(stats[groups[name]].gram, method.whitening, method.eig_rtol)
            u, s, vh = torch.linalg.svd(wh.right(weight_matrix(mod).detach().double()), full_matrices=False)
            svds[(i, name)] = (u.float().cpu(), s.cpu(), vh.float().cpu(), wh)

    walk(model, calib, on_block, device=device, batch_size=batch_size, progress=progress, desc="plc profile",
         skip_block=lambda i: i < n - max(ks), stats_cache=stats_cache)
    score = calib[: method.score_windows]
    x, extra = capture_inputs(model, score, batch_size, device)
    inputs = []  # inputs of every block on the scoring windows (dense model)
    for block in blocks:
        inputs.append(x)
        home = next(block.parameters()).device
        block.to(device)
        x = [run_block(block, t, extra, b) for b, t in enumerate(x)]
        block.to(home)
    final = torch.cat(x)
    scores: dict[int, float] = {}
    for k in tqdm(ks, desc="plc search", unit="k", disable=not progress):
        r_l = plc_ratios(n, method.ratio, k, method.beta)[-1]
        h = inputs[n - k]
        for i in range(n - k, n):
            block = copy.deepcopy(blocks[i]).to(device)
            for name, mod in block_linears(blocks[i]).items():
                u, s, vh, wh = svds[(i, name)]
                rank = rank_for_ratio(*weight_matrix(mod).shape, r_l)
                w_u, b = split_sigma(u.double(), s.double(), vh.double(), rank)
                w_v = wh.right_inverse(b.to(wh.factor.device))
                dtype = mod.weight.dtype
                bias = mod.bias.detach() if mod.bias is not None else None
                set_submodule(block, name, LowRankLinear.from_factors(w_u.to(device, dtype), w_v.to(device, dtype),
                                                                      bias))
            h = [run_block(block, t, extra, b) for b, t in enumerate(h)]
        out = torch.cat(h)
        scores[k] = float(torch.linalg.norm((out - final).float()) / torch.linalg.norm(final.float()))
    best = min(scores, key=scores.get)
    log.info("PLC: compressing the last %d of %d blocks (final hidden-state error %.4f)", best, n, scores[best])
    return best, scores
