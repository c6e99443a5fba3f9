"""Block-local refinement: each block's factors trained right after its factorization, towards the dense block's
outputs, one block on the device (the dense ones read from disk), the same with one process or two."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

import svdkit
from svdkit.blocks import Blocks
from svdkit.cli import main
from svdkit.errors import ConfigError
from svdkit.layout import count_parameters
from svdkit.linalg import NumericalError
from svdkit.methods import parse_method
from svdkit.methods.refine import RefineConfig
from svdkit.modules import LowRankLinear
from svdkit.refine import BlockRefiner
from svdkit.stream import BlockInputs, Stream, capture


def calib_ids(n: int = 6, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(0))


def first_block_and_targets(target):
    """A tiny LLaMA compressed by svdllm, its blocks, the first block's captured inputs and `target(output)` for
    each batch of that block's outputs: what a test hands `BlockRefiner.fit` for block 0."""
    model = tiny_model("llama")
    calib = calib_ids()
    svdkit.compress(model, parse_method("svdllm", ratio=0.4), calib, progress=False)
    blocks = Blocks(model)
    x = capture(blocks, calib, 2)
    with torch.no_grad():
        targets = [target(t) for t in x.outputs(blocks.list[0])]
    return model, blocks, x, targets


@pytest.mark.parametrize("target", ["stream", "anchored", "correct", "token-loss", "fisher-loss"])
def test_refinement_lowers_every_block_objective_and_keeps_ranks_and_counts(target):
    plain, refined = tiny_model("llama"), tiny_model("llama")
    calib = calib_ids()
    method = "ada-kfac:alloc=uniform" if target == "fisher-loss" else "adasvd:adacr=false"  # fisher: K-FAC's Grams
    base = svdkit.compress(plain, parse_method(method, ratio=0.4), calib, progress=False)
    option = {"token-loss": "rf_loss=token", "correct": "rf_correct=0.5", "fisher-loss": "rf_loss=fisher"}.get(
        target, f"rf_target={target}")
    spec = f"{method},rf_steps=24,rf_lr=1e-3,{option}"
    report = svdkit.compress(refined, parse_method(spec, ratio=0.4), calib, progress=False)
    blocks = report.extra["refine"]["blocks"]
    assert [b["block"] for b in blocks] == [0, 1]
    assert all(b["objective_after"] < b["objective_before"] for b in blocks), blocks
    assert report.extra["refine"]["seconds"] > 0
    assert [e.rank for e in report.matrices] == [e.rank for e in base.matrices]
    assert report.params_after == base.params_after == count_parameters(refined)
    x = calib[:2]
    with torch.no_grad():
        assert not torch.equal(refined(x).logits, plain(x).logits)


def test_a_refinement_changes_its_own_factors_and_nothing_else():
    """One block's refinement trains that block's W_u and W_v: its norms, biases and every other block stay bit
    for bit (norms train only with norms=True)."""
    model, blocks, x, targets = first_block_and_targets(lambda t: 1.1 * t)  # what the block does not output yet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refiner = BlockRefiner(RefineConfig(steps=8, lr=1e-3), progress=False)
    refiner.fit(0, blocks.list[0], [(x, targets)])
    entry = refiner.report()["blocks"][0]
    assert entry["kept"] and entry["objective_after"] < entry["objective_before"]
    after = model.state_dict()
    factors = {k for k in after if k.startswith("model.layers.0.") and k.endswith((".u.weight", ".v.weight"))}
    assert factors and all(not torch.equal(after[k], before[k]) for k in factors)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in factors)
    assert after["model.layers.0.self_attn.q_proj.u.weight"].stride()[0] == 1  # W_u keeps its column-major layout


