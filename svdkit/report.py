"""What a compression run reports: per matrix, per block and for the whole model; JSON-ready."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field


def fmt_ppl(x: float | None) -> str:
    """A perplexity for tables: two decimals below 10^4, three significant digits above (the collapsed ones)."""
    if x is None or not math.isfinite(x):
        return "nan"
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


@dataclass
class MatrixReport:
    """One linear: shape `m x n`, rank kept (None: left dense), parameters, calibration output error."""

    block: int
    name: str
    shape: tuple[int, int]
    rank: int | None
    ratio: float
    params_before: int
    params_after: int
    rel_error: float | None = None  # ||(W - W')X|| / ||W X|| on the calibration stream
    # whitened truncation: sqrt(sum_{i>k} s_i^2 / sum s_i^2), which equals rel_error; None where an update
    # changed the factors after the truncation (adaComp, svdllm-update: info["sigma_tail_before_update"])
    sigma_tail: float | None = None
    seconds: float = 0.0
    note: str = ""
    info: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class RunReport:
    """The base of the run reports (compression, quantization): the config that produced the run, its
    calibration data, one entry per matrix and the wall time; `to_dict` is what `save_json` writes."""

    config: dict
    calibration: dict
    matrices: list = field(default_factory=list)
    seconds: float = 0.0

    def matrix_dicts(self) -> list[dict]:
        """The per-matrix entries as plain dicts."""
        return [asdict(m) for m in self.matrices]

    def to_dict(self) -> dict:
        """The JSON-ready report."""
        raise NotImplementedError

    def save_json(self, path: str | os.PathLike) -> None:
        """Write `to_dict()` to `path` as JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)


@dataclass(kw_only=True)
class Report(RunReport):
    """A compression run: the method and recipe that produced it and what each matrix became."""

    method: str
    matrices: list[MatrixReport] = field(default_factory=list)
    params_before: dict = field(default_factory=dict)
    params_after: dict = field(default_factory=dict)
    perplexity: dict = field(default_factory=dict)  # filled by callers that evaluate the result
    extra: dict = field(default_factory=dict)

    def blocks(self) -> list[dict]:
        """Totals per decoder block: parameters before/after and the mean relative error."""
        agg: dict[int, dict] = defaultdict(lambda: {"params_before": 0, "params_after": 0, "errors": []})
        for m in self.matrices:
            a = agg[m.block]
            a["params_before"] += m.params_before
            a["params_after"] += m.params_after
            if m.rel_error is not None and math.isfinite(m.rel_error):
                a["errors"].append(m.rel_error)
        out = []
        for b in sorted(agg):
            a = agg[b]
            errs = a.pop("errors")
            out.append({"block": b, **a, "mean_rel_error": sum(errs) / len(errs) if errs else None})
        return out

    @property
    def linear_ratio(self) -> float:
        """Fraction of the decoder-block linears' parameters removed."""
        before = sum(m.params_before for m in self.matrices)
        return 1.0 - sum(m.params_after for m in self.matrices) / before if before else 0.0

    def to_dict(self) -> dict:
        """The JSON-ready report: totals, per-block summaries and every matrix."""
        return {
            "method": self.method,
            "config": self.config,
            "calibration": self.calibration,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "linear_ratio_removed": self.linear_ratio,
            "seconds": self.seconds,
            "perplexity": self.perplexity,
            "extra": self.extra,
            "blocks": self.blocks(),
            "matrices": self.matrix_dicts(),
        }
