"""Gradient statistics computed block by block equal a per-window autograd pass through the whole model: FWSVD's
Fisher sums and K-FAC's output-gradient Grams (computed per block from the stored output gradients); the scratch
they need is bounded, checked first and removed."""

import gc
import os
import shutil
import subprocess
import sys
import tempfile
import weakref

import pytest
import torch
from conftest import tiny_model

from svdkit import gradients, output_grams
from svdkit.blocks import Blocks
from svdkit.errors import ConfigError
from svdkit.gradients import block_output_gradients, fisher_row_importance
from svdkit.layout import Layout, weight_matrix
from svdkit.methods import SVDLLM
from svdkit.output_grams import gradient_bytes, output_gradient_grams
from svdkit.profiler import Profiler
from svdkit.stats_cache import StatsCache


def brute_force_fisher(model, calib):
    """sum over windows of the squared gradient of that window's mean next-token loss, row sums per linear."""
    layout = Layout.of(model)
    blocks = layout.blocks(model)
    out = {layout.full(i, n): 0.0 for i, b in enumerate(layout.linears) for n in b}
    for w in range(calib.shape[0]):
        ids = calib[w : w + 1]
        model.zero_grad()
        model(ids, labels=ids, use_cache=False).loss.backward()
        for i, names in enumerate(layout.linears):
            for n in names:
                m = blocks[i].get_submodule(n)
                g = m.weight.grad if isinstance(m, torch.nn.Linear) else m.weight.grad.t()
                out[layout.full(i, n)] = out[layout.full(i, n)] + (g.double() ** 2).sum(dim=1)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_blockwise_fisher_equals_per_window_autograd(arch):
    model = tiny_model(arch)
    calib = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(0))
    ref = brute_force_fisher(model, calib)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = fisher_row_importance(Blocks(model), calib, progress=False)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].shape == (weight_matrix(model.get_submodule(k)).shape[0],)
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-12 * float(ref[k].max()))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    sub = fisher_row_importance(Blocks(model), calib, fisher_samples=2, progress=False)
    ref2 = brute_force_fisher(model, calib[:2])
    for k in ref2:  # `windows` uses the first windows only
        torch.testing.assert_close(sub[k], ref2[k], rtol=1e-4, atol=1e-12 * float(ref2[k].max()))


def brute_force_output_grams(model, calib):
    """sum over windows and tokens of g g^T, g the gradient of the window's summed loss at each linear's output."""
    layout = Layout.of(model)
    blocks = layout.blocks(model)
    names = [(layout.full(i, n), blocks[i].get_submodule(n)) for i, b in enumerate(layout.linears) for n in b]
    outs = {}
    handles = [m.register_forward_hook(lambda _m, _a, out, k=k: outs.__setitem__(k, out)) for k, m in names]
    ref = {}
    try:
        for w in range(calib.shape[0]):
            ids = calib[w : w + 1]
            with torch.enable_grad():
                logits = model(ids, use_cache=False).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                         reduction="sum")
                grads = torch.autograd.grad(loss, [outs[k] for k, _ in names])
            for (k, _), g in zip(names, grads, strict=True):
                g = g.reshape(-1, g.shape[-1]).double()
                ref[k] = ref.get(k, 0) + g.T @ g
    finally:
        for h in handles:
            h.remove()
    return ref


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_blockwise_output_gradient_grams_equal_autograd(arch):
    model = tiny_model(arch)
    calib = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    ref = brute_force_output_grams(model, calib)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = output_gradient_grams(Blocks(model), calib, progress=False)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6 * float(ref[k].abs().max()))
    assert not any(p.grad is not None for p in model.parameters())  # no weight gradients were formed
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_model_labels_give_another_psd_fisher():
    model = tiny_model("llama")
    calib = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    data = output_gradient_grams(Blocks(model), calib, progress=False)
    drawn = output_gradient_grams(Blocks(model), calib, labels="model", progress=False)
    again = output_gradient_grams(Blocks(model), calib, labels="model", progress=False)
    for key in data:
        assert not torch.allclose(data[key], drawn[key])
        assert float(torch.linalg.eigvalsh(drawn[key]).min()) >= -1e-6 * float(drawn[key].diagonal().max())
        assert torch.equal(again[key], drawn[key])  # the draw is seeded by the window's index
    with pytest.raises(ConfigError, match="labels"):
        output_gradient_grams(Blocks(model), calib, labels="oracle", progress=False)


def _walk_grams(grams, blocks: Blocks) -> dict:
    """Every block's Grams from an `OutputGrams`, through a walker, block by block."""
    walker, out = grams.walker(), {}
    for i in range(len(blocks)):
        with blocks.on_device(i) as block:
            out.update(walker.grams(i, block))
    return out


