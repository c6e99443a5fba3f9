"""The transformers format: plain transformers (trust_remote_code=True) loads the low-rank model, bit for bit."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config, tiny_model
from torch import nn
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
    assert type(model).__name__ in [c.__name__ for c in type(plain).__mro__]  # subclasses the original architecture


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


# --------------------------------------------------------------------------------------------- vLLM's conventions
# vLLM's Transformers backend builds the base model through `auto_map.AutoModel`, checks
# `is_backend_compatible()`, routes attention through transformers' attention interface with its own kwargs, and
# shards linears by the config's `base_model_tp_plan`. vLLM itself is not installed here: these are the parts of
# that path transformers can run.
@pytest.mark.parametrize("arch", ARCHS)
def test_the_folder_loads_through_automodel_as_the_low_rank_base_model(arch, tmp_path):
    from transformers import AutoModel

    model, _ = compressed(arch)
    save(model, tmp_path / "hf", format="transformers")
    base = AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert type(base).__name__ == "SvdkitModel" and base.is_backend_compatible()
    low = {f"model.{n}": m.rank for n, m in base.named_modules() if type(m).__name__ == "LowRankLinear"}
    assert low == rank_map(model)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(base(x).last_hidden_state, model.model(x).last_hidden_state)


def test_the_attention_interface_receives_the_kwargs_passed_to_the_model(saved_llama):
    from transformers import AttentionInterface, AutoModel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _, path = saved_llama
    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append((type(module.q_proj).__name__, query.shape, kwargs.get("served_by")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("svdkit_recording", recording)
    base = AutoModel.from_pretrained(path, trust_remote_code=True, attn_implementation="svdkit_recording")
    x = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        base(x, served_by="vllm")
    n_layers = base.config.num_hidden_layers
    assert len(seen) == n_layers and all(s == ("LowRankLinear", (1, 4, 8, 16), "vllm") for s in seen)


def test_the_tensor_parallel_plan_names_real_modules_and_shards_each_pair_once(tmp_path):
    """Column-wise matrices shard `W_u`, row-wise ones `W_v`; a matrix kept dense keeps its own entry."""
    from transformers import AutoModel

    from svdkit.compression import uniform_ratios

    model = tiny("llama")
    ratios = uniform_ratios(model, 0.4)
    ratios["model.layers.1.mlp.down_proj"] = 0.0  # kept dense
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    compress(model, get_method("svdllm", ratio=0.4), calib, ratios=ratios, progress=False)
    save(model, tmp_path / "hf", format="transformers")
    base = AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    plan = base.config.base_model_tp_plan
    modules = dict(base.named_modules())
    assert plan and all(isinstance(modules.get(name), nn.Linear) for name in plan), plan
    assert plan["layers.0.self_attn.q_proj.u"] == "colwise" and "layers.0.self_attn.q_proj.v" not in plan
    assert plan["layers.0.self_attn.o_proj.v"] == "rowwise" and "layers.0.self_attn.o_proj.u" not in plan
    assert plan["layers.0.mlp.down_proj.v"] == "rowwise"
    assert plan["layers.1.mlp.down_proj"] == "rowwise"  # the dense one
    dense_plan = type(base.config).__mro__[1].base_model_tp_plan
    assert len(plan) == len(dense_plan) * base.config.num_hidden_layers  # every matrix of every layer, once
