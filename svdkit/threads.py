"""How many CPU threads the work uses, on machines other jobs share.

Two habits of the math libraries make a busy machine pathological rather than merely slower: OpenMP's worker
threads spin while they wait for work (they hold a core doing nothing), and every process starts as many
threads as the machine has cores. Two float64 factorizations side by side on two cores then ran 26-48x
slower each instead of about 2x. `prepare()` makes waiting threads sleep (`OMP_WAIT_POLICY=PASSIVE`, unless
the environment already chose) and must run before torch is imported; `using_threads()` then takes the cores
that are actually free (those no other process keeps running now), or an equal share of the machine among the
processes torchrun started on it together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


def prepare() -> None:
    """Let idle OpenMP threads sleep instead of spinning; read by the OpenMP runtime when torch loads it."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def machine_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores(samples: int = 3, interval: float = 0.03) -> float:
    """Threads other processes keep running now: the median over a few samples of the kernel's count of running
    threads (`/proc/stat`, less this one); the 1-minute load average where that is not available, which lags."""
    counts = []
    try:
        for i in range(samples):
            with open("/proc/stat", encoding="ascii") as f:
                counts += [int(line.split()[1]) - 1 for line in f if line.startswith("procs_running")]
            if i + 1 < samples:
                time.sleep(interval)
    except (OSError, ValueError, IndexError):
        counts = []
    if counts:
        return float(statistics.median(counts))
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def free_cores(cores: int | None = None, busy: float | None = None) -> int:
    """Cores not already kept busy by other work (at least one)."""
    cores = machine_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    return max(1, min(cores, cores - int(busy + 0.5)))


def auto_threads(cores: int | None = None, busy: float | None = None, local_procs: int | None = None) -> int:
    """Threads for one process: the free cores, shared among the processes torchrun started on this machine
    (which start at once, so each counts the others as busy only by chance: the share is taken of all cores)."""
    local = local_procs if local_procs is not None else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local > 1:
        return max(1, (machine_cores() if cores is None else cores) // local)
    return free_cores(cores, busy)


@contextlib.contextmanager
def using_threads(spec: str | int = "auto") -> Iterator[int]:
    """torch's intra-op threads inside the block: a number, or `auto` (`auto_threads`); the previous setting comes
    back afterwards (the command line may run inside a longer-lived process, such as a test)."""
    import torch

    n = auto_threads() if spec == "auto" else int(spec)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    log.info("%d CPU thread(s) of %d cores (OMP_WAIT_POLICY=%s)", n, machine_cores(),
             os.environ.get("OMP_WAIT_POLICY", "unset"))
    try:
        yield n
    finally:
        torch.set_num_threads(previous)