def test_the_profiler_runs_the_gradient_pass_once_per_calibration_set(tmp_path, monkeypatch):
    model = tiny_model("llama")
    calib = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    cache = StatsCache(tmp_path / "stats")
    first = Profiler(Blocks(model), calib, SVDLLM(), progress=False, stats_cache=cache).output_grams(2, "data")
    assert sorted(p.name for p in (tmp_path / "stats" / "outgrad-data-2").iterdir()) == [
        f"block-{i:05d}.safetensors" for i in range(model.config.num_hidden_layers)]  # one file per block, no spill
    monkeypatch.setattr(output_grams, "block_output_gradients", lambda *a, **k: pytest.fail("the pass ran again"))
    second = Profiler(Blocks(model), calib, SVDLLM(), progress=False, stats_cache=cache).output_grams(2, "data")
    ref = brute_force_output_grams(model, calib[:2])
    got1, got2 = _walk_grams(first, Blocks(model)), _walk_grams(second, Blocks(model))
    assert got1.keys() == got2.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got1[k], got2[k])
        torch.testing.assert_close(got1[k], ref[k], rtol=1e-4, atol=1e-6 * float(ref[k].abs().max()))


def test_the_gradients_are_handed_over_once_and_a_walk_holds_one_block_of_grams(tmp_path):
    """Memory and disk that do not grow with depth: the pass hands each block's output gradients over once, last
    block first, keeping none of them and removing its spilled inputs; a walk's Grams of block i are gone (once
    the caller drops them) before block i + 1's are computed."""
    model = tiny_model("llama")
    calib = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    layout = Layout.of(model)
    order, alive = [], []

    def sink(i, grads):
        gc.collect()
        assert all(r() is None for r in alive)  # the pass dropped the gradients it handed over before
        assert len(grads) == 3 and grads[0].shape == (1, 24, model.config.hidden_size)
        order.append(i)
        alive.extend(weakref.ref(g) for g in grads)

    block_output_gradients(Blocks(model), calib, sink, progress=False, spill=tmp_path)
    assert order == list(reversed(range(len(layout.linears))))  # last block first, each once
    assert list(tmp_path.iterdir()) == []  # the spilled inputs were removed
    grams = Profiler(Blocks(model), calib, SVDLLM(), progress=False, scratch=tmp_path).output_grams(None, "data")
    blocks, walker, seen = Blocks(model), grams.walker(), []
    for i in range(len(blocks)):
        with blocks.on_device(i) as block:
            out = walker.grams(i, block)
        gc.collect()
        assert all(r() is None for r in seen)
        assert set(out) == {layout.full(i, name) for name in layout.linears[i]}
        seen = [weakref.ref(g) for g in out.values()]
        del out
    with pytest.raises(RuntimeError, match="expected block 0"), blocks.on_device(1) as block:
        grams.walker().grams(1, block)  # out of order: a bug, never silently wrong Grams


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_walker_carries_exactly_the_dense_blocks_outputs(arch, tmp_path):
    """A walker's next inputs are the outputs its backward's forward computed (no second forward): bit for bit
    what the dense block gives on its inputs, tuple-returning blocks included."""
    model = tiny_model(arch)
    calib = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    grams = Profiler(Blocks(model), calib, SVDLLM(), progress=False, scratch=tmp_path).output_grams(None, "data")
    blocks, walker = Blocks(model), grams.walker()
    for i in range(len(blocks)):
        with blocks.on_device(i) as block:
            with torch.no_grad():
                expected = walker.x.run(block)
            walker.grams(i, block)
        assert len(walker.x) == len(expected) == 3
        assert all(torch.equal(a, b) for a, b in zip(walker.x.hidden, expected.hidden, strict=True))


def test_the_pass_stores_the_grams_where_they_take_less_room_than_the_gradients(tmp_path):
    """A block's Grams in float32 against its gradients: few tokens store the gradients, many the Grams; both
    give the Grams the autograd reference gives, and with the Grams stored the walks capture no stream and run
    no backward."""
    model = tiny_model("llama")
    blocks, layout = Blocks(model), Layout.of(model)
    per_block = output_grams.gram_bytes(layout)
    assert per_block == 4 * sum(m * m for m, _ in layout.linears[0].values())
    assert not output_grams.stores_grams(blocks, 3, 24)  # 3 x 24 x 64 float32 gradients: less than the Grams
    windows = -(-per_block // (24 * 64 * 4))  # the fewest windows whose gradients take as much room
    assert output_grams.stores_grams(blocks, windows, 24) and not output_grams.stores_grams(blocks, windows - 1, 24)
    calib = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    ref = brute_force_output_grams(model, calib)
    cache = StatsCache(tmp_path / "stats")
    store = output_grams.GradientStore(cache, "data-3")
    grams = output_grams.OutputGrams(blocks, calib, None, "data", store, progress=False, grams=True)
    stored = cache.get_set("outgram-data-3", 0)
    assert stored.keys() == {layout.full(0, n) for n in layout.linears[0]}
    assert all(g.dtype == torch.float32 and g.shape[0] == g.shape[1] for g in stored.values())
    walker = grams.walker()
    assert walker.x is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(output_grams, "block_backward", lambda *a, **k: pytest.fail("a walk back-propagated"))
        got = _walk_grams(grams, Blocks(model))
    computed = output_gradient_grams(Blocks(model), calib, progress=False, stored=False)
    assert got.keys() == computed.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], computed[k], rtol=1e-6, atol=1e-7 * float(ref[k].abs().max()))
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6 * float(ref[k].abs().max()))


