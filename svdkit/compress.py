"""`compress(model, method, calib)`: the one verb that turns a dense model into a low-rank one in place."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import adacr_ratios, plc_ratios, rank_for_ratio, saves_memory
from .engine import GroupAccumulator, StatsCache, set_submodule, walk
from .gradients import fisher_row_importance
from .linalg import relative_output_error
from .methods.base import LayerStats, Method
from .models import block_linears, count_parameters, find_blocks, weight_matrix
from .modules import LowRankLinear
from .profile import block_importance, plc_search, v2_ratios
from .report import MatrixReport, Report

log = logging.getLogger(__name__)


def _check_calib(calib: torch.Tensor | None, method: Method) -> None:
    if calib is None:
        if method.needs_data:
            raise ValueError(f"{method.name} needs calibration data: pass calib, see svdkit.calibration")
        return
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
        raise ValueError("calib must be a (n, seqlen) LongTensor of token ids; see svdkit.calibration")


def _check_ranks(model: nn.Module, ratios: dict[str, float]) -> None:
    """Refuse, before anything is modified, ratios outside [0, 1) or that leave a matrix with rank 0."""
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for name, mod in block_linears(block).items():
            full = f"{prefix}.{i}.{name}"
            ratio = ratios.get(full, 0.0)
            m, n = weight_matrix(mod).shape
            if ratio > 0.0 and rank_for_ratio(m, n, ratio) < 1:
                raise ValueError(f"ratio {ratio:.3f} leaves rank 0 for {full} ({m} x {n}); use a smaller ratio")


def layer_stats(acc: GroupAccumulator) -> LayerStats:
    return LayerStats(
        gram=acc.gram, tokens=acc.tokens, abs_mean=acc.abs_sum / max(acc.tokens, 1), gram_c=acc.gram_c, cross=acc.cross
    )


def uniform_ratios(model: nn.Module, ratio: float) -> dict[str, float]:
    """Every decoder-block linear at the same ratio, keyed by its full module name."""
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": ratio for i, b in enumerate(blocks) for n in block_linears(b)}


def per_matrix(model: nn.Module, block_ratios: list[float]) -> dict[str, float]:
    """Spread one ratio per block over every linear of that block."""
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": block_ratios[i] for i, b in enumerate(blocks) for n in block_linears(b)}


def plan_ratios(model: nn.Module, method: Method, calib: torch.Tensor, device, batch_size: int, progress: bool,
                report: Report, stats_cache: StatsCache | None = None) -> dict[str, float]:
    """Per-matrix ratios from the method's allocation: uniform, SVD-LLM V2, adaCR or PLC."""
    kind = method.allocation
    if kind == "uniform":
        return uniform_ratios(model, method.ratio)
    if kind == "v2":
        return v2_ratios(model, method, calib, device, batch_size, progress, stats_cache)
    if kind == "adacr":
        importance = block_importance(model, calib, method.importance, device, batch_size, progress)
        block_ratios = adacr_ratios(importance, method.ratio, method.mrr)
        report.extra.update(importance=importance, block_ratios=block_ratios)
        return per_matrix(model, block_ratios)
    if kind == "plc":
        n = len(find_blocks(model)[1])
        k, scores = method.k, {}
        if k is None:
            k, scores = plc_search(model, method, calib, device, batch_size, progress, stats_cache)
        block_ratios = plc_ratios(n, method.ratio, k, method.beta)
        report.extra.update(plc_k=k, plc_scores=scores, block_ratios=block_ratios)
        return per_matrix(model, block_ratios)
    raise ValueError(f"unknown allocation {kind!r}")


