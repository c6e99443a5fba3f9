"""Many processes through `torch.distributed`: one process is the same code with a world of size 1.

Under `torchrun` (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR), `init_world(device)` joins the
process group: NCCL on GPUs (one GPU per local rank), gloo on the CPU. The work splits the way calibration
statistics allow: every statistic is a sum over windows, so each rank takes every `size`-th calibration or
evaluation window and the sums are all-reduced in float64; a block's matrices are factorized on different
ranks (greedy by cost) and broadcast, so every rank holds the same compressed block.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import signal
import sys
import threading
import time
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
            _collective("summing statistics", dist.all_reduce, t)
        return t

    def sum(self, values: Sequence[float]) -> list[float]:
        """Sum a few Python numbers over ranks, in float64."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
        _collective("summing counts", dist.all_reduce, t)
        return t.tolist()

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """`t` as rank `src` holds it, on every rank (in place)."""
        if self.active:
            _collective(f"receiving factors from rank {src}", dist.broadcast, t, src)
        return t

    def broadcast_object(self, obj, src: int):
        """A picklable Python object from rank `src` (small metadata only, e.g. a report entry)."""
        if not self.active:
            return obj
        box = [obj]
        _collective(f"receiving a decision of rank {src}", dist.broadcast_object_list, box, src,
                    device=_collective_device())
        return box[0]

    def barrier(self) -> None:
        if self.active:
            _collective("waiting for the other ranks", dist.barrier)


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
    """The launcher stops this rank (another one ended): name the rank that failed, when it left a record. Once
    the interpreter is shutting down (this rank already reported its end) leave at once and quietly: an exception
    raised inside a finalizer would only print a traceback."""
    if _exiting or sys.is_finalizing():
        _leave(signum)
    found = recorded_failure(wait_s=0.5)
    if found is not None:
        raise RankFailed(f"rank {found[0]} failed: {found[1]}")
    raise SystemExit(128 + signum)


_exiting = False


def _leave(signum: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + signum)


@atexit.register
def _mark_exiting() -> None:
    """Runs before the finalizers that module teardown triggers (atexit is last-in, first-out)."""
    global _exiting
    _exiting = True


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


_TOGETHER = threading.local()  # how deep this thread is inside `together` blocks


def _inside_together() -> bool:
    return getattr(_TOGETHER, "depth", 0) > 0


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Run a rank-local step that precedes a collective: if it fails on any rank, every rank stops after it (the
    failing rank with its own error, the others with `RankFailed` naming it), instead of the others waiting in
    the next collective for ever. A no-op in a world of size 1.

    The step must hold no collective (nor another `together`): a rank that failed early would wait in this
    block's gather while the others wait in that collective, for ever. Every collective refuses to run inside
    one, so a misplaced collective fails in the first multi-process test instead of hanging a user's job."""
    w = _WORLD
    if not w.active:
        yield
        return
    if _inside_together():
        raise RuntimeError(f"svdkit bug: together({what!r}) inside another together block")
    error = None
    _TOGETHER.depth = 1
    try:
        yield
    except Exception as e:  # every failure is reported to the other ranks, then raised here as it was
        error = e
    finally:
        _TOGETHER.depth = 0
    messages: list[str | None] = [None] * w.size
    _collective(what, dist.all_gather_object, messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise RankFailed(f"rank {rank} failed while {what}: {message}")


# --------------------------------------------------------------------------------------------- failures
# A rank that fails outside a `together` block leaves its error in the launcher's key-value store and exits
# without entering another collective. The collective the other ranks wait in then breaks (gloo: the peer's
# connection closes), or the launcher stops them (SIGTERM); either way they read the record and stop with a
# `RankFailed` line naming the rank, instead of waiting for the process-group timeout.
_FAILED_KEY = "svdkit/failed/{}"


def _store():
    """The process group's key-value store (the launcher's), or None without one."""
    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except (RuntimeError, ValueError, AttributeError):
        return None


def record_failure(message: str) -> None:
    """Leave this rank's failure where the other ranks look when a collective breaks (best effort)."""
    store = _store()
    if store is None or not _WORLD.active:
        return
    with contextlib.suppress(Exception):  # the store may be gone (launcher stopping): nothing else to do
        store.set(_FAILED_KEY.format(_WORLD.rank), message)


def recorded_failure(wait_s: float = 2.0) -> tuple[int, str] | None:
    """The first other rank that recorded a failure, and its message; waits up to `wait_s` for one to appear."""
    store = _store()
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        for r in range(_WORLD.size):
            if r == _WORLD.rank:
                continue
            with contextlib.suppress(Exception):
                if store.check([_FAILED_KEY.format(r)]):
                    return r, store.get(_FAILED_KEY.format(r)).decode(errors="replace")
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _collective(what: str, fn, *args, **kwargs):
    """Run one collective of the process group; a collective that breaks because another rank left becomes
    `RankFailed` naming that rank (from its record) instead of a backend traceback."""
    if _inside_together():
        raise RuntimeError(f"svdkit bug: a collective ({what}) inside a together block can hang every rank")
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        found = recorded_failure()
        if found is not None:
            raise RankFailed(f"rank {found[0]} failed: {found[1]}") from e
        raise RankFailed(f"another rank stopped while {what} ({type(e).__name__}: {e})") from e


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
