"""Two-sided (K-FAC) whitening as theorems: its error on the Fisher metric is its singular-value tail."""

import gc
import math
from dataclasses import asdict

import pytest
import torch
from conftest import tiny_model
from test_adasvd import streams
from test_engine import calib_ids
from test_linalg import correlated_inputs
from test_streaming import checkpoint, saved_tensors

from svdkit import compress, get_method, load_model
from svdkit.errors import ConfigError
from svdkit.linalg import whiten
from svdkit.methods import SVDLLM, LayerStats, parse_method
from svdkit.methods.adasvd import adacomp
from svdkit.methods.kfac import (
    KFAC,
    AdaKFAC,
    AdaKFACFT,
    AdaKFACRF,
    damped,
    output_whitener,
    tall_two_sided_factors,
    two_sided_factors,
)
from svdkit.pipeline import compress_to
from svdkit.stats_cache import StatsCache


def output_grams(m: int, tokens: int = 300, seed: int = 7) -> torch.Tensor:
    """A PSD `G = sum g g^T` from correlated fake output gradients."""
    g = correlated_inputs(m, tokens, seed=seed)
    return g.T @ g


def kfac_error(w, approx, h, g) -> float:
    """`||L_G^T (W - W') L_H||_F / ||L_G^T W L_H||_F` written as traces."""
    d = w - approx
    return math.sqrt(float(torch.trace(d.T @ g @ d @ h)) / float(torch.trace(w.T @ g @ w @ h)))


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=gen, dtype=torch.float64)
    x = correlated_inputs(64, 400)
    return w, x.T @ x, output_grams(48)


@pytest.mark.parametrize("k", [4, 12, 40])
@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["cholesky", "eigen"])
def test_two_sided_error_equals_its_tail_and_is_optimal(problem, k, damping, kind):
    w, h, g = problem
    f = two_sided_factors(w, whiten(h, kind), output_whitener(g, damping, kind), k)
    gd = damped(g, damping)
    err = kfac_error(w, f.w_u @ f.w_v, h, gd)
    assert err == pytest.approx(f.info["two_sided_sigma_tail"], rel=1e-9)
    # Eckart-Young on the G- and H-weighted metric: one-sided whitening cannot do better there
    one = SVDLLM().factorize(w, LayerStats(gram=h, tokens=400), k)
    assert err < kfac_error(w, one.w_u @ one.w_v, h, gd)  # strictly, with a non-trivial G


def test_identity_output_gram_is_svdllm(problem):
    w, h, _ = problem
    f = two_sided_factors(w, whiten(h), output_whitener(torch.eye(48, dtype=torch.float64), 0.0), 12)
    one = SVDLLM().factorize(w, LayerStats(gram=h, tokens=400), 12)
    assert torch.allclose(f.w_u @ f.w_v, one.w_u @ one.w_v, atol=1e-9 * float(w.abs().max()))


def test_rank_k_matrix_is_reproduced_with_a_singular_output_gram(problem):
    _, h, _ = problem
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 7, generator=gen, dtype=torch.float64) @ torch.randn(7, 64, generator=gen, dtype=torch.float64)
    g = output_grams(48, tokens=20)  # rank 20 < 48: Cholesky needs jitter or the eigen route
    f = two_sided_factors(w, whiten(h), output_whitener(g, 0.01), 7)
    assert torch.isfinite(f.w_u).all() and torch.allclose(f.w_u @ f.w_v, w, atol=1e-8 * float(w.abs().max()))


@pytest.mark.parametrize("target", ["compressed", "original"])
def test_weighted_adacomp_never_increases_and_reduces_to_adacomp(target):
    w, st = streams(0.3)
    g = damped(output_grams(48), 0.1)
    f = two_sided_factors(w, whiten(st.gram), whiten(g), 12)
    _, trace = adacomp(w, f, st, target, tau=3, g=g)
    for before, after in zip(trace, trace[1:], strict=False):
        assert after <= before + 1e-9 * abs(before)
    assert trace[-1] < trace[0]
    one = SVDLLM().factorize(w, st, 12)
    a, _ = adacomp(w, one, st, target, tau=2, g=torch.eye(48, dtype=torch.float64))
    b, _ = adacomp(w, one, st, target, tau=2)
    assert torch.allclose(a.w_u @ a.w_v, b.w_u @ b.w_v, atol=1e-8 * float(w.abs().max()))


