"""The transformers format: a compressed folder that plain `transformers` loads with `trust_remote_code=True`.

The folder holds `model.safetensors` (the same tensors as svdkit's own format: `...q_proj.u.weight`,
`...q_proj.v.weight`), `modeling_svdkit.py` (`svdkit/hf_modeling.py` with its import line naming the model's
architecture), and a `config.json` whose model type is `svdkit_<original>` with `auto_map` pointing at that file
and the rank map under `svdkit`. The own model type matters: under the original one, transformers without
`trust_remote_code` would build the dense architecture and random-initialise the matrices it cannot find;
under `svdkit_llama` it refuses and asks for `trust_remote_code=True`.

`svdkit.load` reads the folder without running its code (the same strict meta-device path as svdkit's format).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ._fs import atomic_dir
from .modules import LowRankLinear

log = logging.getLogger(__name__)

FORMAT = "transformers"
MODELING_FILE = "modeling_svdkit.py"
MODEL_CLASS = "SvdkitForCausalLM"
CONFIG_CLASS = "SvdkitConfig"
TYPE_PREFIX = "svdkit_"
_BASE_IMPORT = re.compile(
    r"^from transformers import \w+ as BaseConfig\nfrom transformers import \w+ as BaseForCausalLM$", re.MULTILINE
)

README = """# {name}: a low-rank (SVD-compressed) {base}

Written by svdkit {svdkit_version}. {n_low} of the model's matrices are stored as two factors `W_u W_v`
(rank map in `config.json` under `svdkit.ranks`); the model has {params:,} parameters.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

`trust_remote_code=True` runs `{modeling}` from this folder ({lines} lines; it imports only torch and
transformers). What it does: it defines `{config_cls}`, the original `{base_config}` under the model type
`{model_type}`, and `{model_cls}`, a subclass of transformers' `{base}` that replaces each matrix named in the
rank map by `LowRankLinear` (`v`: rank x in, then `u`: out x rank with the bias, both `nn.Linear`) before the
weights are loaded, and keeps `u`'s weight transposed in memory (faster one-token products on CPUs).
Attention, the KV cache and generation are the original class's: attention goes through transformers'
attention interface (`config._attn_implementation`: sdpa, eager, flash, ...). Nothing is downloaded.

`svdkit.load("{name}")` reads the same folder without running this file. `save_pretrained` keeps the format.
Tensor parallelism (`tp_plan`) is not supported: the plan names the original dense matrices.
"""


def base_class_names(model: nn.Module) -> tuple[str, str]:
    """`(config class, model class)` names of the original architecture, both importable from `transformers`."""
    import transformers

    names = (type(model.config).__name__, type(model).__name__)
    missing = [n for n in names if not hasattr(transformers, n)]
    if missing or not names[1].endswith("ForCausalLM"):
        raise ValueError(f"format='transformers' needs a transformers *ForCausalLM architecture; "
                         f"{type(model).__name__} with {type(model.config).__name__} is not one")
    return names


def modeling_source(config_class: str, model_class: str) -> str:
    """The text of `modeling_svdkit.py` for one architecture: `hf_modeling.py` with its import lines rewritten."""
    text = (Path(__file__).parent / "hf_modeling.py").read_text(encoding="utf-8")
    line = (f"from transformers import {config_class} as BaseConfig\n"
            f"from transformers import {model_class} as BaseForCausalLM")
    out, n = _BASE_IMPORT.subn(line, text)
    if n != 1:
        raise RuntimeError("hf_modeling.py lost its base-class import lines")
    return out


def save_transformers(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    report=None,
    recipe: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (with `LowRankLinear` layers) as a folder that `AutoModelForCausalLM.from_pretrained(path,
    trust_remote_code=True)` loads as the low-rank model (see the module docstring). Atomic, like `svdkit.save`."""
    from .io import RECIPE, REPORT, _versions, rank_map
    from .quant.layer import QuantLinear

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("format='transformers' does not support quantized layers; save them with format='svdkit'")
    config_class, model_class = base_class_names(model)
    ranks = rank_map(model)
    base_type = model.config.model_type
    if base_type.startswith(TYPE_PREFIX):
        raise ValueError(f"model type {base_type!r} is already a svdkit transformers-format type")
    source = modeling_source(config_class, model_class)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        cfg_file = tmp / "config.json"
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
        config.update(
            model_type=TYPE_PREFIX + base_type,
            architectures=[MODEL_CLASS],
            auto_map={"AutoConfig": f"{MODELING_FILE[:-3]}.{CONFIG_CLASS}",
                      "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{MODEL_CLASS}"},
            svdkit={"format": FORMAT, "ranks": ranks, "base": model_class,
                    "load_with": "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"},
        )
        cfg_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / MODELING_FILE).write_text(source, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        full_recipe = {"format": FORMAT, "dense_export": False, "versions": _versions(), **(recipe or {})}
        if report is not None:
            full_recipe.setdefault("method", report.method)
            full_recipe.setdefault("config", report.config)
            full_recipe.setdefault("calibration", report.calibration)
            report.save_json(tmp / REPORT)
        (tmp / RECIPE).write_text(json.dumps(full_recipe, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(README.format(
            name=Path(path).name, base=model_class, base_config=config_class, svdkit_version=_versions()["svdkit"],
            n_low=len(ranks), params=sum(p.numel() for p in model.parameters()), modeling=MODELING_FILE,
            lines=source.count("\n"), config_cls=CONFIG_CLASS, model_cls=MODEL_CLASS,
            model_type=TYPE_PREFIX + base_type), encoding="utf-8")
    log.info("saved transformers-format model (%d low-rank matrices) to %s", len(ranks), path)
    return Path(path)


def is_transformers_folder(path: str | os.PathLike) -> bool:
    """True when `path` holds a folder written with `format='transformers'`."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8")).get("svdkit")
    except ValueError:
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors`, or of the shards its index names."""
    from .io import WEIGHTS, LoadError

    index = path / f"{WEIGHTS}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    if not (path / WEIGHTS).is_file():
        raise LoadError(f"{path} is not a complete transformers-format folder: {WEIGHTS} is missing")
    return load_file(str(path / WEIGHTS))


def load_transformers(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
    kv_cache: str = "normal",
):
    """Read a transformers-format folder with svdkit's own classes (its modeling file is not run): the original
    architecture on the meta device, `LowRankLinear` from the rank map, weights assigned strictly."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .engine import set_submodule
    from .io import LoadError, _tied_aliases, warn_on_version_change

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    meta, model_type = cfg.pop("svdkit"), cfg.pop("model_type", "")
    for key in ("auto_map", "architectures"):
        cfg.pop(key, None)
    if not model_type.startswith(TYPE_PREFIX):
        raise LoadError(f"{path}: model type {model_type!r} is not a svdkit transformers-format type")
    warn_on_version_change(path)
    config = AutoConfig.for_model(model_type[len(TYPE_PREFIX):], **cfg)
    saved_dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype)
    for name, rank in meta["ranks"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise LoadError(f"{path}: rank map names {name!r}, which the architecture does not have") from e
        set_submodule(model, name, LowRankLinear(old.in_features, old.out_features, rank,
                                                 bias=old.bias is not None, device="meta"))
    state = _read_weights(path)
    expected, aliases = set(model.state_dict()), _tied_aliases(model)
    missing, unexpected = sorted(expected - set(state) - aliases), sorted(set(state) - expected)
    if missing or unexpected:
        raise LoadError(f"{path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if aliases:
        model.tie_weights()
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
