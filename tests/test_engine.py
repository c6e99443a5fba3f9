"""The layer-wise engine on tiny random models of every supported architecture."""

import pytest
import torch
from conftest import tiny_model

from svdkit import LowRankLinear, compress, get_method
from svdkit.allocation import rank_for_ratio
from svdkit.engine import walk
from svdkit.layout import set_submodule
from svdkit.linalg import relative_output_error, truncated_svd
from svdkit.models import block_linears, find_blocks, weight_matrix
from svdkit.statistics import input_groups
from svdkit.stream import capture_inputs


def calib_ids(n=6, seqlen=48, seed=0):
    return torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_linears_sharing_an_input_share_one_gram():
    model = tiny_model("llama")
    x, extra = capture_inputs(model, calib_ids(), 4, torch.device("cpu"))
    groups = input_groups(find_blocks(model)[1][0], x[0], extra)
    q = "self_attn.q_proj"
    assert groups["self_attn.k_proj"] == groups["self_attn.v_proj"] == groups[q] == q
    assert groups["mlp.up_proj"] == groups["mlp.gate_proj"] == "mlp.gate_proj"
    assert len(set(groups.values())) == 4  # qkv, o, gate/up, down


def _reference_grams(model, calib, block_idx):
    """X^T X of every linear's input in block `block_idx`, by hooking a plain forward of the whole model."""
    block = find_blocks(model)[1][block_idx]
    grams = {}
    hooks = []
    for name, m in block_linears(block).items():
        def hook(_m, a, name=name):
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(calib, use_cache=False)
    for h in hooks:
        h.remove()
    return grams


def _truncate_block(block, ratio=0.5):
    """Swap every linear of a block for its plain rank-k SVD (a compression that does not need statistics)."""
    for name, m in block_linears(block).items():
        w = weight_matrix(m).detach().double()
        w_u, w_v, _ = truncated_svd(w, rank_for_ratio(*w.shape, ratio))
        set_submodule(block, name, LowRankLinear.from_factors(w_u.float(), w_v.float(), m.bias))


@pytest.mark.parametrize("stream", ["original", "compressed"])
def test_statistics_follow_the_chosen_stream(arch, stream):
    """original: block 1 sees the dense model's activations; compressed: those after compressed block 0."""
    model, calib = tiny_model(arch), calib_ids()
    dense_ref = _reference_grams(model, calib, 1)
    seen = {}

    def on_block(i, block, groups, stats):
        if i == 0:
            _truncate_block(block)
        else:
            seen.update({name: stats[groups[name]].gram for name in groups})

    walk(model, calib, on_block, stream=stream, progress=False)
    compressed_ref = _reference_grams(model, calib, 1)  # block 0 now low-rank, block 1 still dense
    ref = dense_ref if stream == "original" else compressed_ref
    assert set(seen) == set(ref)
    for name, g in seen.items():
        assert not torch.allclose(dense_ref[name], compressed_ref[name], rtol=1e-3)  # the streams do differ
        assert torch.allclose(g, ref[name], rtol=1e-4, atol=1e-6 * float(ref[name].abs().max())), name


