"""How many CPU threads the work uses, on machines other jobs share.

What made a busy machine pathological rather than merely slower was OpenMP's waiting threads spinning: a
thread that waits for the next parallel region holds a core doing nothing, so two float64 factorizations side
by side on two cores ran 26-48x slower each instead of about 2x. `prepare()` makes waiting threads sleep
(`OMP_WAIT_POLICY=PASSIVE`, unless the environment already chose) and must run before torch is imported.
`using_threads()` then sets torch's threads: a number, or `auto`, the machine's cores shared equally among the
processes torchrun started on it. `auto` does not shrink because other jobs run: with sleeping waits two jobs
share the cores, and a count chosen at start would stay small after the other job ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
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


def auto_threads(cores: int | None = None, local_procs: int | None = None) -> int:
    """Threads for one process: the cores, shared among the processes torchrun started on this machine."""
    local = local_procs if local_procs is not None else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, (machine_cores() if cores is None else cores) // max(1, local))


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
