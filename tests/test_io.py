"""Saving and reloading compressed models: bit-identical, strict, atomic, no pickles."""

import json
import os

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from svdkit import LowRankLinear, compress, get_method, load, load_model, save
from svdkit.io import LOWRANK_WEIGHTS, LoadError, rank_map


def compressed(arch, ratio=0.4):
    model = tiny_model(arch)
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    report = compress(model, get_method("svdllm", ratio=ratio), calib, progress=False)
    return model, report


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory, tokenizer):
    model, report = compressed("llama")
    path = tmp_path_factory.mktemp("llama") / "c"
    save(model, path, tokenizer=tokenizer, report=report, recipe={"note": "test"})
    return model, path


def test_save_load_gives_bit_identical_logits(arch, tmp_path):
    model, report = compressed(arch)
    save(model, tmp_path / "c", report=report)
    loaded, tok = load(tmp_path / "c")
    assert tok is None
    assert rank_map(loaded) == rank_map(model) and len(rank_map(model)) > 0
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_folder_contents_are_safetensors_json_and_the_tokenizer(saved_llama):
    model, path = saved_llama
    names = set(os.listdir(path))
    assert {LOWRANK_WEIGHTS, "config.json", "svdkit_recipe.json", "svdkit_report.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["svdkit"]["ranks"] == rank_map(model)
    recipe = json.loads((path / "svdkit_recipe.json").read_text())
    assert recipe["method"] == "svdllm" and recipe["config"]["ratio"] == 0.4 and recipe["note"] == "test"
    assert set(recipe["versions"]) >= {"torch", "transformers", "svdkit"}


def test_load_model_recognises_a_compressed_folder(saved_llama, tokenizer):
    model, path = saved_llama
    loaded, tok = load_model(str(path))
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    assert tok("a b")["input_ids"] == tokenizer("a b")["input_ids"]


def test_missing_or_unexpected_weights_fail_loudly(saved_llama, tmp_path):
    _, path = saved_llama
    state = load_file(str(path / LOWRANK_WEIGHTS))
    for mutate, msg in ((lambda s: s.pop("model.layers.1.mlp.down_proj.u.weight"), "missing"),
                        (lambda s: s.__setitem__("model.layers.0.extra", torch.zeros(2)), "unexpected")):
        broken = tmp_path / msg
        broken.mkdir()
        (broken / "config.json").write_text((path / "config.json").read_text())
        s = dict(state)
        mutate(s)
        save_file(s, str(broken / LOWRANK_WEIGHTS))
        with pytest.raises(LoadError, match=msg):
            load(broken)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(LoadError, match="has neither svdkit.safetensors nor svdkit.safetensors.index.json"):
        load(tmp_path)


def test_plain_transformers_refuses_the_compressed_folder(saved_llama):
    _, path = saved_llama
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(path)


def test_dense_export_loads_with_plain_transformers(arch, tmp_path):
    model, _ = compressed(arch)
    save(model, tmp_path / "d", dense=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ref, out = model(x).logits, plain(x).logits
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()))


def test_saving_never_destroys_or_half_writes(saved_llama, tmp_path):
    model, path = saved_llama
    before = sorted(os.listdir(path))
    with pytest.raises(FileExistsError, match="already exists"):
        save(model, path)
    assert sorted(os.listdir(path)) == before

    class Exploding:
        def save_pretrained(self, _):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save(model, path, tokenizer=Exploding(), overwrite=True)
    assert sorted(os.listdir(path)) == before  # the old folder survives a failed overwrite
    assert [p for p in os.listdir(path.parent) if "partial" in p] == []


def test_compressed_folder_is_smaller_on_disk_by_the_rank_map(tmp_path):
    model = tiny_model("llama")
    save(model, tmp_path / "dense", dense=True)
    compressed_model, report = compressed("llama", ratio=0.6)
    save(compressed_model, tmp_path / "c")
    saved_bytes = (tmp_path / "dense" / "model.safetensors").stat().st_size - (
        tmp_path / "c" / LOWRANK_WEIGHTS).stat().st_size
    expected = 4 * sum(e.params_before - e.params_after for e in report.matrices)
    assert saved_bytes == pytest.approx(expected, rel=0.02)


def test_load_with_the_low_rank_kv_cache_generates_the_same_tokens(saved_llama):
    _, path = saved_llama
    normal, _ = load(path)
    low, _ = load(path, kv_cache="low-rank")
    ids = torch.randint(0, 300, (1, 8))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(normal.generate(ids, **kwargs), low.generate(ids, **kwargs))
    with pytest.raises(ValueError, match="kv_cache must be"):
        load(path, kv_cache="tiny")


def test_load_warns_once_when_another_major_version_wrote_the_folder(saved_llama, tmp_path, caplog):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(saved_llama[1], folder)
    with caplog.at_level("WARNING", logger="svdkit.io"):
        load(folder)
    assert not [r for r in caplog.records if "major version" in r.getMessage()]
    recipe = json.loads((folder / "svdkit_recipe.json").read_text())
    recipe["versions"].update(svdkit="99.0.0", transformers="4.57.1")
    (folder / "svdkit_recipe.json").write_text(json.dumps(recipe))
    caplog.clear()
    with caplog.at_level("WARNING", logger="svdkit.io"):
        load(folder)
    lines = [r.getMessage() for r in caplog.records if "major version" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "svdkit 99.0.0" in lines[0] and "transformers 4.57.1" in lines[0]


@pytest.mark.parametrize("fmt", ["svdkit", "transformers"])
@pytest.mark.parametrize("reader", ["load", "load_model", "open_model"])
def test_a_folder_s_config_is_read_at_most_twice_per_load(tmp_path, tokenizer, monkeypatch, fmt, reader):
    """One `ModelFolder` per load: svdkit parses `config.json` once, transformers at most once more (building its
    config object); the tokenizer and the format checks reuse them."""
    import builtins
    import io

    import svdkit

    model, report = compressed("llama")
    save(model, tmp_path / "c", tokenizer=tokenizer, report=report, format=fmt)
    reads, real = [], builtins.open

    def counting(file, *args, **kwargs):
        if os.path.basename(str(file)) == "config.json":
            reads.append(file)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting)
    monkeypatch.setattr(io, "open", counting)  # pathlib's read_text opens through io.open
    getattr(svdkit, reader)(str(tmp_path / "c"))
    assert 1 <= len(reads) <= 2, reads