def test_kfac_in_the_engine(arch):
    model, calib = tiny_model(arch), calib_ids()
    rep = compress(model, get_method("kfac", ratio=0.4, grad_samples=2, tau=1), calib, progress=False)
    assert all(e.rank is not None for e in rep.matrices)
    for e in rep.matrices:  # tall matrices (the MLP's up projections) skip the square root of G
        assert e.info["out_whitening"] == ("none" if e.shape[0] > e.shape[1] else "cholesky"), e.name
        first, last = e.info["adacomp_objective"][0], e.info["adacomp_objective"][-1]
        assert last <= first + 1e-9 * abs(first)
    assert all(math.isfinite(e.rel_error) for e in rep.matrices)


def test_kfac_on_the_compressed_stream_with_model_labels_and_a_cache(tmp_path):
    calib = calib_ids()
    cache = StatsCache(tmp_path / "stats")
    a, b = tiny_model("llama"), tiny_model("llama")
    spec = {"ratio": 0.4, "grad_samples": 3, "fisher": "model", "stream": "compressed"}
    ra = compress(a, get_method("kfac", **spec), calib, progress=False, stats_cache=cache)
    assert cache.has_set("outgrad-model-3", a.config.num_hidden_layers)
    rb = compress(b, get_method("kfac", **spec), calib, progress=False, stats_cache=cache)  # Grams from the cache
    assert [e.rank for e in ra.matrices] == [e.rank for e in rb.matrices]
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na


def test_one_sided_kfac_with_adacomp_and_adacr_is_adasvd():
    calib = calib_ids()
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = compress(a, get_method("adasvd", ratio=0.4), calib, progress=False)
    rb = compress(b, KFAC(ratio=0.4, two_sided=False, tau=1, alloc="adacr"), calib, progress=False)
    assert [e.rank for e in ra.matrices] == [e.rank for e in rb.matrices]
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.allclose(pa, pb, atol=1e-5), na


def test_ada_kfac_is_the_named_composition():
    named = parse_method("ada-kfac", ratio=0.4, grad_samples=2)
    spelled = parse_method("kfac:damping=1;alloc=adacr;tau=1", ratio=0.4, grad_samples=2)
    assert isinstance(named, AdaKFAC) and asdict(named) == asdict(spelled)
    assert parse_method("ada-kfac:tau=0").tau == 0  # every option can still be overridden
    calib = calib_ids()
    a, b = tiny_model("llama"), tiny_model("llama")
    ra, _ = (compress(m, method, calib, progress=False) for m, method in ((a, named), (b, spelled)))
    assert len({e.rank for e in ra.matrices if e.name.endswith("q_proj")}) > 1  # adaCR: blocks differ
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na


def test_ada_kfac_ft_is_ada_kfac_then_the_sequential_update():
    named = parse_method("ada-kfac-ft", ratio=0.4)
    assert isinstance(named, AdaKFACFT) and asdict(named) == asdict(parse_method("ada-kfac:ft_steps=64", ratio=0.4))
    assert named.finetune_config.steps == 64 and parse_method("ada-kfac").finetune_config is None


def test_ada_kfac_rf_is_ada_kfac_then_block_local_refinement():
    named = parse_method("ada-kfac-rf", ratio=0.4)
    spelled = parse_method("ada-kfac:rf_steps=128;rf_batch=1;rf_lr=3e-4;rf_loss=token", ratio=0.4)
    assert isinstance(named, AdaKFACRF) and asdict(named) == asdict(spelled)
    assert named.refine_config == spelled.refine_config and named.refine_config.target == "stream"
    assert named.finetune_config is None and parse_method("ada-kfac").refine_config is None
    assert parse_method("ada-kfac-rf:rf_steps=0").refine_config is None  # and it can be turned off


def test_bad_options_are_one_line_errors():
    for kwargs, match in [({"alloc": "per-type"}, "alloc"), ({"damping": -1}, "damping"),
                          ({"grad_samples": 0}, "grad_samples"), ({"labels": "oracle"}, "labels"),
                          ({"importance": "sin"}, "importance"), ({"tau": -1}, "tau")]:
        with pytest.raises(ConfigError, match=match):
            KFAC(ratio=0.4, **kwargs)
    with pytest.raises(ConfigError, match="output-gradient"):
        KFAC().factorize(torch.eye(4, dtype=torch.float64), LayerStats(gram=torch.eye(4, dtype=torch.float64),
                                                                       tokens=4), 2)


