"""A model folder, read once: its `config.json` (checked), its format (a dense Hugging Face folder, svdkit's own,
or the transformers format), the index of its tensors, its storage dtype and its tokenizer. Every reader of a
folder (`io.open_streamed`, `io.load`, `models.load_model`) opens one `ModelFolder` and hands it on, so the
config is parsed once per load (transformers reads it once more when it builds a config object).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import hf_format
from .errors import SvdkitError
from .layout import set_submodule, weight_matrix
from .modules import LowRankLinear
from .quant.layer import QuantLinear
from .shards import ShardError, TensorIndex

FORMAT = 1
QUANT_FORMAT = 2  # written when the model holds QuantLinear layers; older readers refuse it loudly
READ_FORMATS = (FORMAT, QUANT_FORMAT, hf_format.FORMAT)
DENSE_STEM, STEM = "model", "svdkit"  # weights file stems: dense export (what transformers reads), compressed
RECIPE = "svdkit_recipe.json"


class LoadError(SvdkitError, ValueError):
    """Raised when a model folder is incomplete, corrupt or inconsistent."""


@dataclass
class ModelFolder:
    """A model folder's path and its parsed `config.json` (`raw`); the rest is derived, each part read once."""

    path: Path
    raw: dict

    @classmethod
    def open(cls, path: str | os.PathLike | ModelFolder) -> ModelFolder:
        """The folder at `path` (a `ModelFolder` is returned as it is), its config read and checked."""
        if isinstance(path, ModelFolder):
            return path
        path = Path(path)
        cfg = path / "config.json"
        if not cfg.exists():
            raise LoadError(f"{path} is not a model folder: config.json is missing")
        try:
            raw = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LoadError(f"{cfg}: not readable JSON ({e})") from e
        if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
            raise LoadError(f"{path} is not a model folder: {cfg.name} has no model_type")
        if raw["model_type"].startswith(hf_format.TYPE_PREFIX) and not isinstance(raw.get("svdkit"), dict):
            raise LoadError(f"{cfg}: model type {raw['model_type']!r} is svdkit's transformers format, but the "
                            f"'svdkit' entry (its rank map) is missing")
        return cls(path, raw)

    @property
    def compressed(self) -> bool:
        """Written by `svdkit.save` (its config carries a rank map)."""
        return "svdkit" in self.raw

    @property
    def transformers_format(self) -> bool:
        """Written with `format="transformers"` (plain transformers loads it with `trust_remote_code=True`)."""
        meta = self.raw.get("svdkit")
        return isinstance(meta, dict) and meta.get("format") == hf_format.FORMAT

    @functools.cached_property
    def index(self) -> TensorIndex:
        """The folder's tensors: svdkit's own stem for its format, transformers' `model` otherwise."""
        own_stem = self.compressed and not self.transformers_format
        try:
            return TensorIndex(self.path, STEM if own_stem else DENSE_STEM)
        except ShardError as e:
            own = [f for f in (f"{STEM}.safetensors", f"{STEM}.safetensors.index.json") if (self.path / f).exists()]
            if not own_stem and own:
                raise LoadError(f"{self.path} holds {own[0]} but its config.json has no 'svdkit' entry (rank map): "
                                f"the config was replaced or edited") from e
            raise LoadError(str(e)) from e

    def storage_dtype(self) -> torch.dtype:
        """The dtype the weights are stored in: the config's, else the tensors' most common floating one."""
        named = self.raw.get("dtype") or self.raw.get("torch_dtype")
        stored = getattr(torch, named) if isinstance(named, str) and hasattr(torch, named) else None
        return stored or self.index.floating_dtype() or torch.float32

    def transformers_config(self):
        """The transformers config object of the folder's architecture, and the `svdkit` entry ({} if dense). A
        transformers-format folder is read as its original architecture, so its modeling file never runs."""
        return self._config

    @functools.cached_property
    def _config(self):
        from transformers import AutoConfig

        try:
            if self.transformers_format:
                config, meta = hf_format.base_config(self.raw)
                return config, meta
            config = AutoConfig.from_pretrained(self.path, trust_remote_code=False)  # never a prompt, never code
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LoadError(f"{self.path / 'config.json'}: transformers cannot read it ({type(e).__name__}: {e})"
                            ) from e
        meta = getattr(config, "svdkit", None) or {}
        if hasattr(config, "svdkit"):
            delattr(config, "svdkit")
        return config, meta

    def recipe(self) -> dict:
        """The folder's `svdkit_recipe.json` ({} without a readable one)."""
        try:
            data = json.loads((self.path / RECIPE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def tokenizer(self, config=None):
        """The folder's tokenizer, or None when it has none. A folder `save` wrote with a tokenizer that has lost
        any of its files is a `LoadError` (load it with `with_tokenizer=False` to read the weights alone). `config`
        (default: the folder's, read once) saves transformers from reading `config.json` again."""
        from transformers import AutoTokenizer

        files = self.recipe().get("tokenizer_files", [])
        files = [f for f in files if isinstance(f, str)] if isinstance(files, list) else []
        lost = [f for f in files if not (self.path / f).is_file()]
        if lost:
            raise LoadError(f"{self.path}: tokenizer file(s) {', '.join(lost)} missing (it was saved with them): "
                            f"restore them, or load with with_tokenizer=False for the weights alone")
        if not any((self.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None
        # hand the tokenizer the config object: transformers then does not read `config.json` again, and for the
        # transformers format (whose config names svdkit's own model type) never asks to run the folder's code
        config = config if config is not None else self.transformers_config()[0]
        try:
            return AutoTokenizer.from_pretrained(self.path, config=config)
        except (OSError, ValueError) as e:
            raise LoadError(f"{self.path}: its tokenizer files cannot be read ({type(e).__name__}: {e})") from e

    def skeleton(self, dtype: torch.dtype | None) -> tuple[nn.Module, dict]:
        """The architecture of the folder's config on the meta device, with `LowRankLinear`/`QuantLinear` swapped in
        where the rank and quantization maps say; returns it and the `svdkit` entry of the config ({} if dense).
        A transformers-format folder is read as its original architecture: its modeling file is never run."""
        path = self.path
        config, meta = self.transformers_config()
        if self.compressed:
            fmt = meta.get("format") if isinstance(meta, dict) else meta
            if fmt not in READ_FORMATS:
                raise LoadError(f"{path}: unsupported svdkit format {fmt!r} (this version reads "
                                f"{', '.join(map(str, READ_FORMATS))})")
            if not isinstance(meta.get("ranks"), dict):
                raise LoadError(f"{path / 'config.json'}: the svdkit entry has no rank map")
        model = empty_model(config, dtype)
        for name, rank in meta.get("ranks", {}).items():
            try:
                old = model.get_submodule(name)
                m, n = weight_matrix(old).shape
            except AttributeError as e:
                raise LoadError(f"{path}: rank map names {name!r}, which the architecture does not have") from e
            if not isinstance(rank, int) or not 0 < rank <= min(m, n):
                raise LoadError(f"{path}: rank map gives {name} ({m} x {n}) rank {rank!r}")
            set_submodule(model, name, LowRankLinear(n, m, rank, bias=old.bias is not None, device="meta",
                                                     dtype=dtype))
        swap_quantized(model, meta.get("quant", {}), path)
        return model, meta


def empty_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture of `config` on the meta device (buffers real, e.g. RoPE's `inv_freq`)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype) if dtype else AutoModelForCausalLM.from_config(
            config)


def swap_quantized(model: nn.Module, quant: dict[str, dict], path: Path) -> None:
    """Replace each module named in the quantization map by a meta-device `QuantLinear` of its recorded shape."""
    for name, spec in quant.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise LoadError(f"{path}: quantization map names {name!r}, which the architecture does not have"
                        ) from e
        m, n = weight_matrix(old).shape
        if (m, n) != (spec["out_features"], spec["in_features"]):
            raise LoadError(f"{path}: {name} is {m} x {n} but was quantized as "
                            f"{spec['out_features']} x {spec['in_features']}")
        q = QuantLinear(n, m, spec["bits"], spec["group_size"], bias=old.bias is not None,
                        scale_dtype=spec["scale_dtype"], device="meta")
        q.method = spec.get("method", "")
        set_submodule(model, name, q)


def tied_aliases(model: nn.Module) -> set[str]:
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


def name_map(model: nn.Module, index: TensorIndex, path: Path) -> dict[str, str]:
    """Model state-dict key -> checkpoint key (checkpoints may omit the base model prefix, e.g. GPT-2's
    `transformer.`); strict: a missing or unexpected tensor is a `LoadError`."""
    expected = [k for k in model.state_dict() if k not in tied_aliases(model)]
    present = set(index.names())
    prefix = getattr(model, "base_model_prefix", "") + "."
    names = {}
    for k in expected:
        if k in present:
            names[k] = k
        elif prefix != "." and k.startswith(prefix) and k[len(prefix):] in present:
            names[k] = k[len(prefix):]
    missing = [k for k in expected if k not in names]
    unexpected = sorted(present - set(names.values()))
    if missing or unexpected:
        raise LoadError(f"{path}: weights do not match the model: missing {missing[:5]}"
                        f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                        f"{'...' if len(unexpected) > 5 else ''}")
    return names