def test_compressed_stream_whitens_with_the_compressed_models_activations():
    """`stream=compressed` through `compress`: block 0 sees the embeddings either way (identical factors);
    block 1's statistics are the activations of the model whose block 0 is already compressed (block 1 itself
    still dense while its statistics are gathered), so its error and tail are those of that model's Gram."""
    calib = calib_ids()
    models, reps = {}, {}
    for stream in ("original", "compressed"):
        models[stream] = tiny_model("llama")
        reps[stream] = compress(models[stream], get_method("svdllm", ratio=0.5, stream=stream), calib, progress=False)
    blocks = {s: find_blocks(m)[1] for s, m in models.items()}
    for e in reps["original"].matrices:
        a, b = (blocks[s][e.block].get_submodule(e.name) for s in models)
        same = torch.equal(a.u.weight, b.u.weight) and torch.equal(a.v.weight, b.v.weight)
        assert same == (e.block == 0), (e.block, e.name)
    hybrid = tiny_model("llama")
    find_blocks(hybrid)[1][0] = blocks["compressed"][0]
    grams = {"compressed": _reference_grams(hybrid, calib, 1), "original": _reference_grams(tiny_model("llama"),
                                                                                           calib, 1)}
    dense_block = find_blocks(tiny_model("llama"))[1][1]
    for stream, rep in reps.items():
        for e in (e for e in rep.matrices if e.block == 1):
            w = weight_matrix(dense_block.get_submodule(e.name)).detach().double()
            low = blocks[stream][1].get_submodule(e.name)
            approx = low.u.weight.detach().double() @ low.v.weight.detach().double()
            errors = {s: relative_output_error(w, approx, g[e.name]) for s, g in grams.items()}
            assert e.rel_error == pytest.approx(errors[stream], rel=1e-5)
            assert abs(errors["compressed"] - errors["original"]) > 1e-2 * errors[stream]  # far beyond the tolerance
            s = torch.linalg.svdvals(w @ torch.linalg.cholesky(grams[stream][e.name]))
            optimum = float((s[e.rank:] ** 2).sum() / (s**2).sum()) ** 0.5
            assert e.sigma_tail == pytest.approx(optimum, rel=1e-5)  # optimal for that stream's Gram


def test_svdllm_swaps_every_linear_with_the_formula_rank_and_exact_tail(arch):
    model = tiny_model(arch)
    _, blocks = find_blocks(model)
    n_linears = sum(len(block_linears(b)) for b in blocks)
    report = compress(model, get_method("svdllm", ratio=0.4), calib_ids(), progress=False)
    for entry in report.matrices:
        layer = blocks[entry.block].get_submodule(entry.name)
        m, n = entry.shape
        assert isinstance(layer, LowRankLinear) and layer.rank == rank_for_ratio(m, n, 0.4) == entry.rank
        assert entry.params_after == entry.rank * (m + n)
        # exact whitening makes the error the singular-value tail; jitter (dead ReLU channels in OPT)
        # perturbs H by a relative 1e-10..1e-4 and the identity by about as much
        tol = 1e-6 if entry.info["jitter"] == 0 else 1e-3
        assert entry.rel_error == pytest.approx(entry.sigma_tail, rel=tol, abs=1e-9)
    assert len(report.matrices) == n_linears
    removed = report.params_before["total"] - report.params_after["total"]
    assert removed == sum(e.params_before - e.params_after for e in report.matrices)


def test_whitening_beats_plain_svd_inside_the_model():
    calib = calib_ids(8, 64)
    errs = {}
    for name in ("svd", "svdllm"):
        model = tiny_model("llama")
        rep = compress(model, get_method(name, ratio=0.5), calib, progress=False)
        errs[name] = [e.rel_error for e in rep.matrices if e.block == 0]
    assert all(a <= b + 1e-9 for a, b in zip(errs["svdllm"], errs["svd"], strict=True))


def test_ratio_zero_keeps_matrices_dense_and_rank_zero_is_refused():
    model = tiny_model("opt")
    before = {n: weight_matrix(m).clone() for n, m in block_linears(find_blocks(model)[1][0]).items()}
    report = compress(model, get_method("svd", ratio=0.0), calib_ids(), progress=False)
    assert all(e.rank is None and e.note == "kept dense: ratio 0" for e in report.matrices)
    with pytest.raises(ValueError, match="leaves rank 0"):
        compress(tiny_model("opt"), get_method("svd", ratio=0.99), calib_ids(), progress=False)
    after = block_linears(find_blocks(model)[1][0])
    assert all(torch.equal(weight_matrix(after[n]), w) for n, w in before.items())
    assert report.params_after == report.params_before


