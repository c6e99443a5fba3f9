"""AdaSVD: adaComp's alternating least squares and adaCR's per-block ratios."""

import itertools

import pytest
import torch
from conftest import tiny_model
from test_linalg import correlated_inputs

from svdkit import compress, get_method
from svdkit.allocation import adacr_ratios, rank_for_ratio
from svdkit.engine import BlockInputs, Stream
from svdkit.methods import SVDLLM, LayerStats
from svdkit.methods.adasvd import adacomp, stack_of_batch


def streams(shift: float):
    """Original inputs X and 'compressed-stream' inputs X' = X + noise (shift=0: the same data)."""
    x = correlated_inputs(64, 400)
    g = torch.Generator().manual_seed(5)
    xc = x + shift * torch.randn(x.shape, generator=g, dtype=torch.float64) * x.std(0)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    return w, LayerStats(gram=x.T @ x, tokens=400, gram_c=xc.T @ xc, cross=xc.T @ x)


def test_adacomp_is_a_fixed_point_on_the_whitening_data():
    w, st = streams(0.0)
    f = SVDLLM().factorize(w, st, 12)
    out, trace = adacomp(w, f, st, "compressed", tau=3)
    assert max(trace) - min(trace) <= 1e-9 * abs(trace[0])
    assert torch.allclose(out.w_u @ out.w_v, f.w_u @ f.w_v, atol=1e-8 * float(w.abs().max()))


@pytest.mark.parametrize("target", ["compressed", "original"])
def test_every_step_never_increases_and_one_round_helps_on_other_data(target):
    w, st = streams(0.3)
    f = SVDLLM().factorize(w, st, 12)
    _, trace = adacomp(w, f, st, target, tau=4)
    assert len(trace) == 9
    for before, after in zip(trace, trace[1:], strict=False):
        assert after <= before + 1e-9 * abs(before)
    assert trace[2] < trace[0] - 1e-6 * abs(trace[0])  # one U-step + V-step lowers the loss


def test_adacr_keeps_the_mean_ratio_and_orders_by_importance():
    imp = [5.0, 1.0, 0.5, 0.2, 0.2, 0.1]
    for ratio in (0.2, 0.4, 0.6):
        r = adacr_ratios(imp, ratio)
        assert sum(r) / len(r) == pytest.approx(ratio, abs=1e-9)
        assert all(0.0 <= x < 1.0 for x in r)
        assert r == sorted(r)  # the most important block is compressed least
    # mrr=trr reduces to uniform
    assert adacr_ratios(imp, 0.4, mrr=0.6) == pytest.approx([0.4] * 6)


def test_adasvd_in_the_engine_keeps_the_budget_and_reports_importance():
    model = tiny_model("llama")
    calib = torch.randint(0, 300, (6, 48), generator=torch.Generator().manual_seed(0))
    rep = compress(model, get_method("adasvd", ratio=0.4), calib, progress=False)
    imp = rep.extra["importance"]
    assert len(imp) == 2 and imp[0] > imp[1]  # the first block changes its input most
    uniform = sum(rank_for_ratio(*e.shape, 0.4) * sum(e.shape) for e in rep.matrices)
    kept = sum(e.params_after for e in rep.matrices)
    assert abs(kept - uniform) <= sum(sum(e.shape) for e in rep.matrices)  # one rank step per matrix
    traces = [e.info["adacomp_objective"] for e in rep.matrices]
    assert all(t[-1] <= t[0] + 1e-9 * abs(t[0]) for t in traces)


def test_stack_of_batch_averages_shuffled_sequences():
    x = list(torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(0)).split(4))
    extra = BlockInputs(args=[(), ()], kwargs=[{"pos": torch.zeros(4, 3)}, {"pos": torch.zeros(4, 3)}])
    stream = Stream(x, extra, torch.device("cpu"), torch.device("cpu"))
    new = stream.regroup(lambda seqs: stack_of_batch(seqs, buckets=2))
    stacked = torch.cat(new.hidden)
    assert stacked.shape == (2, 3, 2)
    assert torch.allclose(stacked.mean(0), torch.cat(x).mean(0), atol=1e-6)  # equal buckets keep the mean
    assert new.extra.kwargs[0]["pos"].shape[0] == new.hidden[0].shape[0]
    # each bucket is the mean of four distinct sequences of the eight, and together they use all eight
    seqs = torch.cat(x)
    used = []
    for bucket in stacked:
        match = [c for c in itertools.combinations(range(8), 4)
                 if torch.allclose(bucket, seqs[list(c)].mean(0))]
        assert len(match) == 1
        used += match[0]
    assert sorted(used) == list(range(8))
    with pytest.raises(ValueError, match="buckets"):
        stack_of_batch(seqs, buckets=9)