def test_a_refinement_that_makes_its_block_worse_is_undone():
    model, blocks, x, targets = first_block_and_targets(lambda t: t + 1e-3)  # almost there: a large step overshoots
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refiner = BlockRefiner(RefineConfig(steps=4, lr=0.1, warmup=0.0), progress=False)
    refiner.fit(0, blocks.list[0], [(x, targets)])
    entry = refiner.report()["blocks"][0]
    assert not entry["kept"] and entry["objective_after"] > entry["objective_before"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_refinement_that_makes_its_block_worse_is_retried_at_a_lower_learning_rate():
    """`retries`: the overshooting step size of the test above is cut by `BACKOFF` until the block's objective
    falls; each attempt starts from the factorized factors, so the result is the plain run at the lower rate."""
    from svdkit.methods.refine import BACKOFF

    model, blocks, x, targets = first_block_and_targets(lambda t: 1.02 * t)  # reachable; lr 0.1 overshoots by far
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refiner = BlockRefiner(RefineConfig(steps=4, lr=0.1, warmup=0.0, retries=6), progress=False)
    refiner.fit(0, blocks.list[0], [(x, targets)])
    entry = refiner.report()["blocks"][0]
    assert entry["kept"] and entry["objective_after"] < entry["objective_before"]
    assert entry["attempts"] > 1 and entry["lr"] == pytest.approx(0.1 * BACKOFF ** (entry["attempts"] - 1))
    retried = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    plain = BlockRefiner(RefineConfig(steps=4, lr=entry["lr"], warmup=0.0), progress=False)
    plain.fit(0, blocks.list[0], [(x, targets)])
    assert plain.report()["blocks"][0]["objective_after"] == entry["objective_after"]
    assert all(torch.equal(v, retried[k]) for k, v in model.state_dict().items())
    assert parse_method("ada-kfac-rf:rf_retries=2", ratio=0.4).refine_config.retries == 2
    with pytest.raises(ConfigError, match="retries"):
        parse_method("svdllm:rf_steps=4,rf_retries=-1")


def test_refinement_holds_one_block_of_a_model_read_from_disk(tmp_path, tokenizer, monkeypatch):
    """Compressing a checkpoint on disk: when a block is refined, every other block is on the meta device."""
    from svdkit import refine
    from svdkit.pipeline import compress_to

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    opened = svdkit.open_model(str(folder))
    fit, seen = refine.BlockRefiner.fit, []

    def spy(self, i, block, segments):
        others = [p for j, b in enumerate(opened.model.model.layers) if j != i for p in b.parameters()]
        seen.append((i, all(p.is_meta for p in others), any(p.is_meta for p in block.parameters())))
        return fit(self, i, block, segments)

    monkeypatch.setattr(refine.BlockRefiner, "fit", spy)
    report, _ = compress_to(opened, tmp_path / "out", parse_method("svdllm:rf_steps=4", ratio=0.4), calib_ids(),
                            progress=False)
    assert seen == [(0, True, False), (1, True, False)]
    assert len(report.extra["refine"]["blocks"]) == 2
    loaded, _ = svdkit.load(tmp_path / "out")
    assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == 14


@pytest.mark.parametrize("target", ["stream", "anchored"])
def test_training_windows_reach_refinement_and_nothing_else(target):
    """Training-only windows: refinement trains on them beside the calibration windows (and ends elsewhere than
    without them); the statistics never see them, so a method without refinement is bit-identical."""
    calib, extra = calib_ids(6), calib_ids(10)[6:]
    plain, with_train = tiny_model("llama"), tiny_model("llama")
    svdkit.compress(plain, parse_method("svdllm", ratio=0.4), calib, progress=False)
    svdkit.compress(with_train, parse_method("svdllm", ratio=0.4), calib, train=extra, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), with_train.state_dict().values(),
                                                 strict=True))
    spec = f"svdllm:rf_steps=6,rf_lr=1e-3,rf_target={target}"
    alone, more = tiny_model("llama"), tiny_model("llama")
    r1 = svdkit.compress(alone, parse_method(spec, ratio=0.4), calib, progress=False)
    r2 = svdkit.compress(more, parse_method(spec, ratio=0.4), calib, train=extra, progress=False)
    assert (r1.extra["refine"]["windows"], r2.extra["refine"]["windows"]) == (6, 10)
    assert all(b["objective_after"] < b["objective_before"] for b in r2.extra["refine"]["blocks"])
    x = calib[:2]
    with torch.no_grad():
        assert not torch.equal(alone(x).logits, more(x).logits)


