"""One small module per method; each is a config dataclass whose `factorize` turns a weight and its
calibration statistics into two factors. `METHODS` maps CLI names to classes."""

import dataclasses

from .adasvd import AdaSVD
from .asvd import ASVD
from .base import Factors, LayerStats, Method
from .fwsvd import FWSVD
from .ressvd import ResSVD
from .svd import SVD
from .svdllm import SVDLLM
from .svdllm_update import SVDLLMUpdate
from .svdllm_v2 import SVDLLMV2

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (SVD, ASVD, FWSVD, SVDLLM, SVDLLMUpdate, SVDLLMV2, AdaSVD, ResSVD)
}


def _convert(value: str, default):
    """A `key=value` string converted to the type of the field's default."""
    if value.lower() == "none":
        return None
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if default is None:
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def parse_method(spec: str, **overrides) -> Method:
    """A method from a spec such as `svdllm`, `adasvd:tau=0,adacr=false` or `ressvd:k=12` (options may
    also be separated by `;`, as in sweep lists); keyword arguments (e.g. `ratio=0.4`) are applied on top."""
    name, _, opts = spec.partition(":")
    cls = METHODS.get(name)
    if cls is None:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for pair in filter(None, (p.strip() for p in opts.replace(";", ",").split(","))):
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"bad option {pair!r} for {name}: expected key=value with key in {', '.join(fields)}")
        kwargs[key] = _convert(value.strip(), fields[key].default)
    return cls(**{**kwargs, **overrides})


def get_method(name: str, **kwargs) -> Method:
    """Instantiate a method by its CLI name, e.g. `get_method("svdllm", ratio=0.4)`."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name](**kwargs)


__all__ = [
    "ASVD",
    "AdaSVD",
    "ResSVD",
    "FWSVD",
    "METHODS",
    "SVD",
    "SVDLLM",
    "SVDLLMUpdate",
    "SVDLLMV2",
    "Factors",
    "LayerStats",
    "Method",
    "get_method",
    "parse_method",
]
