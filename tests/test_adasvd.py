"""AdaSVD: adaComp's alternating least squares and adaCR's per-block ratios."""

import itertools

import pytest
import torch
from conftest import tiny_model
from test_linalg import correlated_inputs

from svdkit import compress, get_method
from svdkit.allocation import adacr_ratios, rank_for_ratio
from svdkit.layout import find_blocks, weight_matrix
from svdkit.methods import SVDLLM, AdaSVD, LayerStats, parse_method
from svdkit.methods.adasvd import adacomp, stack_of_batch
from svdkit.stream import BlockInputs, Stream


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


def test_cos_importance_is_the_complement_and_reverses_the_block_ratios():
    """`importance=cos` (the paper's literal wording) is `1 - importance=1-cos` block by block, so adaCR
    compresses the other way round: the block that changes its input most is compressed most."""
    calib = torch.randint(0, 300, (6, 48), generator=torch.Generator().manual_seed(0))
    reps = {imp: compress(tiny_model("llama"), parse_method(f"adasvd:importance={imp};tau=0", ratio=0.4), calib,
                          progress=False) for imp in ("1-cos", "cos")}
    default, cos = (reps[k].extra["importance"] for k in ("1-cos", "cos"))
    assert cos == pytest.approx([1.0 - x for x in default], abs=1e-12)
    assert default[0] > default[1]
    r_default, r_cos = (reps[k].extra["block_ratios"] for k in ("1-cos", "cos"))
    assert r_default == adacr_ratios(default, 0.4) and r_cos == adacr_ratios(cos, 0.4)
    assert r_default[0] < r_default[1] and r_cos[0] > r_cos[1]
    assert sum(r_cos) / 2 == pytest.approx(0.4) and sum(r_default) / 2 == pytest.approx(0.4)
    q = {k: [e.rank for e in rep.matrices if e.name == "self_attn.q_proj"] for k, rep in reps.items()}
    assert q["1-cos"][0] > q["cos"][0] and q["1-cos"][1] < q["cos"][1]


def test_stack_buckets_whiten_with_the_averaged_sequences(monkeypatch):
    """`stack_buckets=b` through `compress`: every matrix's statistics hold `b` sequences' tokens; block 0's
    query input is the norm of the stacked embeddings; with one window a bucket it is only a reordering of
    the sequences, so the statistics equal those without stacking."""
    calib = torch.randint(0, 300, (6, 48), generator=torch.Generator().manual_seed(0))
    seen: list[tuple[torch.Tensor, LayerStats]] = []
    factorize = AdaSVD.factorize

    def recording(self, w, stats, rank):
        seen.append((w, stats))
        return factorize(self, w, stats, rank)

    monkeypatch.setattr(AdaSVD, "factorize", recording)

    def statistics(buckets):
        seen.clear()
        model = tiny_model("llama")
        spec = "adasvd:tau=0;adacr=false" + (f";stack_buckets={buckets}" if buckets else "")
        compress(model, parse_method(spec, ratio=0.4), calib, progress=False)
        return list(seen)

    plain, stacked, reordered = statistics(None), statistics(2), statistics(6)
    assert len(plain) == len(stacked) == len(reordered) == 14
    assert all(st.tokens == 6 * 48 for _, st in plain + reordered) and all(st.tokens == 2 * 48 for _, st in stacked)
    for (_, a), (_, b) in zip(plain, reordered, strict=True):
        assert torch.allclose(a.gram, b.gram, rtol=1e-4, atol=1e-6 * float(a.gram.abs().max()))
    model = tiny_model("llama")
    block0 = find_blocks(model)[1][0]
    with torch.no_grad():
        x = block0.input_layernorm(stack_of_batch(model.model.embed_tokens(calib), buckets=2))
    x = x.reshape(-1, x.shape[-1]).double()
    q = weight_matrix(block0.self_attn.q_proj)
    (gram,) = [st.gram for w, st in stacked if w.shape == q.shape and torch.equal(w, q.detach().double())]
    (unstacked,) = [st.gram for w, st in plain if w.shape == q.shape and torch.equal(w, q.detach().double())]
    assert torch.allclose(gram, x.T @ x, rtol=1e-5, atol=1e-6 * float(gram.abs().max()))
    assert not torch.allclose(gram, unstacked, rtol=1e-2)
