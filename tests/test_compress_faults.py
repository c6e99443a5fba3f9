"""Numerical faults during a compression: factors that overflow the storage dtype name their matrix, a failure
halfway says what state the in-memory model is in (and the CLI writes nothing), and the report's `sigma_tail`
is only given where it equals the error of the factors."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from torch import nn

import svdkit
from svdkit.cli import main
from svdkit.compression import CompressionError
from svdkit.linalg import NumericalError
from svdkit.methods import SVD, Factors
from svdkit.modules import LowRankLinear

PROGRESS = re.compile(r"\d+%\||it/s\]|block/s\]|Loading weights")


def calib_ids(n: int = 4, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(0))


@dataclass
class LopsidedSVD(SVD):
    """Plain SVD, but a matrix with entries above 10 gets its factors split 1e6 : 1e-6 (same product): `W_u`
    then overflows float16 although the weight itself fits."""

    name = "lopsided-svd"

    def factorize(self, w: torch.Tensor, stats, rank: int) -> Factors:
        f = super().factorize(w, stats, rank)
        scale = 1e6 if float(w.abs().max()) > 10 else 1.0
        return Factors(f.w_u * scale, f.w_v / scale, f.info)


def test_factors_that_overflow_the_storage_dtype_name_the_matrix_and_the_model_state():
    model = tiny_model("llama").half()
    blocks = model.model.layers
    with torch.no_grad():
        blocks[1].self_attn.q_proj.weight.mul_(100.0)  # entries ~12: fine in float16, the lopsided W_u is not
    before = {name: p.detach().clone() for name, p in blocks[1].named_parameters()}
    with pytest.raises(CompressionError) as info:
        svdkit.compress(model, LopsidedSVD(ratio=0.4), None, progress=False)
    message = str(info.value)
    assert isinstance(info.value.__cause__, NumericalError)
    assert "W_u of model.layers.1.self_attn.q_proj" in message and "float16" in message
    assert "blocks 0-0 of the in-memory model are already compressed" in message and "\n" not in message
    # and that is the state the model is in: block 0 low-rank, block 1 untouched
    assert all(isinstance(m, LowRankLinear) for m in (blocks[0].self_attn.q_proj, blocks[0].mlp.down_proj))
    assert isinstance(blocks[1].self_attn.q_proj, nn.Linear)
    assert all(torch.equal(p, before[name]) for name, p in blocks[1].named_parameters())


def test_a_failure_in_the_first_block_leaves_the_model_unchanged():
    model = tiny_model("llama").half()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(100.0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompressionError, match=r"at block 0: W_u of model\.layers\.0\.mlp\.up_proj .*"
                                               r"\(the model was not changed\)"):
        svdkit.compress(model, LopsidedSVD(ratio=0.4), None, progress=False)
    assert model.state_dict().keys() == dense.keys()
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


@pytest.fixture
def broken_folder(tmp_path, tokenizer):
    """A tiny LLaMA folder whose block 1 holds an infinite weight."""
    path = tmp_path / "broken"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = math.inf
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("extra", [[], ["--format", "svdkit"], ["--quantize", "rtn"]])
def test_a_failure_halfway_through_the_cli_writes_nothing(broken_folder, tmp_path, capsys, extra):
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["compress", "--model", str(broken_folder), "--method", "svd", "--calib", "none", "--ratio", "0.4",
                 "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS.search(line)]
    assert code == 2 and "Traceback" not in err
    assert len(lines) == 1 and "failed at block 1" in lines[0], lines
    assert "the weight of model.layers.1.self_attn.q_proj has 1 non-finite entries" in lines[0]
    assert "nothing was written" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("spec", ["svdllm-update", "adasvd:adacr=false", "ressvd:plc=false,tau=1"])
def test_sigma_tail_is_not_claimed_where_an_update_changed_the_factors(spec):
    from svdkit.methods import parse_method

    model = tiny_model("llama")
    report = svdkit.compress(model, parse_method(spec, ratio=0.4), calib_ids(), progress=False)
    low = [e for e in report.matrices if e.rank is not None]
    assert low and all(e.sigma_tail is None for e in low)
    assert all(math.isfinite(e.info["sigma_tail_before_update"]) for e in low)
    # the truncation's tail is not the updated factors' error (block 1 sees a compressed stream)
    assert any(abs(e.rel_error - e.info["sigma_tail_before_update"]) > 1e-6 * e.rel_error for e in low)


@pytest.mark.parametrize("spec, key", [("kfac:grad_samples=2", "two_sided_sigma_tail"),
                                       ("ada-kfac:alloc=uniform,grad_samples=2", "two_sided_sigma_tail_before_update")])
def test_a_two_sided_tail_is_not_claimed_as_the_error(spec, key):
    """K-FAC truncates on the two-sided metric, whose tail is not `rel_error` (one-sided), and adaComp then changes
    the factors: the tail is reported under its own name."""
    from svdkit.methods import parse_method

    report = svdkit.compress(tiny_model("llama"), parse_method(spec, ratio=0.4), calib_ids(), progress=False)
    low = [e for e in report.matrices if e.rank is not None]
    assert low and all(e.sigma_tail is None for e in low)
    assert all(math.isfinite(e.info[key]) for e in low)


def test_sigma_tail_is_the_error_where_nothing_updated_the_factors():
    model = tiny_model("llama")
    report = svdkit.compress(model, svdkit.get_method("adasvd", ratio=0.4, tau=0, adacr=False), calib_ids(),
                             progress=False)
    for e in report.matrices:
        assert e.sigma_tail == pytest.approx(e.rel_error, rel=1e-3, abs=1e-9)
