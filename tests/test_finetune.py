"""The sequential low-rank update: a round lowers its training loss and never touches the frozen factor."""

import json

import pytest
import torch
from conftest import tiny_model
from test_engine import calib_ids
from test_streaming import checkpoint

from svdkit import compress, get_method, load, open_model
from svdkit.errors import ConfigError
from svdkit.finetune import FinetuneConfig, finetune, loss_change, low_rank_layers
from svdkit.io import tensor_index
from svdkit.pipeline import compress_to


def compressed_model(ratio: float = 0.5):
    model = tiny_model("llama")
    compress(model, get_method("svdllm", ratio=ratio), calib_ids(), progress=False)
    return model


def snapshot(model, factor: str) -> dict[str, torch.Tensor]:
    return {n: getattr(m, factor).weight.detach().clone() for n, m in low_rank_layers(model).items()}


@pytest.mark.parametrize("mode", ["direct", "lora"])
@pytest.mark.parametrize("phase", ["u", "v"])
def test_a_round_lowers_its_loss_and_leaves_the_frozen_factor_bit_identical(mode, phase):
    model = compressed_model()
    data = calib_ids(n=4, seqlen=32, seed=1)
    frozen = "v" if phase == "u" else "u"
    before_frozen, before_trained = snapshot(model, frozen), snapshot(model, phase)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if ".u." not in n and ".v." not in n}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rep = finetune(model, data, FinetuneConfig(steps=12, lr=3e-3, phases=phase, batch_size=4, mode=mode,
                                               track_windows=4), progress=False)
    (ph,) = rep["phases"]
    assert ph["loss_after"] < ph["loss_before"]
    after_frozen, after_trained = snapshot(model, frozen), snapshot(model, phase)
    assert all(torch.equal(before_frozen[n], after_frozen[n]) for n in before_frozen)
    assert any(not torch.equal(before_trained[n], after_trained[n]) for n in before_trained)
    assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)
    for n, m in low_rank_layers(model).items():  # shapes and ranks unchanged, adapters merged away
        assert after_trained[n].shape == before_trained[n].shape and not hasattr(m.u, "parametrizations")
        assert m.u.weight.stride() == (1, m.u.weight.shape[0])  # W_u stays column-major
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}  # requires_grad flags restored


def test_a_half_precision_model_trains_in_float32_and_keeps_its_frozen_factor():
    model = compressed_model().to(torch.bfloat16)
    before = snapshot(model, "v")
    rep = finetune(model, calib_ids(n=4, seqlen=32, seed=1),
                   FinetuneConfig(steps=8, lr=3e-3, phases="u", batch_size=4, track_windows=4), progress=False)
    assert rep["phases"][0]["loss_after"] < rep["phases"][0]["loss_before"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.equal(before[n], w) for n, w in snapshot(model, "v").items())


def test_the_method_option_fine_tunes_after_compression():
    model = tiny_model("llama")
    rep = compress(model, get_method("svdllm-ft", ratio=0.5, ft_steps=3, ft_lr=1e-3), calib_ids(), progress=False)
    ft = rep.extra["finetune"]
    assert [p["phase"] for p in ft["phases"]] == ["u", "v"] and all(len(p["losses"]) == 3 for p in ft["phases"])
    assert rep.seconds >= ft["seconds"] > 0


def test_compress_to_fine_tunes_the_staged_folder_and_keeps_the_dtype_and_ranks(tmp_path):
    folder = checkpoint(tmp_path, "llama", torch.bfloat16)
    calib = calib_ids()
    plain, _ = compress_to(str(folder), tmp_path / "plain", get_method("adasvd", ratio=0.4), calib, progress=False)
    rep, _ = compress_to(str(folder), tmp_path / "ft", get_method("adasvd-ft", ratio=0.4, ft_steps=2, ft_lr=1e-3),
                         calib, progress=False)
    assert [e.rank for e in rep.matrices] == [e.rank for e in plain.matrices]
    assert rep.params_after == plain.params_after and len(rep.extra["finetune"]["phases"]) == 2
    saved = json.loads((tmp_path / "ft" / "svdkit_report.json").read_text())
    assert saved["extra"]["finetune"]["phases"][1]["phase"] == "v"
    index = tensor_index(tmp_path / "ft")
    tensors = index.read(index.names())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
    base = tensor_index(tmp_path / "plain").read(index.names())
    changed = [k for k in tensors if not torch.equal(tensors[k], base[k])]
    assert changed and all(k.endswith((".u.weight", ".v.weight")) for k in changed)  # only factors were trained
    model, _ = load(tmp_path / "ft")
    assert model(calib[:1]).logits.isfinite().all()
    assert not [p for p in tmp_path.iterdir() if ".stage-" in p.name]  # staging folders are removed


def test_bad_input_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="compress it first"):
        finetune(tiny_model("llama"), calib_ids(), FinetuneConfig(steps=1), progress=False)
    with pytest.raises(ConfigError, match="phases"):
        FinetuneConfig(phases="uw")
    with pytest.raises(ConfigError, match="LongTensor"):
        finetune(compressed_model(), torch.zeros(2, 8), progress=False)
    with pytest.raises(ConfigError, match="ft_steps"):
        get_method("adasvd-ft", ft_steps=-1)
    with pytest.raises(ConfigError, match="mode"):
        get_method("kfac", ft_steps=2, ft_mode="full")
    streamed = open_model(str(checkpoint(tmp_path, "llama")))
    with pytest.raises(ConfigError, match="compress_to"):
        compress(streamed, get_method("svdllm-ft", ratio=0.4), calib_ids(), progress=False)


def test_several_processes_are_refused_before_any_work(tmp_path, monkeypatch):
    from svdkit import dist

    folder = checkpoint(tmp_path, "llama")
    monkeypatch.setattr(dist, "_WORLD", dist.World(rank=0, size=2))
    with pytest.raises(ConfigError, match="one process"):
        compress_to(str(folder), tmp_path / "out", get_method("svdllm-ft", ratio=0.4), calib_ids(), progress=False)
    assert not (tmp_path / "out").exists()


def test_the_logged_loss_change_compares_like_with_like():
    # A noisy falling curve whose first step happens to be low: the first-step-vs-last-8 summary of old read
    # 1.0 -> 2.5 (a rise); equal-sized means of both ends show the fall, and tracked windows take precedence.
    losses = [1.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 2.0]
    assert loss_change(losses) == "mean training loss of the first / last 8 steps 5.438 -> 2.500"
    assert loss_change([4.0, 2.0]) == "mean training loss of the first / last 1 steps 4.000 -> 2.000"
    assert loss_change(losses, 3.25, 2.5) == "loss on the tracked windows 3.250 -> 2.500"