@torch.no_grad()
def compress(
    model: nn.Module,
    method: Method,
    calib: torch.Tensor | None,
    *,
    ratios: dict[str, float] | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    calibration_info: dict | None = None,
    stats_cache: StatsCache | None = None,
) -> Report:
    """Compress every decoder-block linear of `model` in place with `method`; returns the report.

    `ratios` overrides the per-matrix ratio (full module name -> fraction removed); a matrix whose rank
    would not save memory stays dense and the report says so. A method that ignores activations
    (`needs_data = False`, plain SVD) accepts `calib=None`: no forward pass, no calibration error in the report.
    """
    _check_calib(calib, method)
    start = time.perf_counter()
    prefix, _ = find_blocks(model)
    report = Report(
        method=method.name,
        config=asdict(method),
        calibration=({"windows": calib.shape[0], "seqlen": calib.shape[1], **(calibration_info or {})}
                     if calib is not None else {}),
        params_before=count_parameters(model),
    )
    fisher = None
    if "fisher" in method.needs:
        fisher = fisher_row_importance(model, calib, getattr(method, "fisher_samples", None), progress)
    if ratios is None:
        ratios = plan_ratios(model, method, calib, device, batch_size, progress, report, stats_cache)
    _check_ranks(model, ratios)
    report.extra["ratios"] = ratios

    def on_block(i: int, block: nn.Module, groups: dict[str, str], stats: dict[str, GroupAccumulator] | None) -> None:
        swaps = {}
        for name, mod in block_linears(block).items():
            full = f"{prefix}.{i}.{name}"
            t0 = time.perf_counter()
            w = weight_matrix(mod).detach().double()
            m, n = w.shape
            ratio = ratios.get(full, 0.0)
            rank = rank_for_ratio(m, n, ratio)
            entry = MatrixReport(
                block=i, name=name, shape=(m, n), rank=None, ratio=ratio, params_before=m * n, params_after=m * n
            )
            if ratio <= 0.0 or not saves_memory(m, n, rank):
                entry.note = "kept dense: ratio 0" if ratio <= 0.0 else f"kept dense: rank {rank} would not save memory"
                report.matrices.append(entry)
                continue
            st = layer_stats(stats[groups[name]]) if stats is not None else None
            if fisher is not None:
                st.row_importance = fisher[full].to(w.device)
            f = method.factorize(w, st, rank)
            entry.rank, entry.params_after = rank, rank * (m + n)
            if st is not None:
                entry.rel_error = relative_output_error(w, f.w_u @ f.w_v, st.gram)
            entry.sigma_tail = f.info.pop("sigma_tail", None)
            entry.info = f.info
            bias = mod.bias.detach() if mod.bias is not None else None
            dtype = mod.weight.dtype
            swaps[name] = LowRankLinear.from_factors(f.w_u.to(dtype), f.w_v.to(dtype), bias)
            entry.seconds = time.perf_counter() - t0
            report.matrices.append(entry)
        for name, new in swaps.items():
            set_submodule(block, name, new)

    _, blocks = find_blocks(model)
    dense_blocks = set()
    for i, block in enumerate(blocks):
        linears = block_linears(block)
        if all(ratios.get(f"{prefix}.{i}.{name}", 0.0) <= 0.0 for name in linears):
            dense_blocks.add(i)  # only propagated: no statistics, no factorization
            for name, mod in linears.items():
                m, n = weight_matrix(mod).shape
                report.matrices.append(MatrixReport(block=i, name=name, shape=(m, n), rank=None, ratio=0.0,
                                                    params_before=m * n, params_after=m * n,
                                                    note="kept dense: ratio 0"))
    if calib is None:  # data-free: factorize the weights block by block, no forward pass
        for i, block in enumerate(tqdm(blocks, desc=f"compress ({method.name})", unit="block", disable=not progress)):
            if i not in dense_blocks:
                on_block(i, block, {}, None)
    else:
        walk(model, calib, on_block, propagation=method.propagation, needs=method.needs, device=device,
             batch_size=batch_size, progress=progress, desc=f"compress ({method.name})",
             skip_block=lambda i: i in dense_blocks, stack_buckets=getattr(method, "stack_buckets", None),
             stats_cache=stats_cache)
    report.matrices.sort(key=lambda e: e.block)
    report.params_after = count_parameters(model)
    report.seconds = time.perf_counter() - start
    log.info(
        "%s: %d -> %d parameters (%.1f%% of decoder-block linears removed) in %.1f s",
        method.name,
        report.params_before["total"],
        report.params_after["total"],
        100 * report.linear_ratio,
        report.seconds,
    )
    return report
