"""Spec strings, one grammar for methods and quantizers: `name` or `name:key=value,key=value` (`;` also
separates options, so a list of specs can itself be comma-separated). Values are converted by the config
dataclass's field types (`int`, `float`, `bool`, `str`, and `X | None`, where `none` means None)."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from .errors import ConfigError

T = TypeVar("T")

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class SpecError(ConfigError):
    """Raised for a malformed spec, an unknown option, or a value of the wrong type."""


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`"adasvd:tau=0;adacr=false"` -> `("adasvd", {"tau": "0", "adacr": "false"})` (dashes in keys become `_`)."""
    name, _, opts = spec.strip().partition(":")
    if not name.strip():
        raise SpecError(f"spec {spec!r} has no name")
    options: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in opts.replace(";", ",").split(","))):
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SpecError(f"bad option {pair!r} in {spec!r}: expected key=value")
        if key in options:
            raise SpecError(f"option {key!r} given twice in {spec!r}")
        options[key] = value.strip()
    return name.strip(), options


def convert(value: str, annotation: str, key: str) -> object:
    """A string converted to a field's annotated type (annotations are strings: `from __future__`)."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if "None" in kinds and value.lower() == "none":
        return None
    kinds = [k for k in kinds if k != "None"]
    kind = kinds[0] if len(kinds) == 1 else "str"
    try:
        if kind == "bool":
            if value.lower() not in _TRUE + _FALSE:
                raise ValueError(value)
            return value.lower() in _TRUE
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except ValueError:
        raise SpecError(f"option {key}={value!r}: expected {kind}") from None
    return value


def build(cls: type[T], name: str, options: dict[str, str], *, exclude: tuple[str, ...] = (), **fixed) -> T:
    """An instance of the config dataclass `cls` from string options; `fixed` keyword arguments win over them.
    Options in `exclude` are not accepted from the string; errors name the spec and the allowed keys."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    allowed = [k for k in fields if k not in exclude]
    kwargs = {}
    for key, value in options.items():
        if key not in allowed:
            raise SpecError(f"unknown option {key!r} for {name}: expected one of {', '.join(allowed)}")
        kwargs[key] = convert(value, fields[key].type, key)
    try:
        return cls(**{**kwargs, **fixed})
    except TypeError as e:
        raise SpecError(f"{name}: {e}") from e