def test_plain_svd_without_data_equals_plain_svd_with_data():
    """svd ignores activations, so calib=None must give the same factors, only without calibration errors."""
    with_data, without = tiny_model("llama"), tiny_model("llama")
    rep_d = compress(with_data, get_method("svd", ratio=0.4), calib_ids(), progress=False)
    rep_n = compress(without, get_method("svd", ratio=0.4), None, progress=False)
    assert [e.rank for e in rep_n.matrices] == [e.rank for e in rep_d.matrices]
    assert all(e.rel_error is None for e in rep_n.matrices) and rep_n.calibration == {}
    sd_d, sd_n = with_data.state_dict(), without.state_dict()
    assert sd_d.keys() == sd_n.keys() and all(torch.equal(sd_d[k], sd_n[k]) for k in sd_d)
    before = tiny_model("llama")
    with pytest.raises(ValueError, match="svdllm needs calibration data"):
        compress(before, get_method("svdllm", ratio=0.4), None, progress=False)
    assert all(torch.equal(v, tiny_model("llama").state_dict()[k]) for k, v in before.state_dict().items())


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        get_method("svdllm", ratio=1.0)
    with pytest.raises(ValueError, match="unknown method"):
        get_method("svdzip")
    with pytest.raises(ValueError, match="propagation"):
        get_method("svdllm", propagation="sideways")
    with pytest.raises(ValueError, match="LongTensor"):
        compress(tiny_model("llama"), get_method("svd"), torch.randn(2, 8), progress=False)


def test_closed_form_update_lowers_its_objective_in_every_later_block():
    model = tiny_model("llama")
    report = compress(model, get_method("svdllm-update", ratio=0.5), calib_ids(), progress=False)
    for e in report.matrices:
        assert e.info["update_objective_after"] <= e.info["update_objective_before"] + 1e-9 * abs(
            e.info["update_objective_before"])
    assert any(e.info["update_objective_after"] < e.info["update_objective_before"] for e in report.matrices
               if e.block == 1)


def test_svdllm_v2_keeps_the_parameter_budget():
    model = tiny_model("qwen2")
    rep = compress(model, get_method("svdllm-v2", ratio=0.4), calib_ids(), progress=False)
    uniform = sum(rank_for_ratio(*e.shape, 0.4) * sum(e.shape) for e in rep.matrices)
    kept = sum(e.params_after for e in rep.matrices)
    assert abs(kept - uniform) <= sum(sum(e.shape) for e in rep.matrices)  # within one rank step per matrix
    ratios, losses = rep.extra["ratios"], rep.extra["truncation_losses"]
    assert ratios.keys() == losses.keys() and all(0 <= r < 1 for r in ratios.values())
    for name in {e.name for e in rep.matrices}:  # per type group: mean ratio kept, lossier matrices compressed less
        group = sorted((full for full in ratios if full.endswith(f".{name}")), key=losses.__getitem__)
        assert len(group) == 2 and sum(ratios[f] for f in group) / 2 == pytest.approx(0.4, abs=1e-9)
        assert ratios[group[0]] >= ratios[group[1]]
    assert len({e.rank for e in rep.matrices if e.name == "self_attn.q_proj"}) == 2  # the losses differ here


def test_fwsvd_uses_gradients_on_conv1d_models():
    model = tiny_model("gpt2")
    rep = compress(model, get_method("fwsvd", ratio=0.4, fisher_samples=2), calib_ids(), progress=False)
    assert all(e.rank and 0 < e.rel_error < 1 for e in rep.matrices)
    assert all(p.requires_grad for p in model.parameters())  # gradient flags restored


def test_the_statistics_key_changes_when_the_weights_do(tmp_path):
    """A checkpoint rewritten in place at the same path (same size, same tokens) must not reuse old statistics;
    nor may a model in memory whose weights changed."""
    from svdkit.io import open_streamed
    from svdkit.stats_cache import stats_key

    path, calib = tmp_path / "model", calib_ids()
    tiny_model("llama", seed=0).save_pretrained(path)
    first = stats_key(open_streamed(path, with_tokenizer=False), calib)
    assert stats_key(open_streamed(path, with_tokenizer=False), calib) == first  # stable while nothing changes
    tiny_model("llama", seed=1).save_pretrained(path)
    assert stats_key(open_streamed(path, with_tokenizer=False), calib) != first
    model = tiny_model("llama")
    before = stats_key(model, calib)
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    assert stats_key(model, calib) != before