def test_the_profiler_refuses_a_disk_too_small_before_computing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    calib = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    need = gradient_bytes(Blocks(model), 2, 24)
    assert need == 3 * 2 * 24 * 64 * 4  # (blocks + 1) x windows x tokens x hidden x float32 bytes
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**12, 10**12, need - 1))
    monkeypatch.setattr(output_grams, "block_output_gradients", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(ConfigError, match="GB on disk"):
        Profiler(Blocks(model), calib, SVDLLM(), progress=False, stats_cache=StatsCache(tmp_path)).output_grams(
            None, "data")
    assert list(tmp_path.iterdir()) == []


def test_a_gradient_pass_refuses_a_disk_too_small_for_its_spilled_inputs(tmp_path, monkeypatch):
    model = tiny_model("llama")
    calib = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    spilled = 2 * 2 * 24 * 64 * 4  # blocks x windows x tokens x hidden x float32 bytes
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**12, 10**12, spilled - 1))
    capture = gradients.capture
    monkeypatch.setattr(gradients, "capture", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(ConfigError, match=r"fisher pass's spilled block inputs need 0\.0 GB on disk"):
        fisher_row_importance(Blocks(model), calib, progress=False, spill=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing spilled, the empty spill folder removed
    monkeypatch.setattr(gradients, "capture", capture)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**12, 10**12, spilled))
    assert fisher_row_importance(Blocks(model), calib, progress=False, spill=tmp_path).keys()  # just enough room


def test_without_a_cache_the_gradients_live_in_a_scratch_folder_removed_with_them(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tiny_model("llama")
    calib = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    grams = Profiler(Blocks(model), calib, SVDLLM(), progress=False).output_grams(None, "data")
    names = [p.name for p in tmp_path.iterdir()]  # this process's folder; the spilled inputs are gone already
    assert len(names) == 1 and names[0].startswith(f".svdkit.grams-{os.getpid()}-")
    ref = brute_force_output_grams(model, calib)
    got = _walk_grams(grams, Blocks(model))
    assert got.keys() == ref.keys()
    del grams  # the profiler is gone already: the gradients lived as long as the OutputGrams
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_output_gradient_grams_are_gathered_in_full_precision(monkeypatch):
    """TF32 (on by the user's choice) never rounds the products summed into the Grams, as for the input Grams."""
    model = tiny_model("llama")
    calib = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    seen = []
    accumulate = gradients.accumulate_gram

    def spy(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(gradients, "accumulate_gram", spy)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed
    try:
        output_gradient_grams(Blocks(model), calib, progress=False)
        assert torch.get_float32_matmul_precision() == "high"  # the user's setting is given back
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen and set(seen) == {"highest"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: on the CPU both draws are the host's")
def test_model_drawn_labels_do_not_depend_on_the_device():
    logits = torch.randn(2, 24, 320, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gradients.model_labels(logits.cuda(), 7).cpu(), gradients.model_labels(logits, 7))


def _dead_pid() -> int:
    """The id of a process that has ended (a scratch folder of it is a killed run's leftover)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_scratch_a_killed_run_left_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """A killed run's spilled inputs and Grams (named with its PID and host) go when the next pass starts; a live
    process's are kept; the pass's own are gone when it ends."""
    from svdkit._fs import _host

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead, host = _dead_pid(), _host()
    stale = [tmp_path / f".svdkit.{kind}-{dead}-{host}-x" for kind in ("spill", "grams")]
    live = tmp_path / f".svdkit.grams-1-{host}-y"  # pid 1 runs as long as the machine does
    for folder in [*stale, live]:
        folder.mkdir()
        (folder / "block-00000.safetensors").write_bytes(b"0" * 64)
    model = tiny_model("llama")
    calib = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    grams = Profiler(Blocks(model), calib, SVDLLM(), progress=False).output_grams(None, "data")
    assert not any(p.exists() for p in stale) and live.exists()
    del grams
    gc.collect()
    assert list(tmp_path.iterdir()) == [live]
