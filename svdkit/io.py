"""Save and reload compressed models: safetensors weights (one file, or shards with an index), the original
config plus a rank map, the tokenizer, and a recipe; strict loading onto a meta-device skeleton. No pickles.

`config.json` of a compressed folder carries `svdkit` (format, rank map). Its weights live in
`svdkit.safetensors` (or `svdkit-0000i-of-0000n.safetensors` + `svdkit.safetensors.index.json`), not
`model.safetensors`: plain `transformers.from_pretrained` then fails loudly instead of random-initialising
the dense weights it cannot find. `save(..., dense=True)` writes an ordinary transformers folder.

`open_streamed(path)` opens a dense Hugging Face folder or a compressed folder without reading its blocks
(`blocks.StreamedModel`); `load(path)` is `open_streamed` plus every block read. Both read the folder through one
`folder.ModelFolder` (its config parsed once). Quantized models
(`QuantLinear` layers) add a quantization map to `svdkit` and are written as format 2.
"""

from __future__ import annotations

import json
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from . import hf_format
from ._fs import atomic_dir
from .blocks import StreamedModel, move_module
from .errors import ConfigError
from .folder import (
    DENSE_STEM,
    FORMAT,
    QUANT_FORMAT,
    RECIPE,
    STEM,
    LoadError,
    ModelFolder,
    empty_model,
    name_map,
    tied_aliases,
)
from .fused import is_fused
from .layout import find_blocks
from .modules import LowRankLinear, column_major
from .quant.layer import QuantLinear
from .quant.quantize import quant_map
from .shards import ShardError, ShardWriter, TensorIndex, unique_tensors

log = logging.getLogger(__name__)

FORMATS = ("svdkit", "transformers")  # what `save` writes: svdkit's own, or a folder plain transformers loads
WEIGHTS = f"{DENSE_STEM}.safetensors"
LOWRANK_WEIGHTS = f"{STEM}.safetensors"
REPORT = "svdkit_report.json"
QUANT_REPORT = "svdkit_quant_report.json"
MAX_SHARD_BYTES = 2 * 2**30  # `save` starts a new shard past this size
KV_CACHES = ("normal", "low-rank", "low-rank-values")


def rank_map(model: nn.Module) -> dict[str, int]:
    """Full module name -> rank of every `LowRankLinear` in the model."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("svdkit", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _major(v: str | None) -> int | None:
    """The major version number of a version string, None when it has none."""
    head = (v or "").split(".")[0]
    return int(head) if head.isdigit() else None


def warn_on_version_change(folder: ModelFolder) -> None:
    """One warning line when the folder's recipe says another major version of svdkit or transformers wrote it."""
    written = folder.recipe().get("versions", {})
    if not isinstance(written, dict):
        return  # an old folder without a readable recipe: nothing to compare
    now = _versions()
    changed = [f"{pkg} {written[pkg]} (installed: {now[pkg]})" for pkg in ("svdkit", "transformers")
               if _major(written.get(pkg)) is not None and _major(now[pkg]) is not None
               and _major(written[pkg]) != _major(now[pkg])]
    if changed:
        log.warning("%s was written by another major version: %s; check its logits before trusting them",
                    folder.path, ", ".join(changed))


