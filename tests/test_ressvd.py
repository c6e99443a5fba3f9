"""ResSVD: residual compensation's identity, and partial-layer compression's budget."""

import pytest
import torch
from conftest import tiny_model
from test_linalg import correlated_inputs, stats_of

from svdkit import compress, get_method
from svdkit.allocation import plc_candidates, plc_ratios, rank_for_ratio
from svdkit.methods import SVD, SVDLLM, ResSVD, parse_method


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(1)
    return torch.randn(48, 64, generator=g, dtype=torch.float64), stats_of(correlated_inputs(64, 400))


@pytest.mark.parametrize("metric, single", [("whitened", SVDLLM()), ("plain", SVD())])
def test_same_metric_rec_equals_one_truncation(problem, metric, single):
    w, st = problem
    rec = ResSVD(beta=0.2, first_metric=metric, residual_metric=metric).factorize(w, st, 20)
    assert rec.info["residual_rank"] == 5 and rec.w_u.shape == (48, 20)
    one = single.factorize(w, st, 20)
    assert torch.allclose(rec.w_u @ rec.w_v, one.w_u @ one.w_v, atol=1e-10 * float(w.abs().max()))


def test_mixed_metric_rec_differs_and_cannot_beat_whitening_on_its_metric(problem):
    w, st = problem
    from svdkit.linalg import relative_output_error

    rec = ResSVD(beta=0.2, first_metric="whitened", residual_metric="plain").factorize(w, st, 20)
    one = SVDLLM().factorize(w, st, 20)
    assert not torch.allclose(rec.w_u @ rec.w_v, one.w_u @ one.w_v, atol=1e-6)
    assert relative_output_error(w, one.w_u @ one.w_v, st.gram) < relative_output_error(w, rec.w_u @ rec.w_v,
                                                                                         st.gram)


def test_plc_ratios_keep_the_overall_ratio_and_refuse_the_infeasible():
    assert plc_ratios(30, 0.4, 20) == [0.0] * 10 + [pytest.approx(0.6)] * 20
    assert plc_candidates(30, 0.4, 0.05) == list(range(13, 31))  # 30*0.4/k <= 0.95
    with pytest.raises(ValueError, match="infeasible"):
        plc_candidates(30, 0.96, 0.05)
    with pytest.raises(ValueError, match="exceed 1 - beta"):
        plc_ratios(30, 0.4, 12, 0.05)


def test_ressvd_in_the_engine_keeps_the_budget_and_reports_k():
    model = tiny_model("qwen2")
    calib = torch.randint(0, 300, (6, 48), generator=torch.Generator().manual_seed(0))
    rep = compress(model, get_method("ressvd", ratio=0.3), calib, progress=False)
    k = rep.extra["plc_k"]
    assert k in (1, 2) and set(rep.extra["plc_scores"]) == {1, 2}
    assert rep.extra["block_ratios"] == plc_ratios(2, 0.3, k)
    target = 0.3 * sum(e.params_before for e in rep.matrices)
    removed = sum(e.params_before - e.params_after for e in rep.matrices)
    assert abs(removed - target) <= sum(sum(e.shape) for e in rep.matrices)  # one rank step per matrix
    with pytest.raises(ValueError, match="infeasible"):
        compress(tiny_model("qwen2"), parse_method("ressvd:beta=0.05", ratio=0.97), calib, progress=False)


@pytest.mark.parametrize("beta, r_res", [(0.0, 0), (0.05, 1), (0.2, 5)])
def test_rank_budget_of_rec_matches_plain_truncation(problem, beta, r_res):
    """REC splits plain truncation's rank `r` into `r - r_r` whitened + `r_r = floor(beta m n / (m + n))` plain
    (27.4 beta for 48 x 64): the same storage, and the second pair is the best rank-`r_r` fit of the residual."""
    w, st = problem
    rank = rank_for_ratio(48, 64, 0.4)
    f = ResSVD(beta=beta).factorize(w, st, rank)
    r1 = rank - r_res
    assert f.w_u.shape == (48, rank) and f.w_v.shape == (rank, 64)
    assert (f.info["first_rank"], f.info["residual_rank"]) == (r1, r_res)
    first = SVDLLM().factorize(w, st, r1)
    w1 = first.w_u @ first.w_v
    assert torch.allclose(f.w_u[:, :r1] @ f.w_v[:r1], w1, atol=1e-10 * float(w.abs().max()))
    residual = w - w1
    s = torch.linalg.svdvals(residual)
    err = float(torch.linalg.norm(residual - f.w_u[:, r1:] @ f.w_v[r1:]))
    assert err == pytest.approx(float(s[r_res:].square().sum().sqrt()), rel=1e-9)
    assert torch.linalg.matrix_rank(f.w_u @ f.w_v) == rank


def test_default_ressvd_without_plc_is_svdllm_and_rec_changes_it():
    """REC is off by default (beta=0), so `ressvd:plc=false` is whitened truncation; the paper's REC
    (beta=0.05, plain residual) gives a different model with the same parameter count."""
    calib = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(1))
    probe = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    logits, params = {}, {}
    for spec in ("svdllm", "ressvd:plc=false", "ressvd:plc=false;beta=0.05"):
        model = tiny_model("llama")
        rep = compress(model, parse_method(spec, ratio=0.3), calib, progress=False)
        logits[spec], params[spec] = model(probe).logits, rep.params_after["total"]
    assert torch.equal(logits["svdllm"], logits["ressvd:plc=false"])
    assert not torch.allclose(logits["svdllm"], logits["ressvd:plc=false;beta=0.05"], atol=1e-4)
    assert len(set(params.values())) == 1


def test_ressvd_composes_with_adacomp():
    """`ressvd:tau=1` is PLC + adaComp: without PLC it is AdaSVD's adaComp; with only the last block
    compressed, the compressed stream equals the dense one there, so adaComp is a fixed point."""
    calib = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(1))
    probe = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))

    def run(spec: str, ratio: float = 0.3):
        model = tiny_model("llama")
        rep = compress(model, parse_method(spec, ratio=ratio), calib, progress=False)
        return model(probe).logits, rep

    a, _ = run("ressvd:tau=1;plc=false")
    b, _ = run("adasvd:adacr=false")
    assert torch.equal(a, b)
    plain, rep0 = run("ressvd:k=1", 0.15)
    comp, rep1 = run("ressvd:k=1;tau=1", 0.15)
    assert rep1.extra["plc_k"] == 1 and rep1.extra["block_ratios"] == [0.0, pytest.approx(0.3)]
    assert torch.allclose(plain, comp, atol=1e-4)
    traces = [e.info["adacomp_objective"] for e in rep1.matrices if e.rank is not None]
    assert traces and all(abs(t[-1] - t[0]) <= 1e-9 * abs(t[0]) for t in traces)  # objective up to a constant
    assert all(e.rank is None for e in rep1.matrices if e.block == 0)
