"""Many processes through `torch.distributed`: one process is the same code with a world of size 1.

Under `torchrun` (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR), `init_world(device)` joins the
process group: NCCL on GPUs (one GPU per local rank), gloo on the CPU. The work splits the way calibration
statistics allow: every statistic is a sum over windows, so each rank takes every `size`-th calibration or
evaluation window and the sums are all-reduced in float64; a block's matrices are factorized on different
ranks (greedy by cost) and broadcast, so every rank holds the same compressed block.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import SvdkitError

log = logging.getLogger(__name__)


class RankFailed(SvdkitError, RuntimeError):
    """Another rank failed: every rank stops, each naming the rank and its error."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (`size == 1`: no process group, every operation is the identity)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Only the main rank writes files, prints tables and shows progress bars."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> list[int]:
        """The windows of `n` this rank takes: every `size`-th, starting at `rank`."""
        return list(range(self.rank, n, self.size))

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place (float64 tensors stay float64)."""
        if self.active:
            dist.all_reduce(t)
        return t

    def sum(self, values: Sequence[float]) -> list[float]:
        """Sum a few Python numbers over ranks, in float64."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """`t` as rank `src` holds it, on every rank (in place)."""
        if self.active:
            dist.broadcast(t, src)
        return t

    def broadcast_object(self, obj, src: int):
        """A picklable Python object from rank `src` (small metadata only, e.g. a report entry)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src, device=_collective_device())
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


_WORLD = World()


def world() -> World:
    """The current world (size 1 until `init_world` joined a process group)."""
    return _WORLD


def _collective_device() -> torch.device:
    """Where small collective buffers live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one rank of several (or of one)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_world(device: torch.device, timeout_s: float = 1800.0) -> tuple[World, torch.device]:
    """Join the process group when launched by torchrun; returns the world and this rank's compute device
    (`cuda` becomes `cuda:LOCAL_RANK`). Without a launcher: a world of size 1 and `device` unchanged."""
    global _WORLD
    if not launched():
        return _WORLD, device
    if not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # stopped by the launcher: unwind, clean up output
            signal.signal(signal.SIGTERM, _terminated)
    elif device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    _WORLD = World(dist.get_rank(), dist.get_world_size())
    log.info("rank %d of %d (%s, %s)", _WORLD.rank, _WORLD.size, dist.get_backend(), device)
    return _WORLD, device


def progress_bar(*args, disable: bool = False, **kwargs):
    """A tqdm bar, shown on the main rank only."""
    from tqdm.auto import tqdm

    return tqdm(*args, disable=disable or not _WORLD.main, **kwargs)


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Run a rank-local step that precedes a collective: if it fails on any rank, every rank stops after it (the
    failing rank with its own error, the others with `RankFailed` naming it), instead of the others waiting in
    the next collective for ever. A no-op in a world of size 1."""
    w = _WORLD
    if not w.active:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # every failure is reported to the other ranks, then raised here as it was
        error = e
    messages: list[str | None] = [None] * w.size
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise RankFailed(f"rank {rank} failed while {what}: {message}")


def shutdown() -> None:
    """Leave the process group (no-op in a world of size 1)."""
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def assign(costs: Sequence[float], size: int) -> list[int]:
    """Greedy bin-packing: each item (largest cost first) goes to the rank with the least work so far; returns
    the rank of every item. Deterministic, so every rank computes the same assignment."""
    load = [0.0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner
