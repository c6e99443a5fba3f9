"""Statistics set aside on disk while a block is factorized.

At LLaMA-3-8B widths one block's float64 statistics are about 10 GB (three 14,336² input Grams of `down_proj`, the
14,336² output Grams of `gate_proj` and `up_proj`), while a matrix needs only its own input group's and its own
output Gram. `Parking` keeps the others in a scratch folder (one safetensors file each) and reads each back once,
when its matrix comes, so that the host (or the device) holds one group's statistics at a time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import torch

from ._fs import Scratch
from .errors import ConfigError
from .statistics import layer_stats

_LIST = object()  # the shell of a parked list of tensors


class Parking:
    """Tensors, lists of tensors, or dataclasses holding tensors, written to a scratch folder under `parent`
    (default: the system's temporary folder) and read back once by `take`; removed by `close` (and by the next
    run, if this one is killed). Refused, before anything is written, where that disk has less than `need` bytes
    free."""

    def __init__(self, parent: str | os.PathLike | None = None, need: int = 0) -> None:
        self._dir = Scratch("spill", parent)
        self._shells: dict[str, tuple[str, Any, torch.device]] = {}
        self._written = 0  # files are numbered in the order written, never reused
        free = shutil.disk_usage(self._dir.path).free
        if free < need:
            self.close()
            raise ConfigError(f"a block's statistics ({need / 1e9:.1f} GB) are parked on disk while its matrices are "
                              f"factorized, and {self._dir.path.parent} has {free / 1e9:.1f} GB free: point --scratch "
                              f"at a larger disk, or keep them in memory with SVDKIT_PARK_BYTES={need + 1}")

    def __contains__(self, key: str) -> bool:
        return key in self._shells

    def put(self, key: str, obj: torch.Tensor | Any) -> None:
        """Write `obj` (a tensor, a list of tensors, or a dataclass whose tensor fields are written) to disk; the
        caller drops it."""
        from safetensors.torch import save_file

        if key in self._shells:
            raise KeyError(f"svdkit bug: {key!r} is already parked")
        if isinstance(obj, torch.Tensor):
            tensors, shell, device = {"t": obj}, None, obj.device
        elif isinstance(obj, list):
            tensors, shell = {str(b): t for b, t in enumerate(obj)}, _LIST
            device = obj[0].device if obj else torch.device("cpu")
        else:
            tensors = {f.name: v for f in dataclasses.fields(obj)
                       if isinstance(v := getattr(obj, f.name), torch.Tensor)}
            shell = dataclasses.replace(obj, **dict.fromkeys(tensors))  # the other fields, without the tensors
            device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        path = os.path.join(self._dir.path, f"{self._written}.safetensors")
        self._written += 1
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)
        self._shells[key] = (path, shell, device)

    def take(self, key: str) -> torch.Tensor | Any:
        """Read back what `put(key, ...)` wrote, on its device, and delete the file."""
        from safetensors.torch import load_file

        path, shell, device = self._shells.pop(key)
        tensors = {k: v.to(device) for k, v in load_file(path).items()}
        os.remove(path)
        if shell is None:
            return tensors["t"]
        if shell is _LIST:
            return [tensors[str(b)] for b in range(len(tensors))]
        return dataclasses.replace(shell, **tensors)

    def close(self) -> None:
        self._shells.clear()
        self._dir.cleanup()


class PendingStatistics:
    """One block's statistics that its factorization has yet to use: the input groups' accumulators (by the group's
    representative linear; `stats`, the walk's own dict, is emptied as they are handed out, so that nothing else
    keeps them) and the output Grams (by full name). Only the groups in `wanted` are kept (with several ranks, a
    rank needs those of its own matrices); with a `parking`, they wait on disk until asked for. `group(rep)`
    builds a group's `LayerStats` once (its linears share its whitenings) until `release(rep)`."""

    def __init__(self, stats: dict | None, wanted: set, parking: Parking | None) -> None:
        self.stats = stats if stats is not None else {}
        self.parking = parking
        self.grams: dict[str, torch.Tensor] = {}
        self.live: dict[str, Any] = {}
        for rep in list(self.stats):
            if rep not in wanted:
                del self.stats[rep]
            elif parking is not None:
                parking.put(f"group:{rep}", self.stats.pop(rep))

    def add_grams(self, grams: dict[str, torch.Tensor], wanted: set[str]) -> None:
        """Take the output Grams of the matrices `wanted` and drop the others (the dict is emptied, for the same
        reason as `stats`)."""
        for full in list(grams):
            if full not in wanted:
                del grams[full]
            elif self.parking is not None:
                self.parking.put(f"gram:{full}", grams.pop(full))
            else:
                self.grams[full] = grams.pop(full)

    def group(self, rep: str | None):
        """The `LayerStats` of the input group `rep`, or None where there are none (data-free methods)."""
        if rep is not None and rep not in self.live:
            acc = self._take(f"group:{rep}", self.stats, rep)
            if acc is None:
                return None
            self.live[rep] = layer_stats(acc)
        return self.live.get(rep)

    def out_gram(self, full: str) -> torch.Tensor:
        """The output Gram of the matrix `full`, handed over (not kept)."""
        return self._take(f"gram:{full}", self.grams, full)

    def _take(self, key: str, memory: dict, name: str):
        if self.parking is not None and key in self.parking:
            return self.parking.take(key)
        return memory.pop(name, None)

    def release(self, rep: str | None) -> None:
        """Drop the group `rep`'s statistics: its last linear is factorized."""
        self.live.pop(rep, None)
        self.stats.pop(rep, None)

    def close(self) -> None:
        self.stats.clear()
        self.grams.clear()
        self.live.clear()
        if self.parking is not None:
            self.parking.close()
