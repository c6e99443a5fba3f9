"""Calibration statistics of one block: which linears read the same input (`input_groups`: one Gram matrix,
and one whitening, per unique input), and one pass of the dense block over the stream(s) that accumulates each
input's Gram matrix in float64 from float32 products (`block_statistics`), all-reduced across processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .dist import together, world
from .layout import ModelError, block_linears
from .linalg import accumulate_gram, check_finite, no_tf32
from .methods.base import LayerStats
from .stream import BlockInputs, Stream, first_only, run_block


def shared_inputs(modules: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, str]:
    """Map each of `modules` that `run()` calls to a representative module that received the same input tensor
    (the first of them in `modules`' order); modules never called are left out."""
    seen: dict[str, torch.Tensor] = {}  # holding the tensors keeps their ids unique (no address reuse)

    def record(name: str):
        def hook(_module, args) -> None:  # a pre-hook must return None, or it replaces the inputs
            seen.setdefault(name, args[0])

        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in modules.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    rep: dict[int, str] = {}
    return {name: rep.setdefault(id(seen[name]), name) for name in modules if name in seen}


@torch.no_grad()
def input_groups(block: nn.Module, x: torch.Tensor, extra: BlockInputs) -> dict[str, str]:
    """Map each linear of the block to a representative linear that receives the same input tensor.

    Found by running the block once and comparing input tensors (q/k/v share one, gate/up share one),
    so one Gram matrix (and one whitening) serves each unique input whatever the architecture.
    """
    linears = block_linears(block)
    groups = shared_inputs(linears, lambda: run_block(block, x[:1], first_only(extra), 0))
    missing = [n for n in linears if n not in groups]
    if missing:
        raise ModelError(f"linears {missing} were not called by the block's forward; cannot compress them")
    return groups


@dataclass
class GroupAccumulator:
    """Running statistics of one unique input: Gram matrices in float64, sum of |x|, token count."""

    gram: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0
    gram_c: torch.Tensor | None = None
    cross: torch.Tensor | None = None


def layer_stats(acc: GroupAccumulator) -> LayerStats:
    """The method-facing statistics of one input group."""
    return LayerStats(gram=acc.gram, tokens=acc.tokens, abs_mean=acc.abs_sum / max(acc.tokens, 1),
                      gram_c=acc.gram_c, cross=acc.cross)


def _new_accumulator(n: int, device: torch.device, needs: frozenset[str]) -> GroupAccumulator:
    def zeros() -> torch.Tensor:
        return torch.zeros(n, n, dtype=torch.float64, device=device)

    return GroupAccumulator(
        zeros(),
        torch.zeros(n, dtype=torch.float64, device=device),
        gram_c=zeros() if "gram_c" in needs else None,
        cross=zeros() if "cross" in needs else None,
    )


@torch.no_grad()
def block_statistics(
    block: nn.Module,
    groups: dict[str, str],
    original: Stream | None,
    compressed: Stream | None,
    stream: str,
    needs: frozenset[str],
) -> tuple[dict[str, GroupAccumulator], Stream | None]:
    """One pass of the (still dense) block over the stream(s); returns statistics per representative
    linear (`gram` from `stream`, `original` or `compressed`; `gram_c` and `cross` when needed) and the
    block's outputs on the original stream (the next block's original inputs)."""
    linears = block_linears(block)
    reps = sorted(set(groups.values()), key=list(linears).index)
    captured: dict[str, torch.Tensor] = {}
    handles = [
        linears[r].register_forward_pre_hook(lambda _m, a, r=r: captured.__setitem__(r, a[0].detach())) for r in reps
    ]
    acc: dict[str, GroupAccumulator] = {}
    out: list[torch.Tensor] | None = [] if original is not None else None
    ref = original if original is not None else compressed
    try:
        with together("gathering calibration statistics"), no_tf32():
            for b in range(len(ref)):
                x_in = xc_in = None
                if original is not None:
                    captured.clear()
                    out.append(original.output(block, b).to(original.store))
                    x_in = dict(captured)
                if compressed is not None:
                    captured.clear()
                    compressed.output(block, b)
                    xc_in = dict(captured)
                for r in reps:
                    primary = (x_in if stream == "original" else xc_in)[r]
                    n = primary.shape[-1]
                    if r not in acc:
                        acc[r] = _new_accumulator(n, primary.device, needs)
                    a = acc[r]
                    accumulate_gram(a.gram, primary)
                    a.abs_sum += primary.reshape(-1, n).float().abs().sum(0).double()
                    a.tokens += primary.reshape(-1, n).shape[0]
                    if a.gram_c is not None:
                        accumulate_gram(a.gram_c, xc_in[r])
                    if a.cross is not None:
                        accumulate_gram(a.cross, xc_in[r], x_in[r])  # sum_t xc_t x_t^T = X' X^T
    finally:
        for h in handles:
            h.remove()
    w = world()
    for r in reps:  # sums over windows: add up every rank's share (same order of groups on every rank)
        a = acc[r]
        for t in (a.gram, a.abs_sum, a.gram_c, a.cross):
            if t is not None:
                w.all_reduce(t)
        a.tokens = int(w.sum([a.tokens])[0])
        check_finite(a.gram, f"Gram matrix of {r}")
    new = None
    if original is not None:
        new = Stream(out, original.extra, original.device, original.store, original.tuple_output)
    return acc, new
