"""The transformers format: plain transformers (trust_remote_code=True) loads the low-rank model, bit for bit."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoModelForCausalLM, MistralConfig

from svdkit import compress, get_method, load, save
from svdkit.hf_format import MODELING_FILE, is_transformers_folder
from svdkit.io import rank_map

ARCHS = ("llama", "qwen2", "mistral")


def tiny(arch: str):
    """conftest's tiny LLaMA-GQA / Qwen2, or the same shape as a Mistral."""
    if arch != "mistral":
        return tiny_model(arch)
    llama = tiny_config("llama")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(MistralConfig(**{k: getattr(llama, k) for k in keys})).eval()


def compressed(arch: str, ratio: float = 0.4):
    model = tiny(arch)
    dense_params = model.num_parameters()
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    compress(model, get_method("svdllm", ratio=ratio), calib, progress=False)
    return model, dense_params


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory, tokenizer):
    model, _ = compressed("llama")
    path = tmp_path_factory.mktemp("hf") / "llama-0.4"
    save(model, path, tokenizer=tokenizer, format="transformers")
    return model, path


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_transformers_loads_the_low_rank_model_bit_for_bit(arch, tmp_path):
    model, dense_params = compressed(arch)
    save(model, tmp_path / "hf", format="transformers")
    save(model, tmp_path / "svdkit")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ours, _ = load(tmp_path / "svdkit")
    ours_hf, _ = load(tmp_path / "hf")  # svdkit reads the same folder without running its code
    x = torch.randint(0, 300, (2, 24))
    ref = logits(ours, x)
    assert torch.equal(logits(plain, x), ref)
    assert torch.equal(logits(ours_hf, x), ref)
    assert torch.equal(logits(plain, x[:1, :1]), logits(ours, x[:1, :1]))  # the one-token (decode) path too
    # It is the low-rank model: the same rank map, the compressed parameter count.
    low = {n: m.rank for n, m in plain.named_modules() if type(m).__name__ == "LowRankLinear"}
    assert low == rank_map(model) and len(low) == 2 * 7
    assert plain.num_parameters() == ours.num_parameters() == model.num_parameters() < dense_params
    assert type(plain).__mro__[1].__name__ == type(model).__name__  # subclasses the original architecture


def test_save_pretrained_round_trips(saved_llama, tmp_path):
    model, path = saved_llama
    plain = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    plain.save_pretrained(tmp_path / "again")
    assert MODELING_FILE in os.listdir(tmp_path / "again")
    assert is_transformers_folder(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True)
    x = torch.randint(0, 300, (1, 16))
    assert torch.equal(logits(again, x), logits(model, x))
    assert again.num_parameters() == model.num_parameters()


def test_folder_declares_its_code_and_refuses_to_load_as_the_dense_architecture(saved_llama):
    _, path = saved_llama
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "svdkit_llama"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_svdkit.SvdkitForCausalLM"
    assert cfg["svdkit"]["format"] == "transformers" and cfg["svdkit"]["ranks"]
    readme = (path / "README.md").read_text()
    assert "trust_remote_code=True" in readme and "attention interface" in readme
    assert {"model.safetensors", "tokenizer.json", "svdkit_recipe.json"} <= set(os.listdir(path))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)


def test_modeling_file_runs_without_svdkit(saved_llama):
    """The folder's code needs only torch and transformers: load it in a process where svdkit cannot be imported."""
    model, path = saved_llama
    x = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    script = (
        "import sys; sys.modules['svdkit'] = None\n"
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)\n"
        f"x = torch.tensor({x.tolist()})\n"
        "with torch.no_grad(): print(repr(m(x).logits[0, -1, :4].tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert eval(out.stdout.strip().splitlines()[-1]) == logits(model, x)[0, -1, :4].tolist()


def test_bad_requests_fail_clearly_and_leave_nothing(saved_llama, tmp_path):
    model, path = saved_llama
    before = sorted(os.listdir(path))
    with pytest.raises(FileExistsError, match="already exists"):
        save(model, path, format="transformers")
    assert sorted(os.listdir(path)) == before
    with pytest.raises(ValueError, match="format must be"):
        save(model, tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match="dense=True"):
        save(model, tmp_path / "x", format="transformers", dense=True)
    from svdkit import QuantConfig, quantize_model

    quantized, _ = compressed("llama")
    quantize_model(quantized, QuantConfig(method="rtn", bits=4), progress=False)
    with pytest.raises(ValueError, match="quantized"):
        save(quantized, tmp_path / "q", format="transformers")
    assert not (tmp_path / "x").exists() and not (tmp_path / "q").exists()
