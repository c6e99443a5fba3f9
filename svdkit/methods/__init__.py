"""One small module per method; each is a config dataclass whose `factorize` turns a weight and its
calibration statistics into two factors. `METHODS` maps CLI names to classes."""

from ..specs import SpecError, build, split_spec
from .adasvd import AdaSVD
from .asvd import ASVD
from .base import STREAMS, Factors, LayerStats, Method
from .finetune import SVDLLMFT, AdaSVDFT, FinetuneConfig
from .fwsvd import FWSVD
from .kfac import KFAC, AdaKFAC, AdaKFACFT, AdaKFACRF
from .ressvd import ResSVD
from .svd import SVD
from .svdllm import SVDLLM
from .svdllm_update import SVDLLMUpdate
from .svdllm_v2 import SVDLLMV2

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (SVD, ASVD, FWSVD, SVDLLM, SVDLLMUpdate, SVDLLMV2, AdaSVD, ResSVD, KFAC, AdaKFAC, AdaKFACRF, AdaKFACFT,
                SVDLLMFT, AdaSVDFT)
}


def get_method(name: str, **kwargs) -> Method:
    """Instantiate a method by its CLI name, e.g. `get_method("svdllm", ratio=0.4)`."""
    if name not in METHODS:
        raise SpecError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name](**kwargs)


def parse_method(spec: str, **overrides) -> Method:
    """A method from a spec such as `svdllm`, `adasvd:tau=0,adacr=false` or `ressvd:k=12` (see `svdkit.specs`);
    keyword arguments (e.g. `ratio=0.4`) are applied on top."""
    name, options = split_spec(spec)
    if name not in METHODS:
        raise SpecError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    return build(METHODS[name], name, options, **overrides)


__all__ = [
    "ASVD",
    "AdaKFAC",
    "AdaKFACFT",
    "AdaKFACRF",
    "AdaSVD",
    "AdaSVDFT",
    "KFAC",
    "ResSVD",
    "FWSVD",
    "METHODS",
    "STREAMS",
    "SVD",
    "SVDLLM",
    "SVDLLMFT",
    "SVDLLMUpdate",
    "SVDLLMV2",
    "Factors",
    "FinetuneConfig",
    "LayerStats",
    "Method",
    "get_method",
    "parse_method",
]
