"""The transformers format: a compressed folder that plain `transformers` loads with `trust_remote_code=True`.

The folder holds `model.safetensors` (or shards with an index; the same tensors as svdkit's own format:
`...q_proj.u.weight`, `...q_proj.v.weight`), `modeling_svdkit.py` (`svdkit/hf_modeling.py` with its import line
naming the model's architecture), and a `config.json` whose model type is `svdkit_<original>` with `auto_map`
pointing at that file and the rank map under `svdkit`. The own model type matters: under the original one,
transformers without `trust_remote_code` would build the dense architecture and random-initialise the matrices
it cannot find; under `svdkit_llama` it refuses and asks for `trust_remote_code=True`.

`svdkit.io` writes the folder (`FolderWriter(format="transformers")`, block by block when streaming) and reads
it without running its code (the same strict meta-device path as svdkit's format); this module holds what is
particular to the format: the config, the modeling file and the README.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "transformers"
MODELING_FILE = "modeling_svdkit.py"
MODEL_CLASS = "SvdkitForCausalLM"
CONFIG_CLASS = "SvdkitConfig"
TYPE_PREFIX = "svdkit_"
_BASE_IMPORT = re.compile(
    r"^from transformers import \w+ as BaseConfig\nfrom transformers import \w+ as BaseForCausalLM\n"
    r"from transformers import \w+ as BaseModel$", re.MULTILINE
)
BASE_MODEL_CLASS = "SvdkitModel"

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

`AutoModel.from_pretrained("{name}", trust_remote_code=True)` builds `{base_model_cls}`, the base model with the
same low-rank matrices: what vLLM's Transformers backend serves
(`vllm serve {name} --trust-remote-code --model-impl transformers`). The config's `base_model_tp_plan` shards
each pair for tensor parallelism (column-wise: the rows of `W_u`; row-wise: the columns of `W_v`).

`svdkit.load("{name}")` reads the same folder without running this file. `save_pretrained` keeps the format.
"""


def base_class_names(model: nn.Module) -> tuple[str, str, str]:
    """`(config class, causal LM class, base model class)` names of the original architecture, all importable
    from `transformers`."""
    import transformers

    base = getattr(model, model.base_model_prefix, None) if hasattr(model, "base_model_prefix") else None
    names = (type(model.config).__name__, type(model).__name__, type(base).__name__)
    missing = [n for n in names if not hasattr(transformers, n)]
    if missing or not names[1].endswith("ForCausalLM"):
        raise ConfigError(f"format='transformers' needs a transformers *ForCausalLM architecture; "
                         f"{type(model).__name__} with {type(model.config).__name__} is not one")
    return names


def modeling_source(config_class: str, model_class: str, base_class: str) -> str:
    """The text of `modeling_svdkit.py` for one architecture: `hf_modeling.py` with its import lines rewritten."""
    text = (Path(__file__).parent / "hf_modeling.py").read_text(encoding="utf-8")
    line = (f"from transformers import {config_class} as BaseConfig\n"
            f"from transformers import {model_class} as BaseForCausalLM\n"
            f"from transformers import {base_class} as BaseModel")
    out, n = _BASE_IMPORT.subn(line, text)
    if n != 1:
        raise RuntimeError("hf_modeling.py lost its base-class import lines")
    return out


def transformers_config(config: dict, model: nn.Module, ranks: dict[str, int]) -> dict:
    """The folder's `config.json`: the original config under the model type `svdkit_<type>`, with `auto_map`
    pointing at the modeling file and the rank map under `svdkit`."""
    base_type = config["model_type"]
    if base_type.startswith(TYPE_PREFIX):
        raise ConfigError(f"model type {base_type!r} is already a svdkit transformers-format type")
    _, model_class, _ = base_class_names(model)
    module = MODELING_FILE[:-3]
    return {**config, "model_type": TYPE_PREFIX + base_type, "architectures": [MODEL_CLASS],
            "auto_map": {"AutoConfig": f"{module}.{CONFIG_CLASS}", "AutoModel": f"{module}.{BASE_MODEL_CLASS}",
                         "AutoModelForCausalLM": f"{module}.{MODEL_CLASS}"},
            "svdkit": {"format": FORMAT, "ranks": ranks, "base": model_class,
                       "load_with": "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"}}


def write_code_and_readme(folder: Path, model: nn.Module, ranks: dict[str, int], name: str, svdkit_version: str
                          ) -> None:
    """`modeling_svdkit.py` for the model's architecture, and the README that says what it does."""
    config_class, model_class, base_class = base_class_names(model)
    source = modeling_source(config_class, model_class, base_class)
    (folder / MODELING_FILE).write_text(source, encoding="utf-8")
    (folder / "README.md").write_text(README.format(
        name=name, base=model_class, base_config=config_class, svdkit_version=svdkit_version, n_low=len(ranks),
        params=sum(p.numel() for p in model.parameters()), modeling=MODELING_FILE, lines=source.count("\n"),
        config_cls=CONFIG_CLASS, model_cls=MODEL_CLASS, base_model_cls=BASE_MODEL_CLASS,
        model_type=TYPE_PREFIX + model.config.model_type),
        encoding="utf-8")


def base_config(raw: dict):
    """The original transformers config of a transformers-format folder's `config.json` (its own model type
    stripped, so no remote code runs), and the svdkit entry."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in raw.items() if k not in ("svdkit", "auto_map", "architectures", "model_type")}
    return AutoConfig.for_model(raw["model_type"][len(TYPE_PREFIX):], **cfg), raw["svdkit"]


def is_transformers_folder(path: str | os.PathLike) -> bool:
    """True when `path` holds a folder written with `format='transformers'`."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8")).get("svdkit")
    except (ValueError, AttributeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT
