"""Rank rounding keeps the parameter budget; the keep-dense rule follows its thresholds."""

import math
import random

import pytest

from svdkit.speed import (
    DECODE_MAX_FRACTION,
    PREFILL_MAX_FRACTION,
    factor_fraction,
    keep_dense,
    low_rank_pays,
    round_ranks,
)


def smollm2_plan(ratio: float, layers: int = 30) -> tuple[dict, dict]:
    """SmolLM2-135M's block linears and their ranks at `ratio`: floor((1 - R) m n / (m + n))."""
    kinds = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
             "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    shapes = {f"l{i}.{k}": s for i in range(layers) for k, s in kinds.items()}
    ranks = {name: math.floor((1 - ratio) * m * n / (m + n)) for name, (m, n) in shapes.items()}
    return shapes, ranks


def params(shapes, ranks):
    return sum(r * sum(shapes[name]) for name, r in ranks.items())


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("multiple", [8, 16, 64])
def test_round_ranks_are_multiples_within_the_budget(ratio, multiple):
    shapes, ranks = smollm2_plan(ratio)
    out = round_ranks(shapes, ranks, multiple)
    assert set(out) == set(ranks)
    assert all(r % multiple == 0 or r == ranks[n] < multiple for n, r in out.items())  # below one step: kept
    assert all(abs(out[n] - ranks[n]) < multiple for n in ranks)
    budget, used = params(shapes, ranks), params(shapes, out)
    assert used <= budget
    # What is left over cannot buy one more step for any matrix that was rounded down.
    assert budget - used < multiple * max(sum(shapes[n]) for n in ranks)


def test_round_ranks_random_plans_never_exceed_the_budget():
    rng = random.Random(0)
    for _ in range(50):
        shapes = {f"m{i}": (rng.randint(1, 300), rng.randint(1, 300)) for i in range(rng.randint(1, 12))}
        ranks = {n: rng.randint(1, min(s)) for n, s in shapes.items()}
        out = round_ranks(shapes, ranks, 16)
        assert params(shapes, out) <= params(shapes, ranks)
        for n, r in out.items():
            assert 1 <= r <= min(shapes[n])
            assert r % 16 == 0 or r == ranks[n]  # only a rank below 16 (or one that cannot move) stays as is


def test_round_ranks_rejects_bad_input():
    with pytest.raises(ValueError, match="no shape given for b"):
        round_ranks({"a": (4, 4)}, {"a": 2, "b": 2})
    with pytest.raises(ValueError, match=r"rank must be in \[1, 4\]"):
        round_ranks({"a": (4, 8)}, {"a": 5})
    with pytest.raises(ValueError, match="multiple"):
        round_ranks({"a": (4, 4)}, {"a": 2}, multiple=0)


def test_low_rank_pays_follows_the_measured_thresholds():
    m = n = 1000
    decode_rank = int(DECODE_MAX_FRACTION * m * n / (m + n))
    assert factor_fraction(m, n, decode_rank) <= DECODE_MAX_FRACTION
    assert low_rank_pays(m, n, decode_rank, tokens=1)
    assert not low_rank_pays(m, n, decode_rank + 1, tokens=1)
    assert low_rank_pays(m, n, decode_rank + 1, tokens=512)  # prefill tolerates wider pairs
    prefill_rank = int(PREFILL_MAX_FRACTION * m * n / (m + n))
    assert not low_rank_pays(m, n, prefill_rank + 1, tokens=512)
    assert low_rank_pays(m, n, 600, max_fraction=1.2)
    with pytest.raises(ValueError, match="tokens"):
        low_rank_pays(m, n, 10, tokens=0)


def test_keep_dense_names_the_matrices_that_would_be_slower():
    shapes, ranks = smollm2_plan(0.2)  # 80 % of the parameters: not faster at batch 1
    assert keep_dense(shapes, ranks, tokens=1) == sorted(ranks)
    assert keep_dense(shapes, ranks, tokens=512) == []
    assert keep_dense(*smollm2_plan(0.4), tokens=1) == []
