"""Rank rounding keeps the parameter budget; the keep-dense rule follows its thresholds."""

import math
import random

import pytest
import torch
from conftest import VOCAB, tiny_model

from svdkit import LowRankLinear, compress, get_method
from svdkit.allocation import rank_for_ratio
from svdkit.layout import Layout
from svdkit.speed import (
    DECODE_MAX_FRACTION,
    PREFILL_MAX_FRACTION,
    RankRules,
    apply_rank_rules,
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


def test_rank_rules_keep_slow_pairs_dense_then_round_within_the_budget():
    shapes = {"a": (576, 576), "b": (1536, 576)}
    out, notes = apply_rank_rules(shapes, {"a": 250, "b": 100}, RankRules(16, dense_if_slower=True))
    assert out == {"b": 96}  # a's planned pair holds 87 % of its matrix: kept dense
    assert list(notes) == ["a"] and "rank-250 pair holds 87 %" in notes["a"]
    # Rounding alone: a 240 + 16 (the parameters both freed buy it one step back), b 96.
    assert apply_rank_rules(shapes, {"a": 250, "b": 100}, RankRules(16)) == ({"a": 256, "b": 96}, {})
    # Rounding alone hands b its step back (24 of 64 x 64: 75 %, slower); with the speed rule that step is withheld
    # (the limit is rank 22), so rounding never makes a pair slow.
    square = {"a": (64, 64), "b": (64, 64)}
    assert apply_rank_rules(square, {"a": 22, "b": 23}, RankRules(8)) == ({"a": 16, "b": 24}, {})
    assert apply_rank_rules(square, {"a": 22, "b": 22}, RankRules(8, dense_if_slower=True)) == ({"a": 16, "b": 16}, {})
    assert apply_rank_rules(shapes, {"a": 250}, RankRules()) == ({"a": 250}, {})
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        RankRules(0)


def test_compress_applies_rank_rules_and_the_report_names_the_matrices_kept_dense():
    torch.manual_seed(0)
    model, calib = tiny_model("llama"), torch.randint(0, VOCAB, (4, 32))
    layout = Layout.of(model)
    shapes = layout.matrices()
    # Block 0 at 15 % (pairs hold 85 % of the dense parameters: slower at batch 1), block 1 at 40 %.
    ratios = {full: 0.15 if ".0." in full else 0.4 for full in shapes}
    report = compress(model, get_method("svdllm", ratio=0.4), calib, ratios=ratios, progress=False,
                      rank_rules=RankRules(8, dense_if_slower=True))
    slow = sorted(full for full in shapes if ".0." in full)
    assert report.extra["rank_rules"] == {"multiple": 8, "dense_if_slower": True, "device": "cpu", "kept_dense": slow}
    budget = sum(rank_for_ratio(m, n, 0.4) * (m + n) for full, (m, n) in shapes.items() if ".1." in full)
    used = 0
    for entry in report.matrices:
        full = layout.full(entry.block, entry.name)
        module = model.get_submodule(full)
        if full in slow:
            assert entry.rank is None and "not faster at batch 1" in entry.note
            assert isinstance(module, torch.nn.Linear)
        else:
            assert entry.rank % 8 == 0 and abs(entry.rank - rank_for_ratio(*shapes[full], 0.4)) < 8
            assert isinstance(module, LowRankLinear) and module.rank == entry.rank
            used += entry.rank * sum(shapes[full])
    assert used <= budget


def test_keeping_slow_pairs_dense_is_refused_where_nothing_was_measured():
    from svdkit.speed import RankRules

    assert RankRules(16, True, "cpu").active
    assert RankRules(16, False, "cuda").active  # rounding still applies
    with pytest.raises(ValueError, match="measured on CPUs only"):  # a ConfigError
        RankRules(16, True, "cuda")
