"""Block-by-block compression and evaluation from checkpoints on disk: the same numbers as in memory, with
only one decoder block resident at a time."""

import json

import pytest
import torch
from conftest import tiny_model

from svdkit import compress, get_method, load, load_model, open_model, perplexity
from svdkit.blocks import Blocks
from svdkit.io import rank_map, tensor_index
from svdkit.pipeline import compress_to
from svdkit.shards import ShardWriter, TensorIndex
from svdkit.stats_cache import StatsCache


def calib_ids(n=6, seqlen=32, seed=0):
    return torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def checkpoint(tmp_path, arch, dtype=torch.float32, tokenizer=None, shard_bytes=None):
    """A tiny random model saved as a Hugging Face folder (sharded when `shard_bytes` is given)."""
    path = tmp_path / f"{arch}-{str(dtype)[6:]}"
    model = tiny_model(arch).to(dtype)
    kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def saved_tensors(folder):
    index = tensor_index(folder)
    return index.read(index.names())


@pytest.mark.parametrize("arch, dtype, spec", [
    ("llama", torch.float32, "svdllm"), ("qwen2", torch.float32, "svdllm"), ("opt", torch.float32, "svdllm"),
    ("gpt2", torch.float32, "svdllm"), ("llama", torch.bfloat16, "svdllm"), ("llama", torch.float32, "adasvd"),
    ("llama", torch.float32, "ressvd"), ("gpt2", torch.float32, "svd"),
])
def test_streamed_compression_equals_in_memory_and_reloads_bit_for_bit(tmp_path, arch, dtype, spec):
    folder = checkpoint(tmp_path, arch, dtype, shard_bytes="200KB")
    assert (folder / "model.safetensors.index.json").exists()  # a sharded checkpoint
    calib = None if spec == "svd" else calib_ids()
    ratio = 0.3 if spec == "ressvd" else 0.4
    memory, _ = load_model(str(folder), dtype="auto")
    assert next(memory.parameters()).dtype == dtype
    rep_m = compress(memory, get_method(spec, ratio=ratio), calib, progress=False)
    out = tmp_path / "out"
    rep_s, _ = compress_to(str(folder), out, get_method(spec, ratio=ratio), calib, progress=False)
    assert [e.rank for e in rep_s.matrices] == [e.rank for e in rep_m.matrices]
    assert any(e.rank for e in rep_s.matrices)
    streamed = saved_tensors(out)
    expected = memory.state_dict()
    tied = {"lm_head.weight"} if memory.config.tie_word_embeddings else set()
    assert set(streamed) == set(expected) - tied
    for k, v in streamed.items():
        assert v.dtype == expected[k].dtype and torch.equal(v, expected[k]), k
    reloaded, _ = load(out)
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, memory(x).logits)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["svdkit"]["ranks"] == rank_map(memory)
    assert len(cfg["svdkit"]["ranks"]) == sum(e.rank is not None for e in rep_s.matrices)


def test_only_one_block_is_resident_during_a_streamed_walk(tmp_path):
    folder = checkpoint(tmp_path, "llama")
    sm = open_model(str(folder))
    blocks = Blocks(sm)
    assert all(p.is_meta for p in blocks.list.parameters())  # nothing of the blocks was read
    assert not any(p.is_meta for n, p in sm.model.named_parameters() if not n.startswith("model.layers."))
    peak = []

    def count(_module, _args):
        peak.append(sum(not all(p.is_meta for p in b.parameters()) for b in blocks.list))

    hooks = [b.register_forward_pre_hook(count) for b in blocks.list]
    compress_to(sm, tmp_path / "out", get_method("svdllm", ratio=0.4), calib_ids(), progress=False)
    for h in hooks:
        h.remove()
    assert peak and max(peak) == 1
    assert all(p.is_meta for p in blocks.list.parameters())  # and every block was dropped again


