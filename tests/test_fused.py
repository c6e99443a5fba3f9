"""Fused sibling pairs (q/k/v, gate/up share one stacked W_v): same outputs, no added memory, exact undo."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from svdkit import compress, get_method, save
from svdkit.errors import ConfigError
from svdkit.fused import StemSlice, fuse_shared_inputs, is_fused, sibling_groups, unfuse_shared_inputs
from svdkit.generation import generate_text
from svdkit.layout import count_parameters


def low_rank(arch: str, ratio: float = 0.4):
    model = tiny_model(arch)
    compress(model, get_method("svd", ratio=ratio), None, progress=False)
    return model


def ids(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_model_gives_the_same_logits_and_tokens_and_unfuses_bit_identically(arch):
    model = low_rank(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = count_parameters(model)["total"]
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        ref_tokens = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert fuse_shared_inputs(model) == 2 * 2  # per block: q/k/v and gate/up
    assert is_fused(model) and count_parameters(model)["total"] == params  # the stem replaces, never adds
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0), ref_tokens)
    with torch.inference_mode():  # inference tensors carry no version counter
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-5)
    assert unfuse_shared_inputs(model) == 2 * 5 and not is_fused(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_groups_are_the_pairs_that_read_one_tensor_and_a_dense_sibling_stays_out():
    model = low_rank("llama")
    attn = model.model.layers[0].self_attn
    attn.k_proj = attn.k_proj.to_linear()  # dense: not a member; q and v still share their input
    groups = sorted(sorted(g) for g in sibling_groups(model))
    assert groups[:2] == [["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
                          ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]]
    assert len(groups) == 4


def test_a_sibling_given_another_or_a_modified_input_does_not_reuse_the_last_product():
    model = low_rank("llama")
    attn = model.model.layers[0].self_attn
    ref_k = attn.k_proj.u(attn.k_proj.v(torch.ones(1, 64)))
    fuse_shared_inputs(model)
    x1, x2 = torch.randn(1, 64), torch.ones(1, 64)
    with torch.no_grad():
        attn.q_proj(x1)
        torch.testing.assert_close(attn.k_proj(x2), ref_k)  # another tensor: recomputed
        attn.q_proj(x1)
        x1.copy_(x2)  # the same tensor, changed in place
        torch.testing.assert_close(attn.k_proj(x1), ref_k)
    stem = attn.q_proj.v.stem
    assert isinstance(attn.k_proj.v, StemSlice) and attn.k_proj.v.stem is stem


def test_the_stem_forgets_its_product_once_every_sibling_read_it():
    model = low_rank("llama")
    fuse_shared_inputs(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 64)
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            proj(x)
        assert attn.q_proj.v.stem._product is not None
        attn.v_proj(x)
    assert attn.q_proj.v.stem._product is None  # no activation held between steps


def test_fused_model_works_with_the_low_rank_kv_cache(tokenizer):
    model = low_rank("llama")
    ref = generate_text(model, tokenizer, "the company said", max_new_tokens=8, kv_cache="low-rank")
    fuse_shared_inputs(model)
    assert generate_text(model, tokenizer, "the company said", max_new_tokens=8, kv_cache="low-rank") == ref


def test_saving_a_fused_model_is_refused_and_writes_nothing(tmp_path):
    model = low_rank("llama")
    fuse_shared_inputs(model)
    with pytest.raises(ConfigError, match="unfuse_shared_inputs"):
        save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="fused already"):
        fuse_shared_inputs(model)
