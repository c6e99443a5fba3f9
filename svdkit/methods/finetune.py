"""Methods followed by SVD-LLM's sequential low-rank update: `FinetuneConfig` (what one fine-tuning run does),
the `ft_*` options as a mixin, and the fine-tuned variants of SVD-LLM and AdaSVD. The training loop lives in
`svdkit.finetune`; `compress` runs it on an in-memory model once every block is factorized, and
`pipeline.compress_to` on the compressed folder (the whole model must then fit in memory).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .adasvd import AdaSVD
from .svdllm import SVDLLM

MODES = ("direct", "lora")


@dataclass
class FinetuneConfig:
    """What one fine-tuning run does: `steps` optimizer steps per phase, in the order of `phases` (`u`: every
    `W_u`, `v`: every `W_v`), `batch_size` windows per step, AdamW at `lr` with a linear warm-up over `warmup`
    of each phase's steps then cosine decay to 0, gradients clipped at `max_grad_norm`. `mode`: `direct`
    trains the factors themselves, `lora` a rank-`lora_rank` adapter `W + (alpha / r) B A` merged back."""

    steps: int = 64
    lr: float = 1e-4
    phases: str = "uv"
    batch_size: int = 1
    mode: str = "direct"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    track_windows: int = 0  # training windows whose loss is measured before and after each phase (0: none)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"fine-tuning needs steps >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if not self.phases or any(p not in "uv" for p in self.phases):
            raise ConfigError(f"phases must be a string of 'u' and 'v' (e.g. 'uv'), got {self.phases!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.track_windows < 0:
            raise ConfigError(f"track_windows must be >= 0, got {self.track_windows}")


@dataclass
class FinetuneOptions:
    """Fine-tuning options: steps per phase (0: off), learning rate, phases (`uv`: W_u then W_v), windows
    per step, `direct` factor training or merged `lora` adapters of rank `ft_rank`."""

    ft_steps: int = 0
    ft_lr: float = 1e-4
    ft_phases: str = "uv"
    ft_batch: int = 1
    ft_mode: str = "direct"
    ft_rank: int = 8

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.ft_steps < 0:
            raise ConfigError(f"ft_steps must be >= 0, got {self.ft_steps}")
        _ = self.finetune_config  # validates the other ft_* options

    @property
    def finetune_config(self) -> FinetuneConfig | None:
        """The fine-tuning these options describe (None: `ft_steps=0`, off)."""
        if not self.ft_steps:
            return None
        return FinetuneConfig(steps=self.ft_steps, lr=self.ft_lr, phases=self.ft_phases, batch_size=self.ft_batch,
                              mode=self.ft_mode, lora_rank=self.ft_rank)


@dataclass
class SVDLLMFT(FinetuneOptions, SVDLLM):
    """SVD-LLM whitening, then the sequential low-rank update (SVD-LLM's ICLR version)."""

    ft_steps: int = 64
    name = "svdllm-ft"


@dataclass
class AdaSVDFT(FinetuneOptions, AdaSVD):
    """AdaSVD (adaComp + adaCR), then the sequential low-rank update."""

    ft_steps: int = 64
    name = "adasvd-ft"