def test_blockwise_perplexity_equals_whole_model(tmp_path, arch):
    folder = checkpoint(tmp_path, arch)
    memory, _ = load_model(str(folder))
    ids = torch.randint(0, 300, (400,), generator=torch.Generator().manual_seed(1))
    whole = perplexity(memory, None, ids, seqlen=32, batch_size=3, progress=False)
    by_block = perplexity(open_model(str(folder)), None, ids, seqlen=32, batch_size=3, progress=False)
    in_memory_blocks = perplexity(memory, None, ids, seqlen=32, batch_size=3, progress=False, blockwise=True)
    assert by_block.windows == whole.windows == 12
    assert by_block.nll == pytest.approx(whole.nll, rel=1e-6)
    assert in_memory_blocks.nll == pytest.approx(whole.nll, rel=1e-6)


def test_statistics_cache_is_one_file_per_block_and_gives_the_same_model(tmp_path):
    folder = checkpoint(tmp_path, "qwen2")
    cache = StatsCache(tmp_path / "stats")
    calib = calib_ids()
    compress_to(str(folder), tmp_path / "a", get_method("svdllm", ratio=0.4), calib, stats_cache=cache,
                progress=False)
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["block-00000.safetensors",
                                                                       "block-00001.safetensors"]
    assert cache.complete(2)
    compress_to(str(folder), tmp_path / "b", get_method("svdllm", ratio=0.4), calib, stats_cache=cache,
                progress=False)
    a, b = saved_tensors(tmp_path / "a"), saved_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shard_writer_and_index_round_trip(tmp_path):
    tensors = {f"t{i}": torch.randn(10, i + 1) for i in range(5)}
    w = ShardWriter(tmp_path, "x", max_shard_bytes=100)
    for k, v in tensors.items():
        w.add({k: v})
    files = w.finish()  # 40 + 80 bytes, then 120, 160 and 200: four shards past the 100-byte limit
    assert (tmp_path / "x.safetensors.index.json").exists()
    assert [f.name for f in files[:-1]] == [f"x-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = TensorIndex(tmp_path, "x")
    back = index.read(["t3", "t0"])
    assert set(back) == {"t3", "t0"} and torch.equal(back["t3"], tensors["t3"])
    assert index.shapes["t4"] == (10, 5)
    w = ShardWriter(tmp_path / "one", "x", max_shard_bytes=10**9)
    (tmp_path / "one").mkdir()
    w.add(tensors)
    assert [f.name for f in w.finish()] == ["x.safetensors"]


def test_the_shard_writer_holds_no_tensor_and_writes_what_safetensors_writes(tmp_path):
    """Memory that does not depend on the shard size: once `add` returns, nothing added is alive in the writer;
    every dtype (odd sizes included, so later tensors start unaligned) reads back bit for bit, and a one-shard
    file equals safetensors' own writer's tensors."""
    import gc
    import weakref

    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(3, 5, generator=g).bfloat16(),
               "u8": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),
               "f32": torch.randn(4, 3, generator=g), "i64": torch.arange(3), "empty": torch.ones(0),
               "f16": torch.randn(2, generator=g).half(), "f64": torch.randn(2, 2, generator=g, dtype=torch.float64)}
    w = ShardWriter(tmp_path, "x", max_shard_bytes=10**9)
    alive = []
    for k, v in tensors.items():
        copy = v.clone()
        alive.append(weakref.ref(copy))
        w.add({k: copy})
        del copy
        gc.collect()
        assert all(r() is None for r in alive)
    assert [f.name for f in w.finish()] == ["x.safetensors"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "x.safetensors"]  # the data file is gone
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    save_file(tensors, tmp_path / "ref.safetensors")
    ref = load_file(tmp_path / "ref.safetensors")
    assert all(torch.equal(ref[k], back[k]) for k in tensors)


def test_load_with_a_device_map_that_offloads_blocks_to_disk(tmp_path, tokenizer):
    folder = checkpoint(tmp_path, "llama", tokenizer=tokenizer)
    out = tmp_path / "out"
    compress_to(str(folder), out, get_method("svdllm", ratio=0.4), calib_ids(), progress=False)
    ref, _ = load(out)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded, tok = load(out, device_map=device_map, offload_folder=tmp_path / "offload")
    assert tok is not None and any((tmp_path / "offload").iterdir())
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(x).logits, ref(x).logits, rtol=0, atol=0)
    gen = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(offloaded.generate(x, **gen), ref.generate(x, **gen))
