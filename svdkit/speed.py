"""Pure rules for fast low-rank inference: hardware-friendly ranks within a parameter budget, and when a factor
pair is not faster than the dense matrix it replaces.

Both come from CPU measurements (the second is refused for any other device, where nothing was measured),
`benchmarks/lowrank_linear.py` (CPU, MKL, float32, SmolLM2 and 7B-class shapes, weights streamed
from memory as in a decode step; the machine was shared, so single figures carry +-20 %):
- Ranks that are multiples of 16 (eight AVX2 floats twice over) ran up to 1.3x faster than the ranks
  `floor((1 - R) m n / (m + n))` gives (e.g. 1536 -> 576 at R = 0.4: rank 240 against 251).
- At batch 1 (one token, a matrix-vector product bound by the bytes it reads) a pair holding 70 % of the dense
  parameters or less was faster in every shape but the smallest (576 -> 192); at 80-90 % it was a coin toss or
  slower (two calls, two passes over the activations). With many tokens (prefill, compute bound) pairs up to
  90 % of the dense parameters were faster.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError

# k (m + n) / (m n) at or below which a factor pair beat the dense matrix in the measurements above.
DECODE_MAX_FRACTION = 0.7
PREFILL_MAX_FRACTION = 0.9
# Fewer tokens than this per call count as decode (matrix-vector products, memory bound).
DECODE_TOKENS = 16


def factor_fraction(m: int, n: int, rank: int) -> float:
    """Parameters (and batch-1 bytes read) of a rank-`rank` pair as a fraction of the dense `m x n` matrix."""
    _check_shape(m, n, rank)
    return rank * (m + n) / (m * n)


def low_rank_pays(m: int, n: int, rank: int, tokens: int = 1, max_fraction: float | None = None) -> bool:
    """Whether a rank-`rank` pair `W_u (m x k) W_v (k x n)` is expected to run faster than the dense `m x n` matrix
    for calls of `tokens` tokens; `max_fraction` overrides the measured threshold (`DECODE_MAX_FRACTION` below
    `DECODE_TOKENS` tokens, else `PREFILL_MAX_FRACTION`)."""
    if tokens < 1:
        raise ConfigError(f"tokens must be >= 1, got {tokens}")
    if max_fraction is None:
        max_fraction = DECODE_MAX_FRACTION if tokens < DECODE_TOKENS else PREFILL_MAX_FRACTION
    return factor_fraction(m, n, rank) <= max_fraction


def keep_dense(
    shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], tokens: int = 1,
    max_fraction: float | None = None,
) -> list[str]:
    """Names (sorted) of the matrices whose planned rank would not be faster than dense (see `low_rank_pays`);
    `shapes` maps each name to its `(out, in)` shape."""
    _check_names(shapes, ranks)
    return sorted(name for name, rank in ranks.items()
                  if not low_rank_pays(*shapes[name], rank, tokens=tokens, max_fraction=max_fraction))


def fast_rank_limit(m: int, n: int, max_fraction: float = DECODE_MAX_FRACTION) -> int:
    """The largest rank whose `m x n` pair still holds at most `max_fraction` of the dense parameters."""
    return int(max_fraction * m * n / (m + n) + 1e-9)


def round_ranks(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], multiple: int = 16,
                limit: Mapping[str, int] | None = None) -> dict[str, int]:
    """Ranks rounded to multiples of `multiple` whose factors hold no more parameters in total than `ranks`' do.

    Each rank is first rounded down (a rank below `multiple` is kept, a rank is never above `min(out, in)`); the
    parameters this frees are then handed back one `multiple` at a time to the matrices that lost the most, as
    long as the total stays within the budget. So every rank moves by less than `multiple`, and the total
    parameter count never grows. A step is never handed back past `limit[name]`, where given. `shapes` maps each
    name to its `(out, in)` shape."""
    if multiple < 1:
        raise ConfigError(f"multiple must be >= 1, got {multiple}")
    _check_names(shapes, ranks)
    for name, rank in ranks.items():
        _check_shape(*shapes[name], rank, name=name)
    budget = sum(rank * sum(shapes[name]) for name, rank in ranks.items())
    out = {name: rank if rank < multiple else rank - rank % multiple for name, rank in ranks.items()}
    left = budget - sum(rank * sum(shapes[name]) for name, rank in out.items())
    by_loss = sorted(ranks, key=lambda name: (-(ranks[name] - out[name]) * sum(shapes[name]), name))
    for name in by_loss:
        width = sum(shapes[name])
        cap = min(shapes[name]) if limit is None or name not in limit else min(*shapes[name], limit[name])
        if out[name] == ranks[name] or out[name] + multiple > cap or multiple * width > left:
            continue
        out[name] += multiple
        left -= multiple * width
    return out


@dataclass(frozen=True)
class RankRules:
    """What `compress` does to the planned ranks for speed: with `dense_if_slower`, keep dense every matrix whose
    planned factor pair would not decode faster than it at batch 1 (`low_rank_pays`; the model then holds more
    parameters); then round the other ranks to multiples of `multiple` within their parameter budget (1: leave
    them). See `apply_rank_rules`."""

    multiple: int = 1
    dense_if_slower: bool = False
    device: str = "cpu"  # where the model will run: the speed thresholds are CPU measurements

    def __post_init__(self) -> None:
        if self.multiple < 1:
            raise ConfigError(f"multiple must be >= 1, got {self.multiple}")
        if self.dense_if_slower and self.device != "cpu":
            raise ConfigError(f"keeping slow pairs dense uses speed thresholds measured on CPUs only; on {self.device} "
                              "they are not measured: leave it off there (ranks can still be rounded)")

    @property
    def active(self) -> bool:
        return self.multiple > 1 or self.dense_if_slower


def apply_rank_rules(
    shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], rules: RankRules
) -> tuple[dict[str, int], dict[str, str]]:
    """The ranks after `rules`, and a note for each matrix the rules keep dense (it is then left out of the result).

    A planned pair that would not decode faster than its dense matrix is kept dense first; rounding then never hands
    a step back past the speed limit, so it cannot make a pair slow. `shapes` maps each name to its `(out, in)`
    shape; `ranks` holds only the matrices to factorize."""
    out, notes, limit = dict(ranks), {}, None
    if rules.dense_if_slower:
        for name in keep_dense(shapes, out, tokens=1):
            rank = out.pop(name)
            fraction = factor_fraction(*shapes[name], rank)
            notes[name] = (f"kept dense: a rank-{rank} pair holds {100 * fraction:.0f} % of the dense parameters, "
                           f"not faster at batch 1 (above {100 * DECODE_MAX_FRACTION:.0f} %)")
        limit = {name: fast_rank_limit(*shapes[name]) for name in out}
    if rules.multiple > 1:
        out = round_ranks(shapes, out, rules.multiple, limit)
    return out, notes


def _check_names(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int]) -> None:
    missing = sorted(set(ranks) - set(shapes))
    if missing:
        raise ConfigError(f"no shape given for {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}")


def _check_shape(m: int, n: int, rank: int, name: str = "matrix") -> None:
    if m < 1 or n < 1:
        raise ConfigError(f"{name}: shape must be positive, got {m} x {n}")
    if not 1 <= rank <= min(m, n):
        raise ConfigError(f"{name}: rank must be in [1, {min(m, n)}] for a {m} x {n} matrix, got {rank}")
