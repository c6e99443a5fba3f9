"""Save and reload compressed models: safetensors weights, the original config plus a rank map, the
tokenizer, and a recipe; strict loading onto a meta-device skeleton. No pickles.

`config.json` of a compressed folder carries `svdkit` (format, rank map). Its weights live in
`svdkit.safetensors`, not `model.safetensors`: plain `transformers.from_pretrained` then fails loudly
("no file named model.safetensors") instead of random-initialising the dense weights it cannot find.
`save(..., dense=True)` writes an ordinary transformers folder.

Quantized models (`svdkit.quant.QuantLinear` layers, dense or as the factors of a `LowRankLinear`) add a
quantization map to `svdkit` (full module name -> bits, group size, scale dtype, method) and are written
as format 2; `load` swaps `QuantLinear` skeletons in after the `LowRankLinear` ones, before strict loading.
"""

from __future__ import annotations

import json
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._fs import atomic_dir
from .engine import set_submodule
from .modules import LowRankLinear
from .quant.layer import QuantLinear

log = logging.getLogger(__name__)

FORMAT = 1
QUANT_FORMAT = 2  # written when the model holds QuantLinear layers; older readers refuse it loudly
READ_FORMATS = (FORMAT, QUANT_FORMAT)
WEIGHTS = "model.safetensors"  # dense export: the name transformers looks for
LOWRANK_WEIGHTS = "svdkit.safetensors"  # compressed: a name plain transformers cannot mistake for dense weights
RECIPE = "svdkit_recipe.json"
REPORT = "svdkit_report.json"
QUANT_REPORT = "svdkit_quant_report.json"


class LoadError(ValueError):
    """Raised when a compressed folder is incomplete or inconsistent."""


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


def warn_on_version_change(path: Path) -> None:
    """One warning line when the folder's recipe says another major version of svdkit or transformers wrote it."""
    try:
        with open(path / RECIPE, encoding="utf-8") as f:
            written = json.load(f).get("versions", {})
    except (OSError, ValueError, AttributeError):
        return  # an old folder without a readable recipe: nothing to compare
    now = _versions()
    changed = [f"{pkg} {written[pkg]} (installed: {now[pkg]})" for pkg in ("svdkit", "transformers")
               if _major(written.get(pkg)) is not None and _major(now[pkg]) is not None
               and _major(written[pkg]) != _major(now[pkg])]
    if changed:
        log.warning("%s was written by another major version: %s; check its logits before trusting them",
                    path, ", ".join(changed))


def _unique_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases of tied tensors (safetensors stores each storage once); contiguous CPU copies."""
    seen: set[tuple] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().to("cpu").contiguous()
    return out


def _dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with every `LowRankLinear` multiplied back (and every `QuantLinear` dequantized) into a dense
    weight of the original layout."""
    from transformers.pytorch_utils import Conv1D

    skeleton_types = _skeleton_types(model.config)
    state = dict(model.state_dict())
    for name, m in model.named_modules():
        if not isinstance(m, (LowRankLinear, QuantLinear)) or _inside_low_rank(model, name):
            continue
        for k in [k for k in state if k.startswith(f"{name}.")]:  # factors (float or quantized), codes, bias
            state.pop(k)
        w = m.weight.detach().to(model.dtype)
        state[f"{name}.weight"] = w.t() if skeleton_types.get(name) is Conv1D else w
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.detach()
    return state


def _inside_low_rank(model: nn.Module, name: str) -> bool:
    """True for a factor (`...u` / `...v`) of a `LowRankLinear`: the parent handles its export."""
    parent, _, child = name.rpartition(".")
    return child in ("u", "v") and isinstance(model.get_submodule(parent), LowRankLinear)


def _skeleton_types(config) -> dict[str, type]:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    return {name: type(m) for name, m in skeleton.named_modules()}


