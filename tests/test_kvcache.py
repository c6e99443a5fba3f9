"""The low-rank (latent) KV cache gives the normal cache's logits for less memory; LowRankLinear is its factors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, tiny_config, tiny_model
from transformers import DynamicCache

from svdkit.generation import generate_text
from svdkit.kvcache import (
    LowRankKVCache,
    LowRankKVError,
    cache_argument,
    cache_bytes_per_token,
    cache_nbytes,
    disable_low_rank_kv_cache,
    enable_low_rank_kv_cache,
    is_low_rank_kv_cache_enabled,
    low_rank_kv_cache,
    output_cache,
)
from svdkit.modules import LowRankLinear

RANKS = {"k_proj": 12, "v_proj": 10, "q_proj": 24, "o_proj": 24}  # k/v out features are 2 heads x 16 = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core machine a descheduled thread stalls each op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def svd_factorize(linear: torch.nn.Linear, rank: int) -> LowRankLinear:
    """Truncated SVD of a linear as `LowRankLinear(U sqrt(S), sqrt(S) V^T)`."""
    u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    root = s[:rank].sqrt()
    return LowRankLinear.from_factors(u[:, :rank] * root, root[:, None] * vh[:rank], linear.bias)


def compress(model, names: tuple[str, ...]):
    """Replace the attention projections `names` of every layer by truncated-SVD LowRankLinears (in place)."""
    for layer in model.model.layers:
        for name in names:
            setattr(layer.self_attn, name, svd_factorize(getattr(layer.self_attn, name), RANKS[name]))
    return model


def compressed(arch: str = "llama", names: tuple[str, ...] = ("k_proj", "v_proj")):
    """A tiny conftest model whose attention projections `names` are truncated-SVD LowRankLinears."""
    return compress(tiny_model(arch), names)


def greedy(model, ids: torch.Tensor, mask: torch.Tensor | None = None, new: int = 20, **kwargs):
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids) if mask is None else mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )


def assert_same_generation(ref, out, atol: float = 1e-4) -> None:
    assert torch.equal(ref.sequences, out.sequences)
    assert len(ref.logits) == len(out.logits)
    for step, (a, b) in enumerate(zip(ref.logits, out.logits, strict=True)):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-4, msg=f"logits differ at step {step}")


def test_lowrank_linear_is_product_of_factors():
    torch.manual_seed(0)
    for bias in (None, torch.randn(40)):
        layer = LowRankLinear.from_factors(torch.randn(40, 7), torch.randn(7, 30), bias)
        x = torch.randn(3, 5, 30)
        expected = x @ (layer.u.weight @ layer.v.weight).T + (0 if bias is None else bias)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.to_linear()(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_low_rank_cache_matches_normal_cache(batch: int):
    model = compressed(names=("q_proj", "k_proj", "v_proj", "o_proj"))
    ids = torch.randint(1, VOCAB, (batch, 9), generator=torch.Generator().manual_seed(batch))
    ref = greedy(model, ids)
    assert type(output_cache(ref)) is DynamicCache
    enable_low_rank_kv_cache(model)
    out = greedy(model, ids)  # generate() builds the LowRankKVCache itself
    assert isinstance(output_cache(out), LowRankKVCache)
    assert output_cache(out).latent_layers == [0, 1]
    assert output_cache(out).layers[0].keys.shape == (batch, 9 + 19, RANKS["k_proj"])
    assert_same_generation(ref, out)
    # A normal cache passed explicitly still takes the original attention path.
    assert_same_generation(ref, greedy(model, ids, **{cache_argument(model): DynamicCache(config=model.config)}))


def test_left_padding_and_beam_search():
    """Per-row positions (left padding) and beam reordering act on the latents and the stored positions."""
    model = compressed()
    ids = torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :1] = 0
    ids[mask == 0] = 0
    for kwargs in ({}, {"num_beams": 2}):
        ref = greedy(model, ids, mask, new=10, **kwargs)
        with low_rank_kv_cache(model):
            out = greedy(model, ids, mask, new=10, **kwargs)
        assert isinstance(output_cache(out), LowRankKVCache)
        assert_same_generation(ref, out)


def tiny_mistral(sliding_window: int | None = None):
    """conftest's tiny LLaMA-GQA shape as a Mistral (without sliding window by default: the latent cache is for
    full attention)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    llama = tiny_config("llama")
    config = MistralConfig(
        **{k: getattr(llama, k) for k in keys},
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=sliding_window,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_llama_style_attentions(arch: str):
    # Qwen2's k/v projections carry a bias, kept on the `u` factor.
    model = compressed(arch) if arch == "qwen2" else compress(tiny_mistral(), ("k_proj", "v_proj"))
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    ref = greedy(model, ids, new=8)
    with low_rank_kv_cache(model):
        out = greedy(model, ids, new=8)
    assert isinstance(output_cache(out), LowRankKVCache)
    assert_same_generation(ref, out)


def test_cache_bytes_per_token():
    model = compressed()
    n_layers, n_kv, head_dim = 2, 2, 16
    elsize = torch.float32.itemsize
    normal = cache_bytes_per_token(model, "normal")
    low = cache_bytes_per_token(model, "low-rank")
    assert normal == 2 * n_kv * head_dim * n_layers * elsize
    assert low == n_layers * (RANKS["k_proj"] + RANKS["v_proj"]) * elsize
    assert cache_bytes_per_token(model, "low-rank", dtype=torch.bfloat16) == low // 2

    # The caches really hold that much: batch x cached tokens x bytes per token.
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    ref = greedy(model, ids, new=6)
    cached = 5 + 6 - 1  # the last generated token is never fed back
    assert cache_nbytes(output_cache(ref)) == 2 * cached * normal
    with low_rank_kv_cache(model):
        out = greedy(model, ids, new=6)
    assert cache_nbytes(output_cache(out)) == 2 * cached * low
    assert output_cache(out).positions.shape == (2, cached)
    values_only = cache_bytes_per_token(model, "low-rank-values")
    assert values_only == n_layers * (n_kv * head_dim + RANKS["v_proj"]) * elsize
    with low_rank_kv_cache(model):
        out = greedy(model, ids, new=6, **{cache_argument(model): LowRankKVCache(model, keys="full")})
    assert cache_nbytes(output_cache(out)) == 2 * cached * values_only
    with pytest.raises(ValueError, match="kind must be one of"):
        cache_bytes_per_token(model, "latent")


def test_mixed_layers_keep_a_normal_cache_where_dense():
    """Only layer 1 has low-rank k/v: layer 0 keeps full keys and values, and logits still match."""
    model = tiny_model("llama")
    attn = model.model.layers[1].self_attn
    attn.k_proj, attn.v_proj = svd_factorize(attn.k_proj, 8), svd_factorize(attn.v_proj, 8)
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = greedy(model, ids, new=5)
    with low_rank_kv_cache(model):
        out = greedy(model, ids, new=5)
        assert cache_bytes_per_token(model, "low-rank") == (2 * 32 + 8 + 8) * 4
    assert output_cache(out).latent_layers == [1]
    assert_same_generation(ref, out)


def test_dense_kv_raises_and_leaves_model_unchanged():
    model = compressed(names=("q_proj", "o_proj"))  # low-rank, but not k/v: nothing to save
    classes = [type(layer.self_attn) for layer in model.model.layers]
    with pytest.raises(LowRankKVError, match="no attention layer has a low-rank k_proj or v_proj"):
        enable_low_rank_kv_cache(model)
    assert [type(layer.self_attn) for layer in model.model.layers] == classes
    assert "generate" not in model.__dict__
    with pytest.raises(LowRankKVError, match="not supported"):
        enable_low_rank_kv_cache(tiny_model("opt"))
    with pytest.raises(LowRankKVError, match="sliding-window"):
        enable_low_rank_kv_cache(compress(tiny_mistral(sliding_window=16), ("k_proj", "v_proj")))


def test_disable_restores_the_model():
    model = compressed()
    classes = [type(layer.self_attn) for layer in model.model.layers]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    enable_low_rank_kv_cache(model)
    assert is_low_rank_kv_cache_enabled(model)
    assert model.state_dict().keys() == state.keys()
    disable_low_rank_kv_cache(model)
    assert not is_low_rank_kv_cache_enabled(model)
    assert [type(layer.self_attn) for layer in model.model.layers] == classes
    assert "generate" not in model.__dict__
    ids = torch.randint(1, VOCAB, (1, 4))
    copied = copy.deepcopy(enable_low_rank_kv_cache(model))  # the generate hook follows the copy
    assert copied.generate.__self__ is copied
    assert isinstance(output_cache(greedy(copied, ids, new=2)), LowRankKVCache)
    disable_low_rank_kv_cache(model)
    assert type(output_cache(greedy(model, ids, new=2))) is DynamicCache


def test_latent_layer_rejects_full_keys():
    """A LowRankKVCache handed to a model whose attention was not enabled fails clearly, not silently."""
    model = compressed()
    with pytest.raises(LowRankKVError, match="enable_low_rank_kv_cache"):
        model(torch.randint(1, VOCAB, (1, 4)), use_cache=True, **{cache_argument(model): LowRankKVCache(model)})


def test_generate_text(tokenizer):
    model = compressed(names=("q_proj", "k_proj", "v_proj", "o_proj"))
    prompt = "the company said"
    normal = generate_text(model, tokenizer, prompt, max_new_tokens=12)
    low = generate_text(model, tokenizer, prompt, max_new_tokens=12, kv_cache="low-rank")
    values_only = generate_text(model, tokenizer, prompt, max_new_tokens=12, kv_cache="low-rank-values")
    assert isinstance(normal, str) and normal
    assert low == normal == values_only
    assert not is_low_rank_kv_cache_enabled(model)  # generate_text restores the model
    with pytest.raises(ValueError, match="kv_cache"):
        generate_text(model, tokenizer, prompt, kv_cache="latent")


def test_cache_is_found_by_type_not_keyword():
    """The latent path recognises a `LowRankKVCache` under any keyword (transformers 5.24 renamed
    `past_key_values` to `cache`), and `cache_argument` reads the installed version's name from the signature."""
    import inspect

    model = compressed()
    name = cache_argument(model)
    assert name in inspect.signature(type(model).forward).parameters
    enable_low_rank_kv_cache(model)
    attn = model.model.layers[0].self_attn
    h = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(5)[None]
    rope = model.model.rotary_emb(h, pos)
    normal = DynamicCache(config=model.config)
    ref, _ = type(attn)._svdkit_base.forward(attn, h, position_embeddings=rope, attention_mask=None,
                                             position_ids=pos, **{name: normal})
    for keyword in (name, "a_future_name"):
        cache = LowRankKVCache(model)
        out, _ = attn(hidden_states=h, position_embeddings=rope, attention_mask=None, position_ids=pos,
                      **{keyword: cache})
        assert cache.layers[0].keys.shape == (1, 5, RANKS["k_proj"])  # latents, not keys
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_lowrank_linear_keeps_w_u_column_major_through_a_state_dict_round_trip():
    """`W_u` lives transposed in memory (the fast decode layout) however the layer was made or reloaded."""
    torch.manual_seed(0)
    layer = LowRankLinear.from_factors(torch.randn(40, 7), torch.randn(7, 30), torch.randn(40))
    assert layer.u.weight.stride() == (1, 40) and layer.v.weight.is_contiguous()
    assert LowRankLinear(30, 40, 7).u.weight.stride() == (1, 40)
    state = {k: v.contiguous() for k, v in layer.state_dict().items()}  # what a safetensors file gives back
    fresh = LowRankLinear(30, 40, 7, bias=True, device="meta")
    fresh.load_state_dict(state, assign=True)
    assert fresh.u.weight.stride() == (1, 40)
    x = torch.randn(1, 1, 30)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("keys", ["latent", "full"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_folded_values_generate_the_same_tokens_without_rebuilding_values(arch: str, attn: str, keys: str):
    """At decode steps `W_u` of v_proj is folded into the attention output: it multiplies per-head outputs, never
    the cached values; the keys are rebuilt from their latents (or cached in full). Same tokens as the normal cache
    on LLaMA-GQA, Qwen2 (biases), Mistral."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    model = compress(tiny_mistral(), names) if arch == "mistral" else compressed(arch, names)
    model.config._attn_implementation = attn
    with torch.no_grad():  # Qwen2's k/v biases start at zero: make them count
        for p in (p for n, p in model.named_parameters() if n.endswith("proj.u.bias")):
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    ref = greedy(model, ids, new=12)
    rows = {"v": []}
    hook = model.model.layers[0].self_attn.v_proj.u.register_forward_hook(lambda m, i, o: rows["v"].append(i[0]))
    with low_rank_kv_cache(model):
        out = greedy(model, ids, new=12, **{cache_argument(model): LowRankKVCache(model, keys=keys)})
    hook.remove()
    assert_same_generation(ref, out)
    assert [r.shape[1] for r in rows["v"]] == [7]  # values rebuilt for the prompt only, never at a decode step
    key_width = RANKS["k_proj"] if keys == "latent" else 2 * 16  # key latents (rebuilt each step), or rotated keys
    assert output_cache(out).layers[0].keys.shape == (2, 7 + 11, key_width)
    assert output_cache(out).layers[0].values.shape == (2, 7 + 11, RANKS["v_proj"])


def test_enable_chooses_the_cache_that_generate_builds():
    model = compressed(names=("k_proj", "v_proj"))
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    ref = greedy(model, ids, new=5)
    for keys, width in (("full", 2 * 16), ("latent", RANKS["k_proj"])):
        enable_low_rank_kv_cache(model, keys=keys)
        out = greedy(model, ids, new=5)
        assert output_cache(out).full_keys == (keys == "full")
        assert output_cache(out).layers[0].keys.shape[-1] == width
        assert_same_generation(ref, out)
    disable_low_rank_kv_cache(model)
    assert "_svdkit_kv_keys" not in model.__dict__
    with pytest.raises(ValueError, match="keys must be"):
        enable_low_rank_kv_cache(model, keys="half")
