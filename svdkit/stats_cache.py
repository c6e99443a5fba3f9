"""The statistics cache: one-shot statistics of the original stream (Gram matrices, |x| sums, input groups) and
other per-block sets (the gradient pass's output gradients), one safetensors file per block, written atomically
as each block is done and read back one block at a time, so that a sweep computes them once for every method and
ratio. `stats_key` names a cache by the model, its weights' version, the dtypes and the exact tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .blocks import Blocks, StreamedModel
from .statistics import GroupAccumulator
from .stream import as_blocks


class StatsCache:
    """One-shot statistics of the original stream (Gram matrices, |x| sums, input groups), shared by the
    methods and ratios of a sweep. With a `path` (a folder) each block is written to its own safetensors
    file as soon as it is computed and read back one block at a time; without one it stays in memory.
    Further per-block statistics of the same calibration data (K-FAC's output-gradient Grams) are kept by name
    beside them, one file per block in a subfolder (`put_set`, `get_set`)."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.blocks: dict[int, tuple[dict[str, str], dict[str, GroupAccumulator]]] = {}
        self.sets: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # per-block statistics by name (no folder)

    def _file(self, i: int) -> Path:
        return self.path / f"block-{i:05d}.safetensors"

    def has(self, i: int) -> bool:
        return self._file(i).exists() if self.path is not None else i in self.blocks

    def complete(self, n_blocks: int) -> bool:
        return all(self.has(i) for i in range(n_blocks))

    def put(self, i: int, groups: dict[str, str], stats: dict[str, GroupAccumulator]) -> None:
        """Store block `i` (written at once, atomically, when the cache has a folder)."""
        if self.path is None:
            self.blocks[i] = (dict(groups), {r: GroupAccumulator(a.gram.cpu(), a.abs_sum.cpu(), a.tokens)
                                             for r, a in stats.items()})
            return
        tensors = {}
        for r, a in stats.items():
            tensors[f"{r}/gram"] = a.gram.detach().cpu().contiguous()
            tensors[f"{r}/abs_sum"] = a.abs_sum.detach().cpu().contiguous()
        meta = {"groups": groups, "tokens": {r: a.tokens for r, a in stats.items()}}
        _save_atomic(tensors, self._file(i), {"svdkit_stats": json.dumps(meta)})

    def get(self, i: int, device: torch.device) -> tuple[dict[str, str], dict[str, GroupAccumulator]]:
        """Block `i`'s input groups and statistics, on `device`."""
        if self.path is None:
            groups, stats = self.blocks[i]
            return groups, {r: GroupAccumulator(a.gram.to(device), a.abs_sum.to(device), a.tokens)
                            for r, a in stats.items()}
        from safetensors import safe_open

        with safe_open(str(self._file(i)), framework="pt", device=str(device)) as f:
            meta = json.loads(f.metadata()["svdkit_stats"])
            stats = {r: GroupAccumulator(f.get_tensor(f"{r}/gram"), f.get_tensor(f"{r}/abs_sum"), t)
                     for r, t in meta["tokens"].items()}
        return meta["groups"], stats

    def _set_file(self, name: str, i: int) -> Path:
        return self.path / name / f"block-{i:05d}.safetensors"

    def has_set(self, name: str, n_blocks: int) -> bool:
        """Whether per-block statistics `name` (e.g. output-gradient Grams) are stored for all `n_blocks` blocks."""
        if self.path is None:
            return len(self.sets.get(name, {})) == n_blocks
        return all(self._set_file(name, i).exists() for i in range(n_blocks))

    def put_set(self, name: str, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Store block `i`'s part of statistics `name` (host copies; written atomically with a folder)."""
        host = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if self.path is None:
            self.sets.setdefault(name, {})[i] = host
            return
        _save_atomic(host, self._set_file(name, i))

    def get_set(self, name: str, i: int) -> dict[str, torch.Tensor]:
        """Block `i`'s part of statistics `name`, on the host."""
        if self.path is None:
            return dict(self.sets[name][i])
        from safetensors.torch import load_file

        return load_file(str(self._set_file(name, i)))


def _save_atomic(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file under a temporary name, then rename it: readers see all of it or none."""
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".partial-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, file)


def stats_key(model: nn.Module | StreamedModel | Blocks, calib: torch.Tensor) -> str:
    """A cache key for one-shot statistics: the model's identity and its weights' version, the compute dtype and
    the exact tokens."""
    blocks = as_blocks(model)
    h = hashlib.sha256()
    h.update(str(getattr(blocks.model.config, "name_or_path", "")).encode())
    h.update(str(sum(p.numel() for p in blocks.model.parameters())).encode())
    h.update(f"{blocks.storage_dtype}/{blocks.compute_dtype}".encode())
    _hash_weights(h, blocks)
    h.update(calib.cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def _hash_weights(h, blocks: Blocks) -> None:
    """Add what changes when the weights do: for a checkpoint on disk each tensor file's name, size and
    modification time (a checkpoint rewritten in place at the same path gets new ones); for a model in memory,
    the bytes of its parameters."""
    if blocks.streamed is not None:
        index = blocks.streamed.index
        for f in sorted({*index.files.values(), index.checkpoint}):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return
    for p in blocks.model.parameters():
        if not p.is_meta:
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
