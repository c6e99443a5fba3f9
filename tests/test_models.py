import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from svdkit import count_parameters, load_model
from svdkit.models import ModelError, block_linears, find_blocks, weight_matrix

EXPECTED_LINEARS = {
    "llama": {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    },
    "qwen2": {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    },
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
}


def test_blocks_and_linears_are_found_structurally(arch):
    model = tiny_model(arch)
    _, blocks = find_blocks(model)
    assert len(blocks) == 2
    assert set(block_linears(blocks[0])) == EXPECTED_LINEARS[arch]


def test_gqa_shapes_and_conv1d_orientation():
    llama = tiny_model("llama")
    k = block_linears(find_blocks(llama)[1][0])["self_attn.k_proj"]
    assert weight_matrix(k).shape == (2 * 16, 64)  # n_kv_heads * head_dim x hidden
    gpt2 = tiny_model("gpt2")
    c_attn = block_linears(find_blocks(gpt2)[1][0])["attn.c_attn"]
    assert isinstance(c_attn, Conv1D) and weight_matrix(c_attn).shape == (3 * 64, 64)
    x = torch.randn(3, 64)
    assert torch.allclose(c_attn(x), x @ weight_matrix(c_attn).T + c_attn.bias, atol=1e-5)


def test_unsupported_architecture_is_named():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"num_hidden_layers": 3})()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ModelError, match="unsupported architecture NoBlocks"):
        find_blocks(NoBlocks())


def test_parameter_counts_separate_block_linears():
    model = tiny_model("llama")
    counts = count_parameters(model)
    per_block = 64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 160
    assert counts["block_linears"] == 2 * per_block
    assert counts["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_local_folder_roundtrip(tmp_path, tokenizer, dtype):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path), dtype=dtype)
    assert next(loaded.parameters()).dtype == getattr(torch, dtype)
    x = torch.randint(0, 300, (1, 12))
    if dtype == "float32":
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert tok("a b c")["input_ids"] == tokenizer("a b c")["input_ids"]


def test_bad_model_inputs_fail_clearly(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        load_model(str(f))
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model("smollm2-135m", dtype="int3")


def test_unreachable_hub_id_gives_one_line_error():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "svdkit.cli", "eval", "--model", "someorg/not-a-model"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("svdkit: error:")]
    assert len(err) == 1 and "someorg/not-a-model" in err[0] and "no network" in err[0]
