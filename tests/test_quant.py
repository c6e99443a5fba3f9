"""Weight quantization: grid bounds, packing, GPTQ against RTN, QuantLinear, the model walk, save/reload, bytes."""

import json
import math
import struct

import pytest
import torch
from conftest import ARCHS, tiny_model
from transformers import AutoModelForCausalLM

from svdkit import LowRankLinear, compress, get_method, load, load_model, save
from svdkit.io import LOWRANK_WEIGHTS, QUANT_FORMAT, QUANT_REPORT
from svdkit.quant import (
    QuantConfig,
    QuantLinear,
    dequantize_matrix,
    gptq,
    layer_objective,
    pack,
    packed_size,
    parse_quant,
    quant_map,
    quantize_model,
    quantized_matrix_bytes,
    rtn,
    set_dequant_cache,
    stored_bytes,
    unpack,
)
from svdkit.quant import quantize as quantize_mod
from svdkit.quant.grid import SCALE_DTYPES, group_index

CALIB = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(n: int, tokens: int, seed: int) -> torch.Tensor:
    """Tokens x n inputs with strongly correlated, unevenly scaled features (like real activations)."""
    g = gen(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix.T


# --------------------------------------------------------------------------------------------- grid
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [32, 0, 128])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_rtn_keeps_every_element_within_half_a_step(bits, group_size, scale_dtype):
    w = torch.randn(40, 100, generator=gen(bits)) * torch.logspace(-2, 1, 40).unsqueeze(1)
    w[3] = 0.0  # an all-zero row
    w[5] = w[5].abs()  # a row without negative values (the range still contains 0)
    codes, scales, zeros = rtn(w, bits, group_size, SCALE_DTYPES[scale_dtype])
    assert scales.dtype == SCALE_DTYPES[scale_dtype] and codes.dtype == zeros.dtype == torch.uint8
    assert int(codes.max()) <= 2**bits - 1 and int(zeros.max()) <= 2**bits - 1
    deq = dequantize_matrix(codes, scales, zeros, group_size, torch.float64)
    step = scales.double()[:, group_index(100, group_size)]
    assert ((deq - w.double()).abs() <= step / 2 * (1 + 1e-6)).all()
    assert (deq[3] == 0).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_rtn_is_exact_for_values_already_on_the_grid(bits):
    rows, cols, gs, maxq = 16, 96, 32, 2**bits - 1
    g = gen(10 + bits)
    codes = torch.randint(0, maxq + 1, (rows, cols), generator=g)
    codes[:, ::gs] = 0  # every group spans the whole code range, so its min/max recover the grid
    codes[:, 1::gs] = maxq
    zeros = torch.randint(0, maxq + 1, (rows, cols // gs), generator=g)
    scales = 2.0 ** -torch.randint(2, 9, (rows, cols // gs), generator=g).double()  # exact in float16
    idx = group_index(cols, gs)
    w = scales[:, idx] * (codes - zeros[:, idx]).double()
    q, s, z = rtn(w, bits, gs)
    assert torch.equal(q.long(), codes) and torch.equal(z.long(), zeros) and torch.equal(s.double(), scales)
    assert torch.equal(dequantize_matrix(q, s, z, gs, torch.float64), w)


# --------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_packing_round_trips(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=gen(n))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, n).long(), codes)


@pytest.mark.parametrize("bits", [3, 4])
def test_packing_is_a_little_endian_bit_stream(bits):
    codes = torch.randint(0, 2**bits, (37,), generator=gen(1))
    stream = "".join(format(int(c), f"0{bits}b")[::-1] for c in codes)  # least significant bit first
    stream += "0" * (-len(stream) % 8)
    expected = [int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8)]
    assert pack(codes, bits).tolist() == expected


def test_packing_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="codes must lie"):
        pack(torch.tensor([0, 8]), 3)


# --------------------------------------------------------------------------------------------- GPTQ
def test_gptq_equals_rtn_on_white_inputs():
    """With H = I the inverse Hessian is diagonal: no error is propagated, GPTQ is RTN."""
    w = torch.randn(24, 64, generator=gen(2))
    r = gptq(w, torch.eye(64, dtype=torch.float64), 4, 16, damp=0.0)
    codes, scales, zeros = rtn(w, 4, 16)
    assert torch.equal(r.codes, codes) and torch.equal(r.scales, scales) and torch.equal(r.zeros, zeros)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_layer_objective(bits, act_order):
    for seed in range(3):
        w = torch.randn(48, 96, generator=gen(seed))
        iid = torch.randn(4000, 96, generator=gen(100 + seed), dtype=torch.float64)
        corr = correlated_inputs(96, 4000, seed)
        for x, strictly in ((iid, False), (corr, True)):
            h = x.T @ x
            r = gptq(w, h, bits, 32, act_order=act_order)
            obj_gptq = layer_objective(w, r.dequantized, h)
            obj_rtn = layer_objective(w, dequantize_matrix(*rtn(w, bits, 32), 32, torch.float64), h)
            assert obj_gptq <= obj_rtn
            if strictly:
                assert obj_gptq < 0.8 * obj_rtn


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_codes_store_exactly_what_its_error_feedback_used(act_order):
    w = torch.randn(20, 70, generator=gen(3))
    x = correlated_inputs(70, 500, 3)
    r = gptq(w, x.T @ x, 3, 32, act_order=act_order, block_size=16)  # groups straddle blocks
    assert r.scales.shape == r.zeros.shape == (20, 3)
    assert torch.equal(dequantize_matrix(r.codes, r.scales, r.zeros, 32, torch.float64), r.dequantized)
    assert torch.equal(dequantize_matrix(r.codes, r.scales, r.zeros, 32, torch.float32), r.dequantized.float())


def test_gptq_quantizes_dead_inputs_to_zero():
    w = torch.randn(8, 32, generator=gen(4))
    x = correlated_inputs(32, 200, 4)
    x[:, 5] = 0.0
    r = gptq(w, x.T @ x, 4, 16)
    assert (r.dequantized[:, 5] == 0).all()


# --------------------------------------------------------------------------------------------- QuantLinear
def random_quant_linear(bits=4, gs=32, bias=True, seed=0) -> tuple[QuantLinear, torch.Tensor]:
    w = torch.randn(24, 80, generator=gen(seed))
    b = torch.randn(24, generator=gen(seed + 1)) if bias else None
    codes, scales, zeros = rtn(w, bits, gs)
    return QuantLinear.from_codes(codes, scales, zeros, bits, gs, b), dequantize_matrix(codes, scales, zeros, gs)


def test_quant_linear_forward_is_the_dequantized_linear():
    layer, deq = random_quant_linear()
    x = torch.randn(5, 80, generator=gen(9))
    ref = torch.nn.functional.linear(x, deq, layer.bias)
    assert torch.equal(layer(x), ref)
    layer.cache = True
    assert torch.equal(layer(x), ref) and torch.equal(layer(x), ref)
    assert set(layer.state_dict()) == {"qweight", "scales", "qzeros", "bias"}
    assert layer.stored_bytes() == quantized_matrix_bytes(24, 80, 4, 32, 2)


def test_quant_linear_keeps_its_scales_through_dtype_casts():
    layer, _ = random_quant_linear(bits=3)
    before = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, before)
    assert layer.qweight.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 80, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------- the model walk
def compressed(arch: str, ratio: float = 0.4):
    model = tiny_model(arch)
    compress(model, get_method("svdllm", ratio=ratio), CALIB, progress=False)
    return model


def float_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


@pytest.mark.parametrize("compressed_first", [False, True])
def test_quantize_model_replaces_every_block_linear(arch, compressed_first):
    model = compressed(arch) if compressed_first else tiny_model(arch)
    report = quantize_model(model, QuantConfig(bits=4, group_size=32), CALIB, progress=False)
    assert float_linears(model) == []
    quant = quant_map(model)
    assert len(quant) == len(report.matrices) > 0
    if compressed_first:
        low = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
        assert low and all(f"{n}.u" in quant and f"{n}.v" in quant for n in low)
    assert all(m.method in ("gptq", "rtn-fallback") for m in report.matrices)
    assert all(m.rel_error <= m.rtn_rel_error for m in report.matrices)  # the RTN fallback guarantees it
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()


def test_u_factor_is_calibrated_on_the_quantized_v_outputs(monkeypatch):
    """Block 0's q_proj.v sees the (never quantized) embeddings, so the Gram matrix GPTQ used for q_proj.u
    must be the Gram of the *quantized* q_proj.v's outputs, not of the float ones."""
    model = compressed("llama")
    float_v = model.model.layers[0].self_attn.q_proj.v
    grams = {}
    real = quantize_mod._swap

    def spy(root, name, full, mod, h, config, report):
        grams[full] = h.clone()
        return real(root, name, full, mod, h, config, report)

    monkeypatch.setattr(quantize_mod, "_swap", spy)
    quantize_model(model, QuantConfig(bits=3, group_size=32, rtn_fallback=False), CALIB, progress=False,
                   batch_size=2)
    q_v = model.model.layers[0].self_attn.q_proj.v
    assert isinstance(q_v, QuantLinear)
    outs = {"quantized": [], "float": []}
    handle = q_v.register_forward_hook(lambda _m, a, out: outs["quantized"].append((a[0], out)))
    with torch.no_grad():
        for i in range(0, 4, 2):
            model(CALIB[i : i + 2])
    handle.remove()
    gram_q = sum(torch.einsum("bti,btj->ij", o, o).double() for _, o in outs["quantized"])
    gram_f = sum(torch.einsum("bti,btj->ij", *(float_v(a),) * 2).double() for a, _ in outs["quantized"])
    used = grams["model.layers.0.self_attn.q_proj.u"]
    assert torch.allclose(used, gram_q, rtol=1e-5, atol=1e-6 * float(gram_q.abs().max()))
    assert not torch.allclose(used, gram_f, rtol=1e-3)


def test_rtn_quantize_model_needs_no_calibration_and_matches_rtn():
    model = compressed("llama")
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    report = quantize_model(model, QuantConfig(method="rtn", bits=3, group_size=32), None, progress=False)
    for entry in report.matrices:
        layer = model.get_submodule(entry.name)
        w = weights[entry.name]
        assert torch.equal(layer.dequantize(), dequantize_matrix(*rtn(w, 3, 32), 32))


def test_gptq_needs_calibration_tokens():
    with pytest.raises(ValueError, match="LongTensor"):
        quantize_model(tiny_model("llama"), QuantConfig(), None, progress=False)


def test_parse_quant():
    assert parse_quant("gptq:bits=3,group_size=64,act_order=true") == QuantConfig(bits=3, group_size=64,
                                                                                  act_order=True)
    assert parse_quant("rtn").method == "rtn"
    assert parse_quant("gptq").act_order and parse_quant("gptq:act_order=false").name == "gptq-4-noao"
    for bad in ("awq", "gptq:bits=9", "gptq:colour=red", "gptq:scale_dtype=int8"):
        with pytest.raises(ValueError):
            parse_quant(bad)


# --------------------------------------------------------------------------------------------- save / load / bytes
@pytest.mark.parametrize("compressed_first", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_save_reload_gives_identical_logits(arch, compressed_first, bits, tmp_path):
    model = compressed(arch) if compressed_first else tiny_model(arch)
    report = quantize_model(model, QuantConfig(bits=bits, group_size=32), CALIB, progress=False)
    save(model, tmp_path / "q", quant_report=report)
    loaded, _ = load(tmp_path / "q")
    assert quant_map(loaded) == quant_map(model)
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(loaded(x).logits, ref)
        set_dequant_cache(loaded, True)
        assert torch.equal(loaded(x).logits, ref)


def test_quantized_folder_records_the_quantization(tmp_path, tokenizer):
    model = compressed("llama")
    report = quantize_model(model, QuantConfig(bits=3, group_size=32), CALIB, progress=False)
    save(model, tmp_path / "q", tokenizer=tokenizer, quant_report=report)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["svdkit"]
    assert cfg["format"] == QUANT_FORMAT and cfg["ranks"]
    spec = cfg["quant"]["model.layers.1.mlp.down_proj.u"]
    assert spec["bits"] == 3 and spec["group_size"] == 32 and spec["method"] in ("gptq", "rtn-fallback")
    recipe = json.loads((tmp_path / "q" / "svdkit_recipe.json").read_text())
    assert recipe["quantization"]["config"]["bits"] == 3
    saved = json.loads((tmp_path / "q" / QUANT_REPORT).read_text())  # the report base's save_json
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert {m["name"]: m["method"] for m in saved["matrices"]} == {k: v["method"] for k, v in cfg["quant"].items()}
    loaded, tok = load_model(str(tmp_path / "q"))  # float32 requested: the scales stay float16
    assert tok is not None
    layer = loaded.get_submodule("model.layers.1.mlp.down_proj.u")
    assert isinstance(layer, QuantLinear) and layer.scales.dtype == torch.float16 and layer.bits == 3


def safetensors_data_bytes(path) -> int:
    """Size of a safetensors file's tensor data: file size minus the 8-byte length and the JSON header."""
    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


@pytest.mark.parametrize("compressed_first", [False, True])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_stored_bytes_match_the_formula_and_the_file(arch, compressed_first, scale_dtype, tmp_path):
    model = compressed(arch) if compressed_first else tiny_model(arch)
    cfg = QuantConfig(method="rtn", bits=3, group_size=48, scale_dtype=scale_dtype)  # ragged last group
    quantize_model(model, cfg, None, progress=False)
    scale_bytes = 2 if scale_dtype == "float16" else 4
    formula = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            expected = quantized_matrix_bytes(m.out_features, m.in_features, 3, 48, scale_bytes)
            rows, cols = m.out_features, m.in_features
            groups = math.ceil(cols / 48)
            assert expected == math.ceil(rows * cols * 3 / 8) + rows * groups * scale_bytes + math.ceil(
                rows * groups * 3 / 8)
            assert m.stored_bytes() == expected
            formula += expected
    b = stored_bytes(model)
    assert b["codes"] + b["scales_zeros"] == formula
    assert b["total"] == b["codes"] + b["scales_zeros"] + b["unquantized"]
    save(model, tmp_path / "q")
    assert safetensors_data_bytes(tmp_path / "q" / LOWRANK_WEIGHTS) == b["total"]


def test_dense_export_dequantizes(tmp_path):
    for arch in ARCHS:
        model = compressed(arch) if arch in ("llama", "gpt2") else tiny_model(arch)
        quantize_model(model, QuantConfig(bits=4, group_size=32), CALIB, progress=False)
        save(model, tmp_path / arch, dense=True)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
        x = torch.randint(0, 300, (1, 16))
        with torch.no_grad():
            ref, out = model(x).logits, plain(x).logits
        assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()))