def module_tensors(module: nn.Module, prefix: str, storage: torch.dtype | None = None, dense: bool = False,
                   conv1d: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """A module's tensors as saved, named `prefix + key`, on the CPU: floating parameters in `storage` (buffers,
    e.g. quantization scales, keep their dtype). `dense=True` multiplies every `LowRankLinear` back (and
    dequantizes every `QuantLinear`) into the original layout's weight; `conv1d` names (relative to `module`)
    the layers that are GPT-2 `Conv1D`s there (their weight is stored transposed)."""
    params = {k for k, _ in module.named_parameters()}
    state = dict(module.state_dict())
    if dense:
        for name, m in module.named_modules():
            if not isinstance(m, (LowRankLinear, QuantLinear)) or _inside_low_rank(module, name):
                continue
            for k in [k for k in state if k.startswith(f"{name}.")]:  # factors (float or quantized), codes, bias
                state.pop(k)
            w = m.weight.detach()
            state[f"{name}.weight"] = w.t() if name in conv1d else w
            params.add(f"{name}.weight")
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias.detach()
                params.add(f"{name}.bias")
    return {prefix + k: v.detach().to("cpu", storage if storage is not None and k in params and v.is_floating_point()
                                       else v.dtype)
            for k, v in state.items()}


def conv1d_names(config) -> frozenset[str]:
    """Full names of the layers that are GPT-2 `Conv1D`s in the dense architecture of `config`."""
    return frozenset(name for name, m in empty_model(config).named_modules() if type(m).__name__ == "Conv1D")


def _dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with every `LowRankLinear` multiplied back (and every `QuantLinear` dequantized) into a dense
    weight of the original layout, in the model's dtype."""
    return module_tensors(model, "", model.dtype, dense=True, conv1d=conv1d_names(model.config))


def _inside_low_rank(model: nn.Module, name: str) -> bool:
    """True for a factor (`...u` / `...v`) of a `LowRankLinear`: the parent handles its export."""
    parent, _, child = name.rpartition(".")
    return child in ("u", "v") and isinstance(model.get_submodule(parent), LowRankLinear)


# --------------------------------------------------------------------------------------------- writing
def resolve_format(format: str, model: nn.Module, quantized: bool = False) -> str:
    """`auto`: the transformers format (a folder plain transformers loads) where the architecture allows it and
    nothing is quantized, else svdkit's own."""
    if format != "auto":
        if format not in FORMATS:
            raise ConfigError(f"format must be auto or one of {', '.join(FORMATS)}, got {format!r}")
        return format
    if quantized:
        return "svdkit"
    try:
        hf_format.base_class_names(model)
    except ConfigError:
        return "svdkit"
    return "transformers"


class FolderWriter:
    """Build a model folder beside its target, tensors first (sharded as they come), the config, tokenizer,
    recipe and reports last; the folder replaces the target only when `finish` succeeded (see `atomic_dir`)."""

    def __init__(self, path: str | os.PathLike, *, dense: bool = False, overwrite: bool = False,
                 max_shard_bytes: int = MAX_SHARD_BYTES, format: str = "svdkit") -> None:
        if format not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        if dense and format != "svdkit":
            raise ConfigError("dense=True already writes a plain transformers folder: drop format='transformers'")
        self.path, self.dense, self.overwrite, self.max_shard_bytes = Path(path), dense, overwrite, max_shard_bytes
        self.format = format
        self._ctx = None

    def __enter__(self) -> FolderWriter:
        self._ctx = atomic_dir(self.path, overwrite=self.overwrite)
        self.tmp = self._ctx.__enter__()
        stem = DENSE_STEM if self.dense or self.format == "transformers" else STEM
        self.shards = ShardWriter(self.tmp, stem, self.max_shard_bytes)
        return self

    def __exit__(self, *exc) -> bool:
        return bool(self._ctx.__exit__(*exc))

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write tensors (a block, or the non-block weights) to the next shard(s)."""
        self.shards.add(tensors)

    def finish(self, model: nn.Module, tokenizer=None, report=None, recipe: dict | None = None,
               quant_report=None) -> None:
        """Write everything but the tensors; `model` may be a skeleton (its structure gives the rank map)."""
        self.shards.finish()
        config = model.config.to_dict()
        config.pop("svdkit", None)
        # the dtype the weights are stored in (a model loaded in float32 to be fine-tuned still saves bf16 factors)
        config["dtype"] = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        quant = {} if self.dense else quant_map(model)
        fmt = QUANT_FORMAT if quant else FORMAT
        if self.format == "transformers":
            if quant:
                raise ConfigError("format='transformers' does not hold quantized layers: save them with "
                                  "format='svdkit'")
            fmt = hf_format.FORMAT
            config = hf_format.transformers_config(config, model, rank_map(model))
            hf_format.write_code_and_readme(self.tmp, model, rank_map(model), self.path.name, _versions()["svdkit"])
        elif not self.dense:
            config["svdkit"] = {"format": fmt, "ranks": rank_map(model), "load_with": "svdkit.load(path)"}
            if quant:
                config["svdkit"]["quant"] = quant
        written = tokenizer.save_pretrained(self.tmp) if tokenizer is not None else ()
        tokenizer_files = sorted(Path(f).name for f in written if (self.tmp / Path(f).name).is_file())
        full_recipe = {"format": fmt, "dense_export": self.dense, "versions": _versions(),
                       "tokenizer_files": tokenizer_files, **(recipe or {})}
        if report is not None:
            full_recipe.setdefault("method", report.method)
            full_recipe.setdefault("config", report.config)
            full_recipe.setdefault("calibration", report.calibration)
        if quant_report is not None:
            full_recipe.setdefault("quantization", quant_report.summary())
        with open(self.tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(self.tmp)
        with open(self.tmp / RECIPE, "w", encoding="utf-8") as f:
            json.dump(full_recipe, f, indent=2)
        if report is not None:
            report.save_json(self.tmp / REPORT)
        if quant_report is not None:
            quant_report.save_json(self.tmp / QUANT_REPORT)


def save(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    report=None,
    recipe: dict | None = None,
    dense: bool = False,
    overwrite: bool = False,
    quant_report=None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    format: str = "svdkit",
) -> Path:
    """Write a compressed model folder (or, with `dense=True`, a plain transformers folder).

    `format="transformers"` writes the low-rank model as a folder plain transformers loads with
    `trust_remote_code=True` (`svdkit.hf_format`); `format="svdkit"` (default) is svdkit's own format.

    A model with `QuantLinear` layers also records its quantization map (and `quant_report`'s summary in
    the recipe); `dense=True` dequantizes them into ordinary float weights. The folder is built beside
    `path` and renamed into place at the end, so a failure leaves nothing half-written and never
    destroys an existing folder.
    """
    if is_fused(model):
        raise ConfigError("the model's sibling factor pairs are fused (svdkit.fuse_shared_inputs), which changes its "
                          "state dict: call svdkit.unfuse_shared_inputs(model) before saving")
    if format == "transformers" and quant_map(model):
        raise ConfigError("format='transformers' does not hold quantized layers: save them with format='svdkit'")
    writer = FolderWriter(path, dense=dense, overwrite=overwrite, max_shard_bytes=max_shard_bytes, format=format)
    state = _dense_state_dict(model) if dense else dict(model.state_dict())
    with writer as w:
        w.add(unique_tensors(state))
        w.finish(model, tokenizer=tokenizer, report=report, recipe=recipe, quant_report=quant_report)
    log.info("saved %s model (%d low-rank matrices) to %s", "dense" if dense else "compressed",
             len(rank_map(model)), path)
    return Path(path)


# --------------------------------------------------------------------------------------------- reading
def is_compressed_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a folder written by `svdkit.save` (its config carries a rank map)."""
    return ModelFolder.open(path).compressed


def tensor_index(path: str | os.PathLike) -> TensorIndex:
    """The tensors of a model folder: svdkit's own stem for its format, transformers' `model` otherwise."""
    return ModelFolder.open(path).index


def load_tokenizer(path: str | os.PathLike | ModelFolder):
    """The folder's tokenizer, or None when it has none (`ModelFolder.tokenizer`)."""
    return ModelFolder.open(path).tokenizer()


def open_streamed(path: str | os.PathLike | ModelFolder, dtype: torch.dtype | str | None = "auto",
                  with_tokenizer: bool = True) -> StreamedModel:
    """A model folder (dense Hugging Face safetensors, or written by `svdkit.save`) opened without reading its
    decoder blocks: the skeleton with the non-block weights loaded, and the index of the block tensors.

    `dtype="auto"` keeps the checkpoint's dtype (its config's, else its tensors'); another dtype casts the
    weights as they are read.
    """
    folder = ModelFolder.open(path)
    path, index = folder.path, folder.index
    if dtype in (None, "auto"):
        storage = folder.storage_dtype()
    else:
        storage = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
    model, meta = folder.skeleton(storage)
    if folder.compressed:
        warn_on_version_change(folder)
    names = name_map(model, index, path)
    prefix = find_blocks(model)[0] + "."
    nonblock = {k: v for k, v in names.items() if not k.startswith(prefix)}
    try:
        tensors = index.read(nonblock.values())
    except ShardError as e:
        raise LoadError(str(e)) from e
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    state = {}
    for k, ck in nonblock.items():
        t = tensors[ck]
        want = params.get(k, buffers.get(k))
        if want is not None and tuple(t.shape) != tuple(want.shape):
            raise LoadError(f"{path}: {ck} has shape {tuple(t.shape)}, the architecture {tuple(want.shape)}")
        state[k] = t.to(storage) if k in params and t.is_floating_point() else t
    model.load_state_dict(state, strict=False, assign=True)
    if tied_aliases(model):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if left:
        raise LoadError(f"{path}: parameters left without weights: {left[:5]}")
    tok = folder.tokenizer() if with_tokenizer else None
    return StreamedModel(model.eval(), index, names, storage, path, tok)


def load(
    path: str | os.PathLike | ModelFolder,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
    kv_cache: str = "normal",
    device_map: str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
):
    """Reload a folder written by `save`: skeleton on the meta device, `LowRankLinear` swapped in from the
    rank map and `QuantLinear` from the quantization map, weights assigned strictly (any missing or
    unexpected key is an error, never a random-initialised weight). Returns `(model, tokenizer)`.

    `device_map` (e.g. `"auto"`, or a dict as accelerate takes it) places the weights across devices, the CPU
    and `offload_folder` on disk without reading the whole model into memory first: a model larger than the
    device still runs.
    """
    if kv_cache not in KV_CACHES:
        raise ConfigError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
    folder = ModelFolder.open(path)
    if not folder.compressed:
        raise LoadError(f"{folder.path / 'config.json'} has no 'svdkit' rank map: load a dense folder with "
                        "svdkit.load_model")
    sm = open_streamed(folder, dtype or "auto", with_tokenizer)
    model = sm.model
    if device_map is not None:
        _dispatch(sm, device_map, offload_folder)
    else:
        prefix = sm.layout.prefix
        for i, block in enumerate(model.get_submodule(prefix)):
            try:
                sm.read_block(i, block)
            except ShardError as e:
                raise LoadError(str(e)) from e
        move_module(model, torch.device(device), None)
    model.eval()
    if kv_cache != "normal":  # "low-rank": key and value latents; "low-rank-values": full keys, value latents
        from .kvcache import enable_low_rank_kv_cache

        enable_low_rank_kv_cache(model, keys="latent" if kv_cache == "low-rank" else "full")
    return model, sm.tokenizer


def _dispatch(sm: StreamedModel, device_map: str | dict, offload_folder: str | os.PathLike | None) -> None:
    """Load the blocks straight onto the devices of `device_map` through accelerate (disk offload included)."""
    from accelerate import infer_auto_device_map, load_checkpoint_and_dispatch

    model = sm.model
    block_class = type(sm.layout.blocks(model)[0]).__name__
    # Block parameters are still on meta; non-block ones are loaded. Start from an all-meta view for accelerate.
    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, no_split_module_classes=[block_class], dtype=sm.storage_dtype)
    # accelerate casts every floating tensor to `dtype`, buffers included (a quantized layer's float16 scales):
    # cast only when the parameters are stored in another dtype than asked for, and never a quantized model
    stored = {sm.index.dtypes[sm.names[k]] for k, p in model.named_parameters()
              if k in sm.names and p.is_floating_point()}
    cast = None if stored <= {sm.storage_dtype} else sm.storage_dtype
    if cast is not None and quant_map(model):
        raise ConfigError(f"{sm.path} is quantized with its weights in {', '.join(sorted(map(str, stored)))}: load "
                          "it with a device map in the dtype it was saved in (dtype auto)")
    load_checkpoint_and_dispatch(model, str(sm.index.checkpoint), device_map=device_map, offload_folder=offload_folder,
                                 dtype=cast, no_split_module_classes=[block_class])
    for m in model.modules():  # accelerate assigned W_u row-major: the fast layout (and the same logits) again
        if isinstance(m, LowRankLinear) and not m.u.weight.is_meta:
            column_major(m.u)


