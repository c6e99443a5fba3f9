"""The math as theorems, on random matrices with correlated inputs (float64)."""

import math

import pytest
import torch

from svdkit.allocation import rank_for_ratio, rebalance, saves_memory, svdllm_v2_ratios
from svdkit.errors import ConfigError
from svdkit.linalg import (
    PIVOT_RTOL,
    NumericalError,
    lower_right,
    relative_output_error,
    solve_psd_right,
    whiten,
)
from svdkit.methods import ASVD, FWSVD, SVD, SVDLLM, LayerStats
from svdkit.methods.svdllm_update import closed_form_update, update_objective


def correlated_inputs(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """tokens x n activations with a decaying spectrum and a few outlier channels, like LLM inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1, n, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix.T
    x[:, :3] *= 10.0
    return x


def stats_of(x: torch.Tensor) -> LayerStats:
    return LayerStats(gram=x.T @ x, tokens=x.shape[0], abs_mean=x.abs().mean(0))


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    x = correlated_inputs(64, 400)
    return w, x, stats_of(x)


@pytest.mark.parametrize("whitening", ["cholesky", "eigen"])
def test_whitened_error_is_the_singular_value_tail(problem, whitening):
    w, x, st = problem
    k = 12
    f = SVDLLM(whitening=whitening).factorize(w, st, k)
    direct = torch.linalg.norm((w - f.w_u @ f.w_v) @ x.T) / torch.linalg.norm(w @ x.T)
    assert float(direct) == pytest.approx(f.info["sigma_tail"], rel=1e-9)
    assert relative_output_error(w, f.w_u @ f.w_v, st.gram) == pytest.approx(f.info["sigma_tail"], rel=1e-9)
    approx32 = relative_output_error(w, f.w_u @ f.w_v, st.gram, torch.float32)  # the large matrices' report
    assert approx32 == pytest.approx(f.info["sigma_tail"], rel=1e-4)
    # and the tail is the best rank-k error of W X (Eckart-Young on the outputs)
    s = torch.linalg.svdvals(w @ x.T)
    assert f.info["sigma_tail"] == pytest.approx(math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum())), rel=1e-9)


def test_the_output_route_gives_the_whitened_factors_without_whitening(problem, monkeypatch):
    """`W S (W S)^T = W H W^T`: for `m <= n` the eigenvectors of the output Gram are the whitened SVD's `U`, so
    the truncation `U_k U_k^T W` is the same matrix; on a rank-deficient `W` the null directions carry nothing."""
    w, x, st = problem
    k = 12
    f = SVDLLM().factorize(w, st, k)
    assert f.info["whitening"] == "output"
    monkeypatch.setenv("SVDKIT_SVD", "gesdd")  # a forced route: the whitened SVD, as the paper computes it
    ref = SVDLLM().factorize(w, st, k)
    assert ref.info["whitening"] == "cholesky"
    assert torch.allclose(f.w_u @ f.w_v, ref.w_u @ ref.w_v, rtol=0, atol=1e-10 * float(w.abs().max()))
    assert f.info["sigma_tail"] == pytest.approx(ref.info["sigma_tail"], rel=1e-9)
    monkeypatch.delenv("SVDKIT_SVD")
    low = w[:, :5] @ torch.randn(5, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = SVDLLM().factorize(low, st, 8)  # rank 5 < k: exact, the three extra directions are zero rows
    assert g.info["whitening"] == "cholesky"  # s_k at the noise floor: the route falls back to whitening
    assert torch.allclose(g.w_u @ g.w_v, low, atol=1e-9 * float(low.abs().max()))
    h = SVDLLM().factorize(low, st, 5)
    assert h.info["whitening"] == "output" and torch.allclose(h.w_u @ h.w_v, low, atol=1e-9 * float(low.abs().max()))


@pytest.mark.parametrize("k", [4, 16, 40])
def test_whitening_never_loses_to_the_baselines_on_the_calibration_metric(problem, k):
    w, x, st = problem
    st.row_importance = torch.rand(48, dtype=torch.float64) + 0.1
    best = relative_output_error(w, (lambda f: f.w_u @ f.w_v)(SVDLLM().factorize(w, st, k)), st.gram)
    for method in (SVD(), ASVD(alpha=0.5), FWSVD()):
        f = method.factorize(w, st, k)
        assert best <= relative_output_error(w, f.w_u @ f.w_v, st.gram) + 1e-12, method.name
    plain = SVD().factorize(w, st, k)
    assert best < relative_output_error(w, plain.w_u @ plain.w_v, st.gram)  # strictly, on correlated inputs


def tail(s: torch.Tensor, k: int) -> float:
    """`sqrt(sum_{i>k} s_i^2 / sum s_i^2)`, computed here independently of `linalg.sigma_tail`."""
    return math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum()))


@pytest.mark.parametrize("k", [4, 16, 40])
def test_asvd_and_fwsvd_errors_on_their_own_metrics_are_their_singular_value_tails(problem, k):
    """ASVD truncates `W D` (`D = diag(mean|x|)^alpha`, on the input side), FWSVD `D W` (`D = diag(sqrt(I))`,
    Fisher rows, on the output side): each one's relative error in its own scaled metric is the tail of the
    scaled matrix's singular values (Eckart-Young), so no other method's factors do better in that metric."""
    w, _, st = problem
    st.row_importance = torch.rand(48, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.1
    d_in, d_out = st.abs_mean**0.7, st.row_importance.sqrt()
    own = {"asvd": (ASVD(alpha=0.7), lambda a: a * d_in), "fwsvd": (FWSVD(), lambda a: d_out[:, None] * a)}
    for name, (method, scaled) in own.items():
        def err(f, scaled=scaled):
            return float(torch.linalg.norm(scaled(w - f.w_u @ f.w_v)) / torch.linalg.norm(scaled(w)))

        f = method.factorize(w, st, k)
        expected = tail(torch.linalg.svdvals(scaled(w)), k)
        assert err(f) == pytest.approx(expected, rel=1e-9), name
        assert f.info["scaled_sigma_tail"] == pytest.approx(expected, rel=1e-9), name
        others = {o.name: err(o.factorize(w, st, k)) for o in (SVD(), SVDLLM(), *(m for m, _ in own.values()))}
        assert all(err(f) <= e + 1e-12 for e in others.values()), (name, others)
        assert err(f) < others["svd"] - 1e-6  # the scaling matters: strictly better than plain SVD there


@pytest.mark.parametrize("method", [SVD(), ASVD(), FWSVD(), SVDLLM(), SVDLLM(whitening="eigen")])
def test_matrix_of_rank_at_most_k_is_reproduced_exactly(problem, method):
    _, _, st = problem
    st.row_importance = torch.rand(48, dtype=torch.float64) + 0.1
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 64, generator=g, dtype=torch.float64)
    f = method.factorize(w, st, 7)
    assert f.w_u.shape == (48, 7) and f.w_v.shape == (7, 64)
    assert torch.allclose(f.w_u @ f.w_v, w, atol=1e-9 * float(w.abs().max()))


@pytest.mark.parametrize("case", ["dead_channel", "fewer_tokens_than_features"])
@pytest.mark.parametrize("whitening", ["cholesky", "eigen"])
def test_singular_gram_still_gives_finite_optimal_factors(problem, case, whitening):
    w, x, _ = problem
    if case == "dead_channel":
        x = x.clone()
        x[:, 5] = 0.0
    else:
        x = x[:40]  # 40 tokens, 64 features: rank-40 Gram
    st = stats_of(x)
    assert torch.linalg.matrix_rank(st.gram) < 64
    k = 10
    f = SVDLLM(whitening=whitening).factorize(w, st, k)
    assert torch.isfinite(f.w_u).all() and torch.isfinite(f.w_v).all()
    s = torch.linalg.svdvals(w @ x.T)
    optimum = math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum()))
    assert relative_output_error(w, f.w_u @ f.w_v, st.gram) == pytest.approx(optimum, rel=1e-5, abs=1e-9)


def test_whitening_rejects_non_finite_and_empty_statistics():
    h = torch.eye(4, dtype=torch.float64)
    h[1, 2] = float("nan")
    with pytest.raises(NumericalError, match="non-finite"):
        whiten(h)
    with pytest.raises(NumericalError, match="saw no"):
        whiten(torch.zeros(4, 4, dtype=torch.float64))


def test_cholesky_falls_back_to_eigen_on_indefinite_noise():
    h = torch.diag(torch.tensor([1.0, 1.0, -1e-3, 1.0], dtype=torch.float64))  # fp-summation noise gone wrong
    wh = whiten(h)
    assert wh.kind == "eigen" and wh.dropped == 1


@pytest.mark.parametrize("target", ["compressed", "original"])
def test_closed_form_update_never_increases_its_objective(problem, target):
    w, x, _ = problem
    g = torch.Generator().manual_seed(3)
    xc = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64) * x.std(0)  # inputs after compression
    st = LayerStats(gram=x.T @ x, tokens=x.shape[0], gram_c=xc.T @ xc, cross=xc.T @ x)
    f = SVDLLM().factorize(w, st, 12)
    before = update_objective(f.w_u, f.w_v, w, st, target)
    w_u = closed_form_update(w, f.w_v, st, target)
    after = update_objective(w_u, f.w_v, w, st, target)
    assert after < before
    # the Gram-form objective is the true one up to the constant ||T||^2
    tgt = (w @ (xc if target == "compressed" else x).T)
    true = float(torch.linalg.norm(w_u @ f.w_v @ xc.T - tgt) ** 2 - torch.linalg.norm(tgt) ** 2)
    assert after == pytest.approx(true, rel=1e-8)
    # and it is a minimum: any perturbation of W_u increases it
    bumped = update_objective(w_u + 1e-3 * torch.randn(w_u.shape, generator=g, dtype=torch.float64), f.w_v, w, st,
                              target)
    assert bumped > after


def test_rank_formula_and_memory_rule():
    assert rank_for_ratio(576, 576, 0.2) == math.floor(0.8 * 576 * 576 / 1152) == 230
    assert rank_for_ratio(1536, 576, 0.4) == math.floor(0.6 * 1536 * 576 / 2112)
    k = rank_for_ratio(100, 80, 0.3)
    assert k * 180 <= 0.7 * 8000 < (k + 1) * 180
    assert not saves_memory(64, 64, rank_for_ratio(64, 64, 0.0))
    assert saves_memory(64, 64, rank_for_ratio(64, 64, 0.01))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        rank_for_ratio(64, 64, 1.0)


def test_rebalance_hits_the_target_inside_bounds():
    out = rebalance([0.1, 0.5, 1.4, -0.3], [1, 2, 1, 1], target=0.4, lo=0.0, hi=0.9)
    assert all(0.0 <= r <= 0.9 for r in out)
    assert sum(w * r for w, r in zip([1, 2, 1, 1], out, strict=True)) / 5 == pytest.approx(0.4, abs=1e-9)


def test_svdllm_v2_keeps_each_group_mean_and_compresses_lossy_matrices_less():
    losses = {"q": {"a": 50.0, "b": 5.0, "c": 500.0}, "down": {"d": 0.5, "e": 2.0}}
    r = svdllm_v2_ratios(losses, 0.4)
    assert (r["a"] + r["b"] + r["c"]) / 3 == pytest.approx(0.4) and (r["d"] + r["e"]) / 2 == pytest.approx(0.4)
    assert r["c"] < r["a"] < r["b"] and r["e"] < r["d"]
    assert all(0.0 <= v < 1.0 for v in r.values())


def nearly_singular(n: int = 32, smallest: float = 1e-14, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A PSD Gram matrix with one direction the data barely spans (eigenvalue `smallest`), and that direction."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -3, n, dtype=torch.float64)
    lam[-1] = smallest
    return (q * lam) @ q.T, q[:, -1]


def test_psd_solve_is_exact_when_well_conditioned(problem):
    _, x, _ = problem
    gram = x.T @ x
    want = torch.randn(5, gram.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(solve_psd_right(gram, want @ gram), want, rtol=0, atol=1e-8 * float(want.abs().max()))


@pytest.mark.parametrize("smallest", [1e-14, 1e-17, 0.0, -1e-15])
def test_psd_solve_caps_the_noise_a_nearly_singular_gram_amplifies(smallest):
    gram, z = nearly_singular(smallest=smallest)
    g = torch.Generator().manual_seed(1)
    want = torch.randn(8, gram.shape[0], generator=g, dtype=torch.float64)
    noise = 1e-9 * torch.randn(8, 1, generator=g, dtype=torch.float64) * z  # rounding noise along the weak direction
    got = solve_psd_right(gram, want @ gram + noise)
    assert torch.isfinite(got).all()
    # along the weak direction the noise is divided by at least PIVOT_RTOL * mean(diag G), never by ~0
    cap = float(noise.norm()) / (PIVOT_RTOL * float(gram.diagonal().mean()))
    assert float((got - want).norm()) <= cap + 1e-6 * float(want.norm())
    # everywhere else the solution is the exact one
    off = got - want - ((got - want) @ z)[:, None] * z
    assert float(off.norm()) < 1e-6 * float(want.norm())


def test_psd_solve_of_a_zero_or_non_finite_gram():
    b = torch.ones(2, 3, dtype=torch.float64)
    assert torch.equal(solve_psd_right(torch.zeros(3, 3, dtype=torch.float64), b), torch.zeros_like(b))
    with pytest.raises(NumericalError, match="non-finite"):
        solve_psd_right(torch.full((3, 3), float("nan"), dtype=torch.float64), b)


def _with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An m x n float64 matrix with singular values `s` (descending) and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=gen, dtype=torch.float64))
    return (u * s) @ v.T


@pytest.mark.parametrize("m, n", [(48, 96), (96, 48)])
def test_the_gram_route_equals_gesdd_on_a_well_conditioned_matrix(m, n):
    from svdkit.linalg import svd

    a = _with_spectrum(m, n, torch.logspace(0, -4, min(m, n), dtype=torch.float64))  # four decades, as whitened
    u, s, vh = svd(a, route="gesdd")
    u2, s2, vh2 = svd(a, 20, route="auto")
    assert not torch.equal(s, s2)  # the Gram route ran (LAPACK's values differ in the last bits)
    # Squaring loses precision at the bottom: the eigenvalues of A^T A carry an error of about eps * s_1^2, so
    # s_k's is about eps * s_1^2 / s_k (1e-12 relative at s_1, 2e-8 at s_k = 1e-4 s_1; the rounding, and so the
    # last bits, depend on the BLAS threads). A wrong route would be off by orders of magnitude more.
    bound = 32 * torch.finfo(torch.float64).eps * s[0] ** 2 / s
    assert bool(((s2 - s).abs() <= bound).all()), float(((s2 - s).abs() / bound).max())
    assert float(((s2 - s).abs() / bound).max()) > 0  # the bound is not vacuous: the routes do differ
    for k in (1, 20, min(m, n)):
        exact = (u[:, :k] * s[:k]) @ vh[:k]
        gram = (u2[:, :k] * s2[:k]) @ vh2[:k]
        assert float(torch.linalg.norm(gram - exact) / torch.linalg.norm(a)) < 1e-12


def test_the_gram_route_falls_back_to_gesdd_near_its_noise_floor():
    """A kept direction with s_k / s_1 under the floor would come out as noise from the squared matrix: `auto`
    then gives LAPACK's SVD itself; a truncation that keeps only directions far above the floor still takes the
    Gram route."""
    from svdkit.linalg import GRAM_ROUTE_FLOOR, svd

    s = torch.cat([torch.logspace(0, -2, 10, dtype=torch.float64), torch.full((10,), 1e-9, dtype=torch.float64)])
    assert s[15] < GRAM_ROUTE_FLOOR * s[0] < s[9]
    a = _with_spectrum(40, 60, s)
    ref = svd(a, route="gesdd")
    assert all(torch.equal(x, y) for x, y in zip(svd(a, 16), ref, strict=True))  # fell back
    assert all(torch.equal(x, y) for x, y in zip(svd(a), ref, strict=True))  # None: every direction exact
    u, s2, vh = svd(a, 10)  # the Gram route: the kept ten are exact
    assert not torch.equal(s2, ref[1])
    torch.testing.assert_close((u[:, :10] * s2[:10]) @ vh[:10], (ref[0][:, :10] * ref[1][:10]) @ ref[2][:10],
                               rtol=0, atol=1e-12)
    gram_noise = svd(a, route="gram")[1][10:]  # what the floor protects from: the tail is noise there
    assert float(((gram_noise - 1e-9).abs() / 1e-9).max()) > 1e-3


def test_the_svd_route_can_be_forced_and_a_wrong_one_is_refused(monkeypatch):
    from svdkit.linalg import svd

    a = _with_spectrum(30, 40, torch.logspace(0, -1, 30, dtype=torch.float64))
    monkeypatch.setenv("SVDKIT_SVD", "gesdd")
    assert all(torch.equal(x, y) for x, y in zip(svd(a, 5), torch.linalg.svd(a, full_matrices=False), strict=True))
    monkeypatch.setenv("SVDKIT_SVD", "qr")
    with pytest.raises(ConfigError, match="SVDKIT_SVD must be one of auto, gesdd, gram"):
        svd(a, 5)


@pytest.mark.parametrize("block", [7, 16, 64])
def test_lower_right_is_the_dense_product_with_a_triangle(block):
    """The blocked product skips zeros above the diagonal and nothing else (any block size, transposed inputs)."""
    g = torch.Generator().manual_seed(3)
    low = torch.randn(50, 50, generator=g, dtype=torch.float64).tril()
    for w in (torch.randn(9, 50, generator=g, dtype=torch.float64), torch.randn(50, 9, generator=g,
                                                                               dtype=torch.float64).T):
        assert torch.allclose(lower_right(w, low, block), w @ low, rtol=0, atol=1e-12)
