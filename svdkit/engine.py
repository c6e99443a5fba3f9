"""The layer-by-layer loop: capture the first block's inputs, walk the blocks, gather statistics with
hooks, let a method factorize each linear, swap in `LowRankLinear`, pass the outputs on.

Only the current block and its calibration activations live on the compute device. Two activation
streams exist: `dense` (outputs of the uncompressed model) and `compressed` (outputs of the blocks
already compressed); a method's propagation mode and needs decide which are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .linalg import accumulate_gram, check_finite
from .models import block_linears, find_blocks

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are stored."""


@dataclass
class BlockInputs:
    """Positional/keyword arguments a block receives besides its hidden states, one entry per batch."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_inputs(
    model: nn.Module, calib: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[list[torch.Tensor], BlockInputs]:
    """Run the model up to its first decoder block and keep that block's inputs, batch by batch."""
    _, blocks = find_blocks(model)
    hidden: list[torch.Tensor] = []
    extra = BlockInputs()

    def hook(_module, args, kwargs):
        if args:
            hidden.append(args[0].to(device))
            extra.args.append(_to(args[1:], device))
        else:
            hidden.append(kwargs["hidden_states"].to(device))
            extra.args.append(())
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        extra.kwargs.append(_to(kwargs, device))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(calib[i : i + batch_size].to(model_device(model)), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden, extra


def run_block(block: nn.Module, x: torch.Tensor, extra: BlockInputs, i: int) -> torch.Tensor:
    out = block(x, *extra.args[i], **extra.kwargs[i])
    return out[0] if isinstance(out, (tuple, list)) else out


# --------------------------------------------------------------------------------------------- statistics
@torch.no_grad()
def input_groups(block: nn.Module, x: torch.Tensor, extra: BlockInputs) -> dict[str, str]:
    """Map each linear of the block to a representative linear that receives the same input tensor.

    Found by running the block once and comparing input tensors (q/k/v share one, gate/up share one),
    so one Gram matrix serves each unique input whatever the architecture.
    """
    linears = block_linears(block)
    seen: dict[str, torch.Tensor] = {}  # holding the tensors keeps their ids unique (no address reuse)

    def record(name: str):
        def hook(_module, args) -> None:  # a pre-hook must return None, or it replaces the inputs
            seen.setdefault(name, args[0])

        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in linears.items()]
    try:
        run_block(block, x[:1], _first_only(extra), 0)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in linears if n not in seen]
    if missing:
        raise RuntimeError(f"linears {missing} were not called by the block's forward; cannot compress them")
    rep: dict[int, str] = {}
    return {name: rep.setdefault(id(seen[name]), name) for name in linears}


def _first_only(extra: BlockInputs, size: int = 1) -> BlockInputs:
    """Block arguments of the first batch cut to `size` samples (batch dimension sliced where it exists)."""

    def cut(obj):
        if isinstance(obj, torch.Tensor) and obj.dim() >= 2 and obj.shape[0] > size:
            return obj[:size]
        if isinstance(obj, tuple):
            return tuple(cut(o) for o in obj)
        return obj

    return BlockInputs([cut(extra.args[0])], [{k: cut(v) for k, v in extra.kwargs[0].items()}])


def stack_of_batch(x: list[torch.Tensor], extra: BlockInputs, buckets: int, seed: int = 0
                   ) -> tuple[list[torch.Tensor], BlockInputs]:
    """AdaSVD's stack-of-batch: shuffle the calibration sequences and average them element-wise into
    `buckets` sequences (each the mean of about N / buckets), batched as before."""
    seqs = torch.cat(x)
    if not 1 <= buckets <= seqs.shape[0]:
        raise ValueError(f"stack-of-batch needs 1 <= buckets <= {seqs.shape[0]} calibration windows, got {buckets}")
    perm = torch.randperm(seqs.shape[0], generator=torch.Generator().manual_seed(seed)).to(seqs.device)
    stacked = torch.stack([chunk.mean(dim=0) for chunk in seqs[perm].chunk(buckets)])
    size = x[0].shape[0]
    out, new_extra = list(stacked.split(size)), BlockInputs()
    for t in out:
        cut = _first_only(extra, t.shape[0])
        new_extra.args.append(cut.args[0])
        new_extra.kwargs.append(cut.kwargs[0])
    return out, new_extra


@dataclass
class GroupAccumulator:
    """Running statistics of one unique input: Gram matrices in float64, mean |x|, token count."""

    gram: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0
    gram_c: torch.Tensor | None = None
    cross: torch.Tensor | None = None


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
    dense: list[torch.Tensor] | None,
    comp: list[torch.Tensor] | None,
    extra: BlockInputs,
    gram_from: str,
    needs: frozenset[str],
) -> tuple[dict[str, GroupAccumulator], list[torch.Tensor] | None]:
    """One pass of the (still dense) block over the stream(s); returns statistics per representative
    linear and the block's outputs on the dense stream (the next block's dense inputs)."""
    linears = block_linears(block)
    reps = sorted(set(groups.values()), key=list(linears).index)
    captured: dict[str, torch.Tensor] = {}
    handles = [
        linears[r].register_forward_pre_hook(lambda _m, a, r=r: captured.__setitem__(r, a[0].detach())) for r in reps
    ]
    acc: dict[str, GroupAccumulator] = {}
    dense_out: list[torch.Tensor] | None = [] if dense is not None else None
    try:
        nb = len(dense if dense is not None else comp)
        for b in range(nb):
            x_in = xc_in = None
            if dense is not None:
                captured.clear()
                dense_out.append(run_block(block, dense[b], extra, b))
                x_in = dict(captured)
            if comp is not None:
                captured.clear()
                run_block(block, comp[b], extra, b)
                xc_in = dict(captured)
            for r in reps:
                primary = (x_in if gram_from == "dense" else xc_in)[r]
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
    for r, a in acc.items():
        check_finite(a.gram, f"Gram matrix of {r}")
    return acc, dense_out


