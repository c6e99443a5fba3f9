"""Run the svdkit CLI with one failure injected on one rank (a driver for tests/test_rank_failures.py).

`SVDKIT_INJECT=NAME` picks the failure (see `_inject`), `SVDKIT_INJECT_RANK` the rank it strikes, and
`SVDKIT_INJECT_STAMP` names a file that gets the time it first strikes; the other ranks run unchanged. Each
failure is what a real run meets: a non-finite value, a full disk, a numerical error.
"""

from __future__ import annotations

import errno
import os
import sys
import time

import torch


def _stamp() -> None:
    """Record when the failure first strikes (`SVDKIT_INJECT_STAMP`), so the test times the stop, not the start."""
    path = os.environ.get("SVDKIT_INJECT_STAMP")
    if path and not os.path.exists(path):
        with open(path, "w") as f:
            f.write(repr(time.time()))


def _fail(exc: Exception):
    def raiser(*_args, **_kwargs):
        _stamp()
        raise exc

    return raiser


def _disk_full(*_args, **_kwargs):
    _stamp()
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def _nan_loss(cross_entropy):
    def poisoned(*args, **kwargs):
        _stamp()
        return cross_entropy(*args, **kwargs) * float("nan")

    return poisoned


def _inject(name: str) -> None:
    import safetensors.torch

    import svdkit.gradients
    import svdkit.io
    import svdkit.methods.svdllm
    import svdkit.output_grams
    import svdkit.parking
    import svdkit.statistics
    import svdkit.stats_cache
    from svdkit.errors import ConfigError
    from svdkit.linalg import NumericalError

    if name == "statistics":  # a Gram matrix that cannot be gathered on this rank
        svdkit.statistics.accumulate_gram = _fail(NumericalError("non-finite activations (injected)"))
    elif name == "stats-cache":  # the statistics cache's disk fills up (only the main rank writes it)
        safetensors.torch.save_file = _disk_full
    elif name == "nonfinite-loss":  # the gradient pass's loss is not finite on this rank's windows
        svdkit.gradients.nn.functional.cross_entropy = _nan_loss(torch.nn.functional.cross_entropy)
    elif name == "gram-write":  # writing the gradients the output-gradient Grams come from fails
        svdkit.stats_cache.StatsCache.put_set = _fail(OSError(errno.ENOSPC, "No space left on device (injected)"))
    elif name == "disk-check":  # only this rank finds its disk too small for the Grams
        svdkit.output_grams.check_space = _fail(ConfigError("the output-gradient Gram matrices need 1 TB (injected)"))
    elif name == "park-write":  # parking a block's statistics on disk fails on this rank (every block parks)
        os.environ["SVDKIT_PARK_BYTES"] = "0"
        svdkit.parking.Parking.put = _fail(OSError(errno.ENOSPC, "No space left on device (injected)"))
    elif name == "factorization":
        svdkit.methods.svdllm.SVDLLM.factorize = _fail(NumericalError("singular matrix (injected)"))
    elif name == "finish":  # the last files of the output folder cannot be written
        svdkit.io.FolderWriter.finish = _fail(OSError(errno.ENOSPC, "No space left on device (injected)"))
    else:
        raise SystemExit(f"unknown failure {name!r}")


if __name__ == "__main__":
    if os.environ["RANK"] == os.environ["SVDKIT_INJECT_RANK"]:
        _inject(os.environ["SVDKIT_INJECT"])
    from svdkit.cli import main

    sys.exit(main(sys.argv[1:]))
