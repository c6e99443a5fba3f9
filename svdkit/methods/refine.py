"""What block-local refinement does (`RefineConfig`, the `rf_*` options of every method); the training loop
lives in `svdkit.refine`, run by the compression walk right after each block is factorized."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

TARGETS = ("stream", "anchored")
LOSSES = ("relative", "token", "mse", "fisher")
FISHER_DAMPING = 0.01  # `fisher` loss: its metric is G + this * mean(diag G) * I
BACKOFF = 0.25  # the learning rate of a retry, relative to the attempt before it


@dataclass
class RefineConfig:
    """`steps` AdamW steps per block at `lr` (warm-up over `warmup` of them, cosine decay to 0), `batch`
    windows per step, gradients clipped at `max_grad_norm`. `target`: `stream` (the compressed stream's inputs,
    the dense block's outputs on them) or `anchored` (the dense model's inputs and outputs); `correct` moves the
    stream target that fraction of the way to the dense model's outputs (1: the block also undoes the error of the
    compressed blocks before it); `loss`: `relative` (squared error over the targets' squared norm), `token` (each
    token's relative error, averaged), `mse`, or `fisher` (the squared error in the metric of the block output's
    loss-gradient Gram `G`, K-FAC's output statistics, over the targets' squared norm in it: a second-order
    estimate of the loss the error costs; needs a method with output-gradient Grams); `norms`: train the block's
    norm weights too. `retries`: a block whose objective ends higher than it started is trained again from its
    factorized factors at `BACKOFF` times the learning rate, up to this many times."""

    steps: int = 64
    lr: float = 1e-4
    batch: int = 4
    target: str = "stream"
    loss: str = "relative"
    norms: bool = False
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    retries: int = 0
    correct: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"refinement needs steps >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"refinement learning rate must be > 0, got {self.lr}")
        if self.batch < 1:
            raise ConfigError(f"refinement batch must be >= 1 window, got {self.batch}")
        if self.target not in TARGETS:
            raise ConfigError(f"refinement target must be one of {TARGETS}, got {self.target!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"refinement loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.correct <= 1.0:
            raise ConfigError(f"refinement correct must be a fraction in [0, 1], got {self.correct}")
        if self.correct and self.target != "stream":
            raise ConfigError("refinement correct applies to the stream target only (anchored inputs are dense)")
        if self.retries < 0:
            raise ConfigError(f"refinement retries must be >= 0, got {self.retries}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