class StatsCache:
    """One-shot statistics of the dense stream (Gram matrices, |x| sums, input groups) for every block,
    shared by the methods and ratios of a sweep and optionally persisted as a safetensors file."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.blocks: dict[int, tuple[dict[str, str], dict[str, GroupAccumulator]]] = {}
        if self.path is not None and self.path.exists():
            self._read()

    def complete(self, n_blocks: int) -> bool:
        return all(i in self.blocks for i in range(n_blocks))

    def put(self, i: int, groups: dict[str, str], stats: dict[str, GroupAccumulator]) -> None:
        self.blocks[i] = (dict(groups), {r: GroupAccumulator(a.gram.cpu(), a.abs_sum.cpu(), a.tokens)
                                         for r, a in stats.items()})

    def get(self, i: int, device: torch.device) -> tuple[dict[str, str], dict[str, GroupAccumulator]]:
        groups, stats = self.blocks[i]
        return groups, {
            r: GroupAccumulator(a.gram.to(device), a.abs_sum.to(device), a.tokens) for r, a in stats.items()
        }

    def save(self) -> None:
        """Write the cache atomically (a temporary file renamed into place)."""
        from safetensors.torch import save_file

        if self.path is None:
            raise ValueError("this StatsCache has no path to save to")
        tensors, meta = {}, {}
        for i, (groups, stats) in self.blocks.items():
            meta[str(i)] = {"groups": groups, "tokens": {r: a.tokens for r, a in stats.items()}}
            for r, a in stats.items():
                tensors[f"{i}/{r}/gram"] = a.gram.contiguous()
                tensors[f"{i}/{r}/abs_sum"] = a.abs_sum.contiguous()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".partial")
        save_file(tensors, str(tmp), metadata={"svdkit_stats": json.dumps(meta)})
        os.replace(tmp, self.path)

    def _read(self) -> None:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = json.loads(f.metadata()["svdkit_stats"])
            for i, entry in meta.items():
                stats = {r: GroupAccumulator(f.get_tensor(f"{i}/{r}/gram"), f.get_tensor(f"{i}/{r}/abs_sum"), t)
                         for r, t in entry["tokens"].items()}
                self.blocks[int(i)] = (entry["groups"], stats)


def stats_key(model: nn.Module, calib: torch.Tensor) -> str:
    """A cache key for one-shot statistics: the model's identity and the exact calibration tokens."""
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "name_or_path", "")).encode())
    h.update(str(sum(p.numel() for p in model.parameters())).encode())
    h.update(str(next(model.parameters()).dtype).encode())
    h.update(calib.cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


# --------------------------------------------------------------------------------------------- the walk
BlockFn = Callable[[int, nn.Module, dict[str, str], dict[str, GroupAccumulator]], None]


@torch.no_grad()
def walk(
    model: nn.Module,
    calib: torch.Tensor,
    on_block: BlockFn,
    *,
    propagation: str = "original",
    needs: frozenset[str] = frozenset(),
    device: torch.device | str | None = None,
    batch_size: int = 8,
    skip_block: Callable[[int], bool] | None = None,
    stack_buckets: int | None = None,
    stats_cache: StatsCache | None = None,
    progress: bool = True,
    desc: str = "blocks",
) -> None:
    """Walk the decoder blocks with calibration statistics; `on_block(i, block, groups, stats)` may swap
    the block's linears in place. Blocks for which `skip_block(i)` is true are only propagated.

    With a `stats_cache`, one-shot statistics (original stream, nothing else needed) are stored on the
    first walk and reused by later ones, which then run no forward pass at all.
    """
    _, blocks = find_blocks(model)
    device = torch.device(device) if device is not None else model_device(model)
    cacheable = stats_cache is not None and propagation == "original" and not stack_buckets and not (
        needs & {"gram_c", "cross"})
    if cacheable and stats_cache.complete(len(blocks)):
        for i, block in enumerate(tqdm(blocks, desc=f"{desc}, cached statistics", unit="block", disable=not progress)):
            if skip_block is not None and skip_block(i):
                continue
            home = next(block.parameters()).device
            block.to(device)
            groups, stats = stats_cache.get(i, device)
            on_block(i, block, groups, stats)
            block.to(home)
        return
    x, extra = capture_inputs(model, calib, batch_size, device)
    if stack_buckets:
        x, extra = stack_of_batch(x, extra, stack_buckets)
    two_streams = bool(needs & {"gram_c", "cross"})
    dense = x if (propagation == "original" or two_streams) else None
    comp = [t.clone() for t in x] if (propagation == "sequential" or two_streams) else None
    gram_from = "dense" if propagation == "original" else "comp"
    for i, block in enumerate(tqdm(blocks, desc=desc, unit="block", disable=not progress)):
        home = next(block.parameters()).device
        block.to(device)
        if skip_block is not None and skip_block(i):
            dense = [run_block(block, t, extra, b) for b, t in enumerate(dense)] if dense is not None else None
            comp = [run_block(block, t, extra, b) for b, t in enumerate(comp)] if comp is not None else None
        else:
            groups = input_groups(block, (dense or comp)[0], extra)
            stats, dense_out = block_statistics(block, groups, dense, comp, extra, gram_from, needs)
            if cacheable:
                stats_cache.put(i, groups, stats)
            on_block(i, block, groups, stats)
            if comp is not None:
                comp = [run_block(block, t, extra, b) for b, t in enumerate(comp)]
            dense = dense_out
        block.to(home)
