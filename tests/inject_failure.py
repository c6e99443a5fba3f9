"""Run the svdkit CLI with one failure injected on one rank (a driver for tests/test_rank_failures.py).

`SVDKIT_INJECT=NAME` picks the failure from `FAILURES`, `SVDKIT_INJECT_RANK` the rank it strikes; the other
ranks run unchanged. Each failure is what a real run meets: a non-finite value, a full disk, a numerical error.
"""

from __future__ import annotations

import errno
import os
import sys

import torch


def _fail(exc: Exception):
    def raiser(*_args, **_kwargs):
        raise exc

    return raiser


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


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
        cross_entropy = torch.nn.functional.cross_entropy
        svdkit.gradients.nn.functional.cross_entropy = lambda *a, **k: cross_entropy(*a, **k) * float("nan")
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
