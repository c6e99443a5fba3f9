"""What every method shares: the statistics it receives, the factors it returns, its config base class."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from ..allocation import Allocation, Uniform
from ..errors import ConfigError
from ..linalg import EIG_RTOL, Whitener, whiten

if TYPE_CHECKING:
    from .finetune import FinetuneConfig
    from .refine import RefineConfig

log = logging.getLogger(__name__)

# The two activation streams, named by the model whose outputs they are: the dense (original) model's, and
# the model whose earlier blocks are already compressed.
STREAMS = ("original", "compressed")
_OLD_PROPAGATION = {"original": "original", "sequential": "compressed"}


@dataclass
class LayerStats:
    """Calibration statistics of one unique matrix input, gathered by the engine (all float64).

    `gram` is `X X^T` on the stream the method whitens with; `gram_c` (`X' X'^T`) and `cross` (`X' X^T`,
    compressed stream times original stream) exist for methods that correct for already-compressed blocks.
    Linears that share an input share one `LayerStats`, so its whitening is computed once (`whitener`);
    per-matrix gradient statistics (`row_importance`, `out_gram`) are set on a copy that keeps the whitenings.
    """

    gram: torch.Tensor
    tokens: int
    abs_mean: torch.Tensor | None = None
    gram_c: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    row_importance: torch.Tensor | None = None  # FWSVD: sum_j (dL/dW_ij)^2 per output row
    # K-FAC: sum_t g_t g_t^T of the output gradients (m x m), each matrix's own: the method damps it in place
    out_gram: torch.Tensor | None = None
    _whiteners: dict = field(default_factory=dict, repr=False, compare=False)

    def whitener(self, kind: str = "cholesky", eig_rtol: float = EIG_RTOL) -> Whitener:
        """`S` with `S S^T = gram` (see `linalg.whiten`), computed once per kind and shared by every caller."""
        key = (kind, eig_rtol)
        if key not in self._whiteners:
            self._whiteners[key] = whiten(self.gram, kind, eig_rtol)
        return self._whiteners[key]


@dataclass
class Factors:
    """`W ~= w_u @ w_v` (float64), with method-specific facts for the report (e.g. `sigma_tail`)."""

    w_u: torch.Tensor
    w_v: torch.Tensor
    info: dict = field(default_factory=dict)


def deprecated(message: str) -> None:
    """A deprecated option's one warning: a `DeprecationWarning` and a log line (the command line shows it)."""
    warnings.warn(message, DeprecationWarning, stacklevel=4)
    log.warning(message)


@dataclass
class Method:
    """Base config: `ratio` is the fraction of each compressed matrix's parameters removed; `stream` is the
    activation stream the whitening statistics come from (`original`: the dense model's, as SVD-LLM;
    `compressed`: through the already-compressed blocks). `propagation` is its deprecated old name."""

    ratio: float = 0.2
    stream: str = "original"
    propagation: str | None = None
    # block-local refinement (`svdkit.refine`), run by the walk right after each block is factorized: 0 steps = off
    rf_steps: int = 0
    rf_lr: float = 1e-4
    rf_batch: int = 4
    rf_target: str = "stream"
    rf_loss: str = "relative"
    rf_norms: bool = False
    rf_retries: int = 0
    rf_correct: float = 0.0

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # extra statistics: "gram_c", "cross", "fisher", "out_gram"
    needs_data: ClassVar[bool] = True  # False: factorize() ignores the statistics (compress accepts calib=None)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"ratio must be in [0, 1) (fraction of parameters removed), got {self.ratio}")
        if self.propagation is not None:
            if self.propagation not in _OLD_PROPAGATION:
                raise ConfigError(f"propagation must be one of {tuple(_OLD_PROPAGATION)}, got {self.propagation!r}")
            new = _OLD_PROPAGATION[self.propagation]
            deprecated(f"option propagation={self.propagation} is deprecated: use stream={new}")
            self.stream, self.propagation = new, None
        if self.stream not in STREAMS:
            raise ConfigError(f"stream must be one of {STREAMS}, got {self.stream!r}")
        if self.rf_steps < 0:
            raise ConfigError(f"rf_steps must be >= 0, got {self.rf_steps}")
        _ = self.refine_config  # validates the other rf_* options
        if self.rf_steps and self.rf_loss == "fisher" and "out_gram" not in self.needs:
            raise ConfigError(f"rf_loss=fisher weighs each block's output error by its loss-gradient Gram, which "
                              f"{self.name or type(self).__name__} does not compute: use a K-FAC method (ada-kfac)")

    @property
    def refine_config(self) -> RefineConfig | None:
        """Block-local refinement after each block's factorization (`svdkit.refine`; None: `rf_steps=0`, off)."""
        if not self.rf_steps:
            return None
        from .refine import RefineConfig

        return RefineConfig(steps=self.rf_steps, lr=self.rf_lr, batch=self.rf_batch, target=self.rf_target,
                            loss=self.rf_loss, norms=self.rf_norms, retries=self.rf_retries,
                            correct=self.rf_correct)

    @property
    def allocation(self) -> Allocation:
        """How the overall ratio is spread over the matrices (a spec from `svdkit.allocation`)."""
        return Uniform()

    # What the gradient passes use, for the methods that ask for them (`needs`); a method's fields of the same
    # names (FWSVD's `fisher_samples`, K-FAC's `grad_samples` and `labels`) take their place.
    @property
    def fisher_samples(self) -> int | None:
        """Calibration windows the Fisher pass uses (None: all); only read when `"fisher" in needs`."""
        return None

    @property
    def grad_samples(self) -> int | None:
        """Calibration windows the output-gradient pass uses (None: all); only read when `"out_gram" in needs`."""
        return None

    @property
    def labels(self) -> str:
        """Next-token labels of the output-gradient pass (`LABELS`): `data` (the text's) or `model` (drawn from
        the model)."""
        return "data"

    @property
    def finetune_config(self) -> FinetuneConfig | None:
        """A `methods.finetune.FinetuneConfig` to train the compressed model's factors with once every block is
        factorized (None: no fine-tuning; `FinetuneOptions`'s `ft_*` options set it)."""
        return None

    @property
    def input_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A rewrite of the first block's calibration inputs (`N x seqlen x width` -> `M x seqlen x width`) before
        the walk; None keeps them as they are."""
        return None

    def factorize(self, w: torch.Tensor, stats: LayerStats, rank: int) -> Factors:
        """Rank-`rank` factors of the `m x n` float64 weight `w` given its input statistics."""
        raise NotImplementedError
