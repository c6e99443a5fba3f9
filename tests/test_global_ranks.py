"""Global per-matrix ranks: the greedy keeps the exact parameter budget and is optimal for its surrogate."""

import itertools

import pytest
import torch
from conftest import tiny_model
from test_engine import calib_ids

from svdkit import compress, get_method
from svdkit.allocation import (
    ALLOCATIONS,
    GlobalRanks,
    PlanContext,
    allocate,
    max_saving_rank,
    min_ranks_for,
    rank_for_ratio,
    ratio_for_rank,
    saves_memory,
    uniform_budget,
)
from svdkit.errors import ConfigError
from svdkit.layout import Layout


def spectra(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.sort(torch.rand(min(m, n), generator=g, dtype=torch.float64) ** 4 * (1 + i), descending=True)[0]
            for i, (k, (m, n)) in enumerate(shapes.items())}


SHAPES = {"q": (64, 64), "k": (32, 64), "up": (160, 64), "down": (64, 160)}


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_greedy_keeps_the_budget_exactly(ratio):
    gains = spectra(SHAPES)
    costs = {k: m + n for k, (m, n) in SHAPES.items()}
    budget = uniform_budget(SHAPES, ratio)
    lo, hi = min_ranks_for(SHAPES, ratio, 0.25), {k: max_saving_rank(m, n) for k, (m, n) in SHAPES.items()}
    ranks = allocate(gains, costs, budget, lo, hi)
    spent = sum(ranks[k] * costs[k] for k in ranks)
    assert spent <= budget
    addable = [costs[k] for k in ranks if ranks[k] < hi[k]]
    assert not addable or budget - spent < min(addable)  # nothing else fits: the budget is used up
    assert all(lo[k] <= ranks[k] <= hi[k] for k in ranks)
    assert all(ranks[k] * costs[k] < SHAPES[k][0] * SHAPES[k][1] for k in ranks)  # every pair still saves memory


def test_greedy_is_optimal_for_concave_gains():
    shapes = {"a": (6, 4), "b": (5, 5), "c": (8, 3)}
    gains = spectra(shapes, seed=3)
    costs = {k: m + n for k, (m, n) in shapes.items()}
    hi = {k: max_saving_rank(m, n) for k, (m, n) in shapes.items()}
    lo = dict.fromkeys(shapes, 0)
    for budget in range(0, sum(hi[k] * costs[k] for k in shapes) + 1, 3):
        ranks = allocate(gains, costs, budget, lo, hi)
        value = sum(float(gains[k][: ranks[k]].sum()) for k in shapes)
        best = max(sum(float(gains[k][: r].sum()) for k, r in zip(shapes, rs, strict=True))
                   for rs in itertools.product(*(range(hi[k] + 1) for k in shapes))
                   if sum(r * costs[k] for k, r in zip(shapes, rs, strict=True)) <= budget)
        # the greedy is optimal up to the last partially fitting rank (knapsack with unit items)
        assert value >= best - max(float(gains[k][0]) for k in shapes) - 1e-12


def test_rank_and_ratio_round_trip():
    for m, n in [(576, 576), (192, 576), (1536, 576), (576, 1536), (64, 160), (7, 3)]:
        for k in range(1, max_saving_rank(m, n) + 1):
            assert rank_for_ratio(m, n, ratio_for_rank(m, n, k)) == k


def test_a_positive_ratio_never_plans_a_pair_larger_than_its_matrix():
    """Why compression keeps a matrix dense only at ratio 0: `floor((1-R) m n / (m+n))` stores at most
    `(1-R) m n` numbers, so every rank >= 1 it plans saves memory (rank 0 is refused before any work)."""
    for m, n in itertools.product((1, 2, 3, 7, 64, 160, 576), repeat=2):
        for ratio in (1e-6, 0.01, 0.1, 0.2, 0.4, 0.6, 0.9, 0.99):
            k = rank_for_ratio(m, n, ratio)
            assert k * (m + n) <= (1 - ratio) * m * n + 1e-9
            assert k == 0 or saves_memory(m, n, k)


def test_infeasible_minimum_and_bad_options_are_errors():
    with pytest.raises(ConfigError, match="budget"):
        allocate(spectra(SHAPES), {k: m + n for k, (m, n) in SHAPES.items()}, 10, dict.fromkeys(SHAPES, 5),
                 dict.fromkeys(SHAPES, 20))
    bad = [({"min_rank": 2}, "min_rank"), ({"grad_samples": 0}, "grad_samples"), ({"labels": "x"}, "labels")]
    for kwargs, match in bad:
        with pytest.raises(ConfigError, match=match):
            GlobalRanks(**kwargs)
    for kwargs, match in [({"min_rank": 2, "alloc": "global"}, "min_rank"), ({"gain": "x"}, "gain")]:
        with pytest.raises(ConfigError, match=match):
            get_method("kfac", **kwargs)
    assert ALLOCATIONS["global"] is GlobalRanks
    with pytest.warns(DeprecationWarning, match="grad_samples=4"):
        assert GlobalRanks(windows=4) == GlobalRanks(grad_samples=4)  # the old name still works, with a warning


def test_a_method_without_a_loss_spectrum_is_refused():
    ctx = PlanContext(Layout.of(tiny_model("llama")), 0.4, get_method("svdllm"), profiler=None)
    with pytest.raises(ConfigError, match="loss spectrum"):
        GlobalRanks().plan(ctx)


@pytest.mark.parametrize("gain, two_sided", [("kfac", True), ("trace", True), ("kfac", False)])
def test_global_allocation_in_the_engine_keeps_the_uniform_budget(gain, two_sided):
    model, calib = tiny_model("llama"), calib_ids()
    rep = compress(model, get_method("kfac", ratio=0.4, alloc="global", gain=gain, two_sided=two_sided,
                                     grad_samples=2), calib, progress=False)
    uniform = sum(rank_for_ratio(*e.shape, 0.4) * sum(e.shape) for e in rep.matrices)
    kept = sum(e.params_after for e in rep.matrices)
    assert kept == rep.extra["global_kept"] <= uniform == rep.extra["global_budget"]
    assert uniform - kept < max(sum(e.shape) for e in rep.matrices)
    assert [e.rank for e in rep.matrices] == [rep.extra["global_ranks"][f"model.layers.{e.block}.{e.name}"]
                                              for e in rep.matrices]
    assert len({e.rank for e in rep.matrices}) > 1  # the ranks do differ
    assert rep.extra["global_loss_estimate"] <= rep.extra["uniform_loss_estimate"]