def save(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    report=None,
    recipe: dict | None = None,
    dense: bool = False,
    overwrite: bool = False,
    quant_report=None,
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
    from .quant.quantize import quant_map

    if format == "transformers":
        if dense:
            raise ValueError("dense=True already writes a plain transformers folder; drop format='transformers'")
        from .hf_format import save_transformers

        return save_transformers(model, path, tokenizer=tokenizer, report=report, recipe=recipe, overwrite=overwrite)
    if format != "svdkit":
        raise ValueError(f"format must be 'svdkit' or 'transformers', got {format!r}")
    config = model.config.to_dict()
    config.pop("svdkit", None)
    ranks = rank_map(model)
    quant = {} if dense else quant_map(model)
    fmt = QUANT_FORMAT if quant else FORMAT
    if dense:
        state = _dense_state_dict(model)
    else:
        state = dict(model.state_dict())
        config["svdkit"] = {"format": fmt, "ranks": ranks, "load_with": "svdkit.load(path)"}
        if quant:
            config["svdkit"]["quant"] = quant
    state = _unique_state_dict(state)
    full_recipe = {"format": fmt, "dense_export": dense, "versions": _versions(), **(recipe or {})}
    if report is not None:
        full_recipe.setdefault("method", report.method)
        full_recipe.setdefault("config", report.config)
        full_recipe.setdefault("calibration", report.calibration)
    if quant_report is not None:
        full_recipe.setdefault("quantization", quant_report.summary())
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / (WEIGHTS if dense else LOWRANK_WEIGHTS)), metadata={"format": "pt"})
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(tmp / RECIPE, "w", encoding="utf-8") as f:
            json.dump(full_recipe, f, indent=2)
        if report is not None:
            report.save_json(tmp / REPORT)
        if quant_report is not None:
            quant_report.save_json(tmp / QUANT_REPORT)
    log.info("saved %s model (%d low-rank matrices, %d quantized) to %s", "dense" if dense else "compressed",
             len(ranks), len(quant), path)
    return Path(path)


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
    kv_cache: str = "normal",
):
    """Reload a folder written by `save`: skeleton on the meta device, `LowRankLinear` swapped in from the
    rank map and `QuantLinear` from the quantization map, weights assigned strictly (any missing or
    unexpected key is an error). Returns `(model, tokenizer)`; the tokenizer is None when the folder has
    none or `with_tokenizer` is False."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .hf_format import is_transformers_folder, load_transformers

    path = Path(path)
    if is_transformers_folder(path):
        return load_transformers(path, dtype=dtype, device=device, with_tokenizer=with_tokenizer, kv_cache=kv_cache)
    cfg_file, weights = path / "config.json", path / LOWRANK_WEIGHTS
    for f in (cfg_file, weights):
        if not f.exists():
            raise LoadError(f"{path} is not a saved svdkit model: {f.name} is missing")
    config = AutoConfig.from_pretrained(path)
    meta = getattr(config, "svdkit", None)
    if meta is None:
        raise LoadError(f"{cfg_file} has no 'svdkit' rank map: load a dense folder with svdkit.load_model")
    if meta.get("format") not in READ_FORMATS:
        raise LoadError(f"{path}: unsupported svdkit format {meta.get('format')!r} (this version reads "
                        f"{', '.join(map(str, READ_FORMATS))})")
    delattr(config, "svdkit")
    warn_on_version_change(path)
    saved_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype)
    for name, rank in meta["ranks"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise LoadError(f"{path}: rank map names {name!r}, which the architecture does not have") from e
        from .models import weight_matrix

        m, n = weight_matrix(old).shape
        set_submodule(model, name, LowRankLinear(n, m, rank, bias=old.bias is not None, device="meta"))
    _swap_quantized(model, meta.get("quant", {}), path)
    state = load_file(str(weights))
    expected = set(model.state_dict())
    aliases = _tied_aliases(model)
    missing = sorted(expected - set(state) - aliases)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise LoadError(
            f"{path}: weights do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if aliases:
        model.tie_weights()
    still_meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if still_meta:
        raise LoadError(f"{path}: parameters left without weights: {still_meta[:5]}")
    if dtype is not None:
        model.to(dtype)
    model.to(device).eval()
    if kv_cache == "low-rank":
        from .kvcache import enable_low_rank_kv_cache

        enable_low_rank_kv_cache(model)
    elif kv_cache != "normal":
        raise ValueError(f"kv_cache must be 'normal' or 'low-rank', got {kv_cache!r}")
    tok = None
    if with_tokenizer and (path / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def _swap_quantized(model: nn.Module, quant: dict[str, dict], path: Path) -> None:
    """Replace each module named in the quantization map by a meta-device `QuantLinear` of its recorded shape."""
    for name, spec in quant.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise LoadError(f"{path}: quantization map names {name!r}, which the architecture does not have") from e
        from .models import weight_matrix

        m, n = weight_matrix(old).shape
        if (m, n) != (spec["out_features"], spec["in_features"]):
            raise LoadError(f"{path}: {name} is {m} x {n} but was quantized as "
                            f"{spec['out_features']} x {spec['in_features']}")
        q = QuantLinear(n, m, spec["bits"], spec["group_size"], bias=old.bias is not None,
                        scale_dtype=spec["scale_dtype"], device="meta")
        q.method = spec.get("method", "")
        set_submodule(model, name, q)


def _tied_aliases(model: nn.Module) -> set[str]:
    """State-dict keys that alias another key through tied weights (e.g. lm_head.weight)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings()
    if out is None:
        return set()
    for name, m in model.named_modules():
        if m is out:
            return {f"{name}.weight"}
    return set()
