"""The paths users take, through the CLI: compress -> save -> load -> eval -> generate, for every method family,
on float32 and bfloat16 checkpoints with tied and untied embeddings, in both save formats, read whole and
through `--device-map auto`.

Each cell checks what breaks off the float32 CPU path: the storage dtype survives, tied embeddings stay tied
(one tensor on disk, one parameter in memory, counted once), the report's parameter count is the loaded
model's, and every way of reading the folder gives the same logits.

`SVDKIT_TEST_DEVICE=cuda` runs the same matrix on a GPU (compute in the checkpoint's dtype there, bf16 included):
`benchmarks/gpu_check.sh` does.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

import svdkit
from svdkit.cli import main
from svdkit.io import tensor_index
from svdkit.layout import count_parameters

# method families, each as cheap as it can be while still running its own code path
METHODS = {
    "svd": ["--method", "svd"],
    "svdllm": ["--method", "svdllm"],
    "adasvd": ["--method", "adasvd"],
    "ressvd": ["--method", "ressvd:plc=false,k=1"],
    "ada-kfac-rf": ["--method", "ada-kfac-rf:grad_samples=2;rf_steps=2"],  # the default, refinement included
    "svdllm-ft": ["--method", "svdllm-ft:ft_steps=2"],
    "svdllm+rtn": ["--method", "svdllm", "--quantize", "rtn:bits=8"],
}
DEVICE = os.environ.get("SVDKIT_TEST_DEVICE", "cpu")
CHECKPOINTS = ("float32-untied", "float32-tied", "bfloat16-untied", "bfloat16-tied")
FORMATS = ("transformers", "svdkit")


def _cells():
    """Every method on every checkpoint; the default run takes one format per pair (alternating, so each method
    and each checkpoint meets both), `-m slow` the other."""
    for i, method in enumerate(METHODS):
        for j, ckpt in enumerate(CHECKPOINTS):
            for k, fmt in enumerate(FORMATS):
                quantized = "--quantize" in METHODS[method]
                if quantized and fmt == "transformers":
                    continue  # quantized factors have one format; the CLI refuses the other (tested elsewhere)
                slow = not quantized and (i + j + k) % 2 == 1
                yield pytest.param(method, ckpt, fmt, id=f"{method}-{ckpt}-{fmt}",
                                   marks=[pytest.mark.slow] if slow else [])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> dict:
    """The four checkpoints as Hugging Face folders (a tiny LLaMA with GQA, widened random weights)."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name in CHECKPOINTS:
        dtype, ties = name.split("-")
        config = tiny_config("llama")
        config.tie_word_embeddings = ties == "tied"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            for key, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in key and "lm_head" not in key:
                    p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
        model.to(getattr(torch, dtype)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(model.device)).logits.float().cpu()


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit for bit on the CPU; on a GPU within two bfloat16 steps (kernels may differ with the memory layout)."""
    if DEVICE == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2)


def _ppl(path, tmp_path, tag: str) -> float:
    report = tmp_path / f"eval-{tag}.json"
    assert main(["eval", "--model", str(path), "--data", "ptb", "--seqlen", "32", "--max-windows", "2",
                 "--device", DEVICE, "--json", str(report)]) == 0
    return json.loads(report.read_text())["perplexity"]["ptb"]["ppl"]


@pytest.mark.parametrize("method, ckpt, fmt", list(_cells()))
def test_compress_save_load_eval_generate(checkpoints, tmp_path, capsys, method, ckpt, fmt):
    source, out = checkpoints[ckpt], tmp_path / "out"
    dtype = getattr(torch, ckpt.split("-")[0])
    tied = ckpt.endswith("-tied")
    assert main(["compress", "--model", str(source), *METHODS[method], "--ratio", "0.4", "--calib", "ptb",
                 "--nsamples", "4", "--seqlen", "32", "--calib-batch-size", "2", "--format", fmt,
                 "--device", DEVICE, "--out", str(out)]) == 0

    # on disk: the storage dtype, and a tied head stored once (as the embedding)
    index = tensor_index(out)
    assert ("lm_head.weight" in index.names()) is not tied
    floats = {index.dtypes[k] for k in index.names() if index.dtypes[k].is_floating_point}
    assert dtype in floats and floats <= {dtype, torch.float16, torch.float32}  # scales of quantized codes

    # in memory: same dtype, still tied, counted once, the report's count
    model, _ = svdkit.load(out, device=DEVICE)
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values() if p.is_floating_point()} == {dtype}
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied
    report = json.loads((out / "svdkit_report.json").read_text())
    after = report["params_after"]
    quantized = "--quantize" in METHODS[method]  # its linears hold integer codes (buffers), not parameters
    assert count_parameters(model)["total"] == after["total"] - (after["block_linears"] if quantized else 0)
    dense = count_parameters(AutoModelForCausalLM.from_pretrained(source))["total"]
    assert report["params_before"]["total"] == dense

    # every reader gives the same logits: svdkit.load whole, through accelerate's device map, plain transformers
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = _logits(model, ids)
    assert torch.isfinite(reference).all()
    spread, _ = svdkit.load(out, device_map="auto")
    _same(_logits(spread, ids), reference)
    if fmt == "transformers":
        plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).to(DEVICE)
        assert plain.dtype == dtype
        assert (plain.get_output_embeddings().weight is plain.get_input_embeddings().weight) is tied
        _same(_logits(plain, ids), reference)

    # the CLI reads what it wrote: perplexity (finite), and generation whole and spread by a device map
    assert _ppl(out, tmp_path, "out") < float("inf")
    capsys.readouterr()
    for extra in (["--device", DEVICE], ["--device-map", "auto"]):
        assert main(["generate", "--model", str(out), "--prompt", "the company said", "--max-new-tokens", "4",
                     *extra]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0] == printed[1] and printed[0].startswith("the company said")


def test_moving_a_tied_model_keeps_one_parameter(checkpoints):
    """Every device or dtype move (a whole model, or module by module as the head goes to the device) keeps a tied
    embedding and head one parameter: saved once, counted once, placed once."""
    from svdkit.blocks import Blocks, move_module

    model = AutoModelForCausalLM.from_pretrained(checkpoints["float32-tied"])
    count = count_parameters(model)["total"]

    def tied() -> bool:
        return model.get_output_embeddings().weight is model.get_input_embeddings().weight

    move_module(model, torch.device("cpu"), torch.bfloat16)
    assert tied() and model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert count_parameters(model)["total"] == count
    with Blocks(model, "cpu").head_on_device():  # bf16 storage: float32 compute on the CPU
        assert tied() and model.get_input_embeddings().weight.dtype == torch.float32
    assert tied() and model.get_input_embeddings().weight.dtype == torch.bfloat16