@pytest.mark.parametrize("correct", [1.0, 0.5])
def test_a_corrected_stream_target_moves_towards_the_dense_model(monkeypatch, correct):
    """Each block's pairs under `rf_correct=c`, for the calibration and the training-only windows: the inputs are
    the compressed model's hidden states (the blocks before it compressed and refined), the targets the dense
    block's outputs on them moved a fraction `c` of the way to the dense model's own hidden states after it."""
    model, dense = tiny_model("llama"), tiny_model("llama")
    windows = calib_ids(10)
    seen = []
    fit = BlockRefiner.fit

    def spy(self, i, block, segments):
        with torch.no_grad():
            seen.append([(torch.cat(x.hidden), torch.cat(x.outputs(dense.model.layers[i])), torch.cat(t))
                         for x, t in segments])
        fit(self, i, block, segments)

    monkeypatch.setattr(BlockRefiner, "fit", spy)
    svdkit.compress(model, parse_method(f"svdllm:rf_steps=4,rf_lr=1e-3,rf_correct={correct}", ratio=0.4),
                    windows[:6], train=windows[6:], progress=False)
    after = []
    hooks = [layer.register_forward_hook(lambda m, a, out: after.append(out[0] if isinstance(out, tuple) else out))
             for layer in dense.model.layers]
    with torch.no_grad():
        dense(windows)
        hc = model(windows, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    assert [len(s) for s in seen] == [2, 2]
    for i, segments in enumerate(seen):
        for (x, stream, target), rows in zip(segments, (slice(0, 6), slice(6, 10)), strict=True):
            torch.testing.assert_close(x, hc[i][rows])
            torch.testing.assert_close(target, stream + correct * (after[i][rows] - stream))
    assert not torch.allclose(seen[1][0][1], after[1][:6], atol=1e-3)  # the two ends differ: not vacuous


def test_training_windows_start_with_the_calibration_windows(tokenizer):
    from svdkit.data import DataError, calibration, calibration_and_training

    text = " ".join(f"word{i % 97}" for i in range(3000))
    calib, train = calibration_and_training(text, tokenizer, 4, 9, seqlen=16, seed=3)
    assert torch.equal(calib, calibration(text, tokenizer, n=4, seqlen=16, seed=3))
    assert train.shape == (5, 16)
    assert calibration_and_training(text, tokenizer, 4, None, seqlen=16)[1] is None
    assert calibration_and_training(text, tokenizer, 4, 4, seqlen=16)[1] is None
    with pytest.raises(DataError, match="must include the 4 calibration windows"):
        calibration_and_training(text, tokenizer, 4, 3, seqlen=16)
    with pytest.raises(ConfigError, match="must be alike"):
        svdkit.compress(tiny_model("llama"), parse_method("svdllm:rf_steps=2", ratio=0.4), calib_ids(4),
                        train=calib_ids(2, seqlen=16), progress=False)


def test_the_token_loss_weighs_every_token_alike():
    """`rf_loss=token`: one token with a hundredfold norm and the same relative error counts as much as any other,
    where `relative` lets it decide the loss."""
    from svdkit.refine import _Windows

    t = torch.ones(1, 4, 8)
    t[0, 0] *= 100.0
    y = t * 1.1  # every token 10 % off
    y[0, 1:] = t[0, 1:]  # except that only the big one is: its relative error 1 %, the others' 0
    x = Stream([t.clone()], BlockInputs([()], [{}]), torch.device("cpu"), torch.device("cpu"))
    data = _Windows([(x, [t])])

    class Fixed(torch.nn.Module):
        def forward(self, h):
            return y

    num, den = data.sums(Fixed(), [0], "token")
    assert float(num) / den == pytest.approx(0.01 / 4)
    num, den = data.sums(Fixed(), [0], "relative")
    assert float(num) / den == pytest.approx(0.01 * 100**2 / (100**2 + 3), rel=1e-5)


def test_the_fisher_loss_is_the_error_in_the_output_gradient_metric():
    """`rf_loss=fisher` with Gram `G`: `sum e^T G_d e / sum t^T G_d t`, `G_d` damped by 1 % of its mean diagonal
    (a singular `G` included); with `G = I` that is the `relative` loss; a zero or non-finite `G` is refused."""
    from svdkit.refine import _Windows, metric_root

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    g = a @ a.T  # rank 5 of 8: PSD, singular
    root = metric_root(g)
    damped = g + 0.01 * float(g.diagonal().mean()) * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(root.double() @ root.double().T, damped, rtol=1e-5, atol=1e-5)
    t = torch.randn(1, 4, 8, generator=gen)
    y = t + 0.1 * torch.randn(1, 4, 8, generator=gen)
    x = Stream([t.clone()], BlockInputs([()], [{}]), torch.device("cpu"), torch.device("cpu"))

    class Fixed(torch.nn.Module):
        def forward(self, h):
            return y

    num, den = _Windows([(x, [t])], root).sums(Fixed(), [0], "fisher")
    e, tt = (y - t).double().reshape(4, 8), t.double().reshape(4, 8)
    expected = torch.einsum("ti,ij,tj->", e, damped, e) / torch.einsum("ti,ij,tj->", tt, damped, tt)
    assert float(num) / den == pytest.approx(float(expected), rel=1e-5)
    identity = _Windows([(x, [t])], metric_root(torch.eye(8)))
    num_i, den_i = identity.sums(Fixed(), [0], "fisher")
    num_r, den_r = _Windows([(x, [t])]).sums(Fixed(), [0], "relative")
    assert float(num_i) / den_i == pytest.approx(float(num_r) / den_r, rel=1e-5)
    with pytest.raises(NumericalError, match="is zero"):
        metric_root(torch.zeros(8, 8))
    with pytest.raises(NumericalError, match="non-finite"):
        metric_root(torch.full((8, 8), float("nan")))


@pytest.mark.parametrize("arch, writer", [("llama", "mlp.down_proj"), ("qwen2", "mlp.down_proj"), ("opt", "fc2"),
                                          ("gpt2", "mlp.c_proj")])
def test_the_block_output_linear_is_the_mlp_output_projection(arch, writer):
    from svdkit.layout import Layout

    layout = Layout.of(tiny_model(arch))
    assert [layout.output_linear(i) for i in range(layout.n_blocks)] == [writer] * layout.n_blocks


def test_the_fisher_metric_is_the_output_gradient_gram_of_the_block_output(monkeypatch):
    """What each block's `fisher` loss weighs with: the dense model's loss-gradient Gram at that block's output,
    which is its down projection's output-gradient Gram (the residual sum passes the gradient on unchanged)."""
    from svdkit.gradients import block_output_gradients
    from svdkit.output_grams import output_gradient_grams

    calib = calib_ids()
    dense = Blocks(tiny_model("llama"))
    reference = output_gradient_grams(dense, calib, progress=False)
    outputs = {}
    block_output_gradients(dense, calib, lambda i, grads: outputs.__setitem__(i, torch.cat(grads)), progress=False)
    seen, set_metric = {}, BlockRefiner.set_metric

    def spy(self, i, gram):
        seen[i] = gram.clone()
        set_metric(self, i, gram)

    monkeypatch.setattr(BlockRefiner, "set_metric", spy)
    svdkit.compress(tiny_model("llama"), parse_method("ada-kfac:rf_steps=2,rf_loss=fisher", ratio=0.4), calib,
                    progress=False)
    assert sorted(seen) == [0, 1]
    for i, gram in seen.items():
        torch.testing.assert_close(gram, reference[f"model.layers.{i}.mlp.down_proj"])
        g = outputs[i].reshape(-1, gram.shape[0]).double()
        torch.testing.assert_close(gram, g.T @ g, rtol=1e-5, atol=1e-7 * float(gram.abs().max()))  # float32 grads


def test_bad_refinement_options_are_refused():
    with pytest.raises(ConfigError, match="refinement target"):
        parse_method("svdllm:rf_steps=4,rf_target=logits")
    with pytest.raises(ConfigError, match="rf_steps"):
        parse_method("svdllm:rf_steps=-1")
    with pytest.raises(ConfigError, match="correct must be a fraction"):
        parse_method("svdllm:rf_steps=4,rf_correct=1.5")
    with pytest.raises(ConfigError, match="stream target only"):
        parse_method("svdllm:rf_steps=4,rf_correct=0.5,rf_target=anchored")
    with pytest.raises(ConfigError, match="does not compute"):
        parse_method("svdllm:rf_steps=4,rf_loss=fisher")
    with pytest.raises(ConfigError, match="refinement loss"):
        parse_method("ada-kfac:rf_steps=4,rf_loss=kl")
    with pytest.raises(ConfigError, match="needs calibration data"):
        svdkit.compress(tiny_model("llama"), parse_method("svd:rf_steps=4", ratio=0.4), None, progress=False)


@pytest.mark.parametrize("spec", ["svdllm:", "svdllm:rf_correct=0.5,", "ada-kfac:alloc=uniform,rf_loss=fisher,"])
def test_two_processes_refine_to_the_one_process_factors(tiny_folder, tmp_path, spec):
    from test_distributed import products, torchrun

    args = ["compress", "--model", str(tiny_folder), "--method", f"{spec}rf_steps=6,rf_lr=1e-3,rf_batch=3",
            "--ratio", "0.3", "--calib", "ptb", "--nsamples", "6", "--seqlen", "32", "--calib-batch-size", "2",
            "--train-nsamples", "11"]  # 5 training-only windows: 3 on rank 0, 2 on rank 1
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    run = torchrun([*args, "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = products(tmp_path / "one"), products(tmp_path / "two")
    assert one.keys() == two.keys()
    # summation order differs (windows batched per rank), and AdamW's first steps move each weight by about the
    # learning rate whatever its gradient's size: compare each product as a whole, not entry by entry
    diffs = {k: float(torch.linalg.norm(two[k] - one[k]) / torch.linalg.norm(one[k])) for k in one}
    assert max(diffs.values()) < 1e-3, diffs
    rep = [json.loads((tmp_path / d / "svdkit_report.json").read_text())["extra"]["refine"] for d in ("one", "two")]
    assert rep[0]["windows"] == rep[1]["windows"] == 11
    for a, b in zip(rep[0]["blocks"], rep[1]["blocks"], strict=True):
        assert b["objective_after"] == pytest.approx(a["objective_after"], rel=1e-4)