def test_streamed_kfac_equals_in_memory(tmp_path):
    folder = checkpoint(tmp_path, "llama", shard_bytes="200KB")
    memory, _ = load_model(str(folder), dtype="auto")
    method = get_method("kfac", ratio=0.4, grad_samples=3, tau=1)
    rep_m = compress(memory, method, calib_ids(), progress=False)
    rep_s, _ = compress_to(str(folder), tmp_path / "out", method, calib_ids(), format="svdkit", progress=False)
    assert [e.rank for e in rep_s.matrices] == [e.rank for e in rep_m.matrices]
    streamed, expected = saved_tensors(tmp_path / "out"), memory.state_dict()
    for k, v in streamed.items():
        assert torch.equal(v, expected[k]), k


def test_renamed_options_keep_their_old_names_for_a_release():
    with pytest.warns(DeprecationWarning, match="use labels=model"):
        method = parse_method("kfac:fisher=model")
    assert method.labels == "model" and method.fisher is None
    with pytest.raises(ConfigError, match="labels must be one of"):
        parse_method("kfac:labels=oracle")
    with pytest.warns(DeprecationWarning, match="use finetune="):
        compress(tiny_model("llama"), parse_method("svd", ratio=0.4), None, fine_tune=False, progress=False)


def _live_float64_matrices() -> int:
    """Bytes of every float64 matrix alive in this process (each storage once)."""
    gc.collect()
    seen: dict[int, int] = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.dtype == torch.float64 and o.dim() == 2:
            seen[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("park", [False, True])
def test_a_block_holds_only_the_statistics_of_the_matrix_being_factorized(monkeypatch, tmp_path, park):
    """Host memory: the widest input (down_proj's) is factorized first and each statistic is dropped once it has
    served; with parking (a block's statistics above `PARK_BYTES`) only the matrix's own input group, its own
    output Gram and its group's cached whitening are in memory, the rest on disk; the factors are the same."""
    from svdkit import compression

    seen, factorize = [], compression._factorize

    def spy(i, name, mod, method, ratio, stats, fisher, out_gram, *rest):
        if i == 0:
            own = sum(t.numel() * 8 for t in (stats.gram, stats.gram_c, stats.cross, out_gram) if t is not None)
            seen.append((name, _live_float64_matrices() - own, mod.in_features))
        return factorize(i, name, mod, method, ratio, stats, fisher, out_gram, *rest)

    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    method = parse_method("ada-kfac:alloc=uniform", ratio=0.4)
    reference = tiny_model("llama")
    compress(reference, method, calib, progress=False)
    monkeypatch.setattr(compression, "_factorize", spy)
    monkeypatch.setattr(compression, "PARK_BYTES", 0 if park else 2**30)
    model = tiny_model("llama")
    compress(model, method, calib, progress=False, scratch=tmp_path)
    assert [s[0] for s in seen] == ["mlp.down_proj", *(f"self_attn.{n}_proj" for n in "qkvo"), "mlp.gate_proj",
                                    "mlp.up_proj"]
    others = [extra for _, extra, _ in seen]
    if park:  # nothing else but the group's whitening (one n x n factor) once the group has served a linear
        assert others[0] == 0 and all(extra <= 8 * n * n for _, extra, n in seen), seen
    else:  # everything is there for the first matrix, less and less after, only a whitening for the last
        assert others[0] > others[1] > others[4] > others[5] > 8 * 64 * 64 >= others[6], seen
    assert list(tmp_path.iterdir()) == []  # the parking folder is gone
    for (k, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def _reference_adacomp(w, w_u, w_v, st, target, g, tau):
    """adaComp written from its formulas with dense products and plain solves (the test's reference)."""
    k = st.gram_c if target == "compressed" else st.cross
    gw = torch.eye(w.shape[0], dtype=torch.float64) if g is None else g

    def obj(u, v):
        p = u @ v
        return float(torch.trace(gw @ p @ st.gram_c @ p.T) - 2 * torch.trace(gw @ p @ k @ w.T))

    trace = [obj(w_u, w_v)]
    for _ in range(tau):
        w_u = torch.linalg.solve(w_v @ st.gram_c @ w_v.T, w_v @ k @ w.T).T  # W K^T V^T (V H' V^T)^-1
        trace.append(obj(w_u, w_v))
        w_v = torch.linalg.solve(w_u.T @ gw @ w_u, w_u.T @ gw @ w)
        if target != "compressed":
            w_v = torch.linalg.solve(st.gram_c, k @ w_v.T).T  # ... K^T H'^-1
        trace.append(obj(w_u, w_v))
    return w_u, w_v, trace


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("target", ["compressed", "original"])
def test_adacomp_with_shared_products_equals_its_formulas(target, weighted):
    """adaComp forms each factor's products with the statistics once; the steps and the objective trace must
    still be exactly the formulas' (dense products, plain solves)."""
    w, st = streams(0.3)
    g = damped(output_grams(48), 0.1) if weighted else None
    f = SVDLLM().factorize(w, st, 12)
    out, trace = adacomp(w, f, st, target, tau=2, g=g)
    w_u, w_v, ref = _reference_adacomp(w, f.w_u, f.w_v, st, target, g, tau=2)
    assert trace == pytest.approx(ref, rel=1e-9)
    assert torch.allclose(out.w_u, w_u, rtol=1e-7, atol=1e-9 * float(w_u.abs().max()))
    assert torch.allclose(out.w_v, w_v, rtol=1e-7, atol=1e-9 * float(w_v.abs().max()))


@pytest.fixture
def tall():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(72, 48, generator=gen, dtype=torch.float64)  # more outputs than inputs, like gate_proj
    x = correlated_inputs(48, 400)
    return w, x.T @ x, output_grams(72, tokens=500)


@pytest.mark.parametrize("kind", ["cholesky", "eigen"])
@pytest.mark.parametrize("k", [5, 20, 40])
def test_tall_route_equals_the_square_root_of_g(tall, k, kind):
    """Without a square root of G, a tall matrix's factors are the same rank-k truncation: the same product,
    the same two-sided tail, which is still its error on the K-FAC metric."""
    w, h, g = tall
    gd = damped(g, 0.1)
    ref = two_sided_factors(w, whiten(h, kind), whiten(gd.clone(), kind), k)
    f, wgw, r = tall_two_sided_factors(w, whiten(h, kind), gd.clone(), k)
    assert f.info["out_whitening"] == "none" and torch.allclose(wgw, w.T @ gd @ w, rtol=1e-12)
    assert torch.equal(f.w_u, w @ r)
    scale = float((ref.w_u @ ref.w_v).abs().max())
    assert torch.allclose(f.w_u @ f.w_v, ref.w_u @ ref.w_v, rtol=0, atol=1e-9 * scale)
    assert f.info["two_sided_sigma_tail"] == pytest.approx(ref.info["two_sided_sigma_tail"], rel=1e-9)
    assert kfac_error(w, f.w_u @ f.w_v, h, gd) == pytest.approx(f.info["two_sided_sigma_tail"], rel=1e-8)


def test_tall_route_is_guarded_and_kfac_falls_back(tall, monkeypatch):
    """Where the kept spectrum nears the Gram route's noise floor (a weight of rank 6 asked for rank 10), the tall
    route declines and K-FAC whitens G instead; `SVDKIT_SVD=gesdd` always takes the square root of G."""
    w, h, g = tall
    gen = torch.Generator().manual_seed(4)
    low = torch.randn(72, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 48, generator=gen,
                                                                               dtype=torch.float64)
    assert tall_two_sided_factors(low, whiten(h), damped(g, 0.1), 10) is None

    def route(weight):
        return KFAC().factorize(weight, LayerStats(gram=h, tokens=400, out_gram=g.clone()), 10).info["out_whitening"]

    assert route(low) == "cholesky" and route(w) == "none"
    monkeypatch.setenv("SVDKIT_SVD", "gesdd")
    assert route(w) == "cholesky"


@pytest.mark.parametrize("target", ["compressed", "original"])
def test_adacomp_of_a_tall_matrix_through_w_g_w_equals_its_formulas(tall, target):
    """With `W^T G W` given, adaComp's U-steps never multiply by G; the steps and the trace stay the formulas'."""
    w, h, g = tall
    gen = torch.Generator().manual_seed(6)
    x = correlated_inputs(48, 400)
    xc = x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64) * x.std(0)
    st = LayerStats(gram=h, tokens=400, gram_c=xc.T @ xc, cross=xc.T @ x)
    gd = damped(g, 0.1)
    f, wgw, r = tall_two_sided_factors(w, whiten(st.gram), gd.clone(), 10)
    w_u, w_v, ref = _reference_adacomp(w, f.w_u, f.w_v, st, target, gd, tau=2)
    for given in (None, r):  # with and without the first factor's W_u = W R
        out, trace = adacomp(w, f, st, target, tau=2, g=gd, wgw=wgw, r=given)
        assert trace == pytest.approx(ref, rel=1e-9)
        assert torch.allclose(out.w_u @ out.w_v, w_u @ w_v, rtol=0, atol=1e-9 * float((w_u @ w_v).abs().max()))
