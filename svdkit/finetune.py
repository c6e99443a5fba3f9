"""SVD-LLM's sequential low-rank update (its ICLR version): fine-tune the factors of an already-compressed
model on next-token loss, first every `W_u` with every `W_v` frozen, then every `W_v` with `W_u` frozen.

The block-wise variant, which holds one block at a time, is block-local refinement (`svdkit.refine`).

Works on an in-memory model whose compressed linears are `LowRankLinear`; nothing else is trained (norms,
embeddings, dense linears and biases stay frozen), so ranks and parameter counts are unchanged. Training runs
in float32 (a half-precision model is cast for the run and back after it: frozen tensors round-trip exactly).
Training text must come from a training split (svdkit uses the calibration windows, drawn from `train`).
One process only: several processes would each need the whole model and a gradient all-reduce.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

import torch
from torch import nn
from torch.nn.utils import parametrize

from .blocks import move_module
from .dist import progress_bar, world
from .errors import ConfigError
from .linalg import NumericalError
from .methods.finetune import MODES, FinetuneConfig
from .modules import LowRankLinear, column_major
from .stream import model_device

log = logging.getLogger(__name__)

__all__ = ["MODES", "FinetuneConfig", "finetune", "loss_change", "low_rank_layers", "window_loss"]


class _LoRA(nn.Module):
    """A parametrization `W -> W + scale * B A` with `B = 0` at the start (the model is unchanged)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        r = min(rank, out_f, in_f)
        a = torch.randn(r, in_f, generator=generator, dtype=torch.float32) / math.sqrt(in_f)
        self.a = nn.Parameter(a.to(weight))
        self.b = nn.Parameter(torch.zeros(out_f, r, dtype=weight.dtype, device=weight.device))
        self.scale = alpha / r

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.b @ self.a)


def low_rank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """Every `LowRankLinear` of the model, by its full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def lr_multiplier(step: int, steps: int, warmup: float) -> float:
    """Multiplier of the base learning rate: linear warm-up, then cosine decay to 0 at the last step."""
    w = int(round(warmup * steps))
    if step < w:
        return (step + 1) / (w + 1)
    span = max(steps - w, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / span))


@torch.no_grad()
def window_loss(model: nn.Module, data: torch.Tensor, batch_size: int = 1) -> float:
    """Mean next-token loss over windows (every window has the same length, so a mean of means)."""
    device = model_device(model)
    total = 0.0
    for i in range(0, data.shape[0], batch_size):
        ids = data[i : i + batch_size].to(device)
        total += float(model(ids, labels=ids, use_cache=False).loss) * ids.shape[0]
    return total / data.shape[0]


def _check(model: nn.Module, data: torch.Tensor) -> None:
    if world().active:
        raise ConfigError("fine-tuning runs in one process (it trains the whole model): run it without torchrun "
                          "or --nproc")
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype != torch.long or data.shape[1] < 2:
        raise ConfigError("fine-tuning data must be a (n, seqlen >= 2) LongTensor of token ids")
    if not low_rank_layers(model):
        raise ConfigError("the model has no LowRankLinear to fine-tune: compress it first")


@torch.enable_grad()
def finetune(model: nn.Module, data: torch.Tensor, config: FinetuneConfig | None = None, *,
             progress: bool = True) -> dict:
    """Fine-tune the low-rank factors of `model` in place, where it is, one phase per letter of `config.phases`
    (`u`: every `W_u`, `v`: every `W_v`), on the token windows `data` (n x seqlen); returns a report.

    Only the phase's factor tensors (or their LoRA adapters) receive gradients: the other factor, and
    everything else, stays bit-identical. Windows are visited in a seeded random order, cycling if needed.
    """
    cfg = config or FinetuneConfig()
    _check(model, data)
    device = model_device(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()  # no dropout: the factors are the only thing that changes
    gen = torch.Generator().manual_seed(cfg.seed)
    report = {"config": asdict(cfg), "windows": data.shape[0], "seqlen": data.shape[1], "phases": []}
    start = time.perf_counter()
    if dtype != torch.float32:
        move_module(model, device, torch.float32)
    try:
        layers = low_rank_layers(model)
        for phase in cfg.phases:
            report["phases"].append(_phase(model, layers, phase, data, cfg, gen, device, progress))
    finally:
        if dtype != torch.float32:
            move_module(model, device, dtype)
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
        model.train(was_training)
    report["seconds"] = time.perf_counter() - start
    return report


def _phase(model: nn.Module, layers: dict[str, LowRankLinear], phase: str, data: torch.Tensor,
           cfg: FinetuneConfig, gen: torch.Generator, device: torch.device, progress: bool) -> dict:
    """One phase: train factor `phase` of every low-rank layer for `cfg.steps` steps."""
    t0 = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [getattr(layer, phase) for layer in layers.values()]  # the nn.Linear holding W_u or W_v
    if cfg.mode == "lora":
        for mod in targets:
            parametrize.register_parametrization(mod, "weight", _LoRA(mod.weight, cfg.lora_rank, cfg.lora_alpha, gen))
            mod.parametrizations.weight.original.requires_grad_(False)
        params = [p for mod in targets for p in mod.parametrizations.weight[0].parameters()]
    else:
        params = [mod.weight for mod in targets]
    for p in params:
        p.requires_grad_(True)
    track = data[: cfg.track_windows]
    before = window_loss(model, track) if cfg.track_windows else None
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg.steps, cfg.warmup))
    order: list[int] = []
    losses = []
    bar = progress_bar(range(cfg.steps), desc=f"fine-tune W_{phase} ({cfg.mode})", unit="step", disable=not progress)
    try:
        for _ in bar:
            if len(order) < cfg.batch_size:
                order += torch.randperm(data.shape[0], generator=gen).tolist()
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            ids = data[idx].to(device)
            loss = model(ids, labels=ids, use_cache=False).loss
            losses.append(_step(loss, opt, sched, params, cfg.max_grad_norm, f"training loss in phase {phase}"))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if cfg.mode == "lora":
            with torch.no_grad():
                for mod in targets:  # merge: the factor keeps its shape, the adapter disappears
                    parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
                    if phase == "u":
                        column_major(mod)  # the layout LowRankLinear keeps W_u in
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
    after = window_loss(model, track) if cfg.track_windows else None
    n_params = sum(p.numel() for p in params)
    out = {"phase": phase, "steps": cfg.steps, "trainable_parameters": n_params, "losses": losses,
           "loss_before": before, "loss_after": after, "seconds": time.perf_counter() - t0}
    log.info("fine-tuned W_%s (%s, %d trainable parameters): %s over %d steps in %.0f s", phase, cfg.mode,
             n_params, loss_change(losses, before, after), cfg.steps, out["seconds"])
    return out


def loss_change(losses: list[float], before: float | None = None, after: float | None = None) -> str:
    """How the loss moved, in words for the log: on the tracked windows when there are any, else the mean of the
    first and of the last (up to) 8 steps, so both sides average the same number of random batches."""
    if before is not None and after is not None:
        return f"loss on the tracked windows {before:.3f} -> {after:.3f}"
    k = max(1, min(8, len(losses) // 2))
    return f"mean training loss of the first / last {k} steps {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f}"


def _step(loss: torch.Tensor, opt, sched, params, max_grad_norm: float, what: str) -> float:
    """One optimizer step on `loss` (refused when it is not finite), gradients clipped; returns the loss."""
    if not torch.isfinite(loss):
        raise NumericalError(f"non-finite {what}; lower the learning rate")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()
    return float(loss.detach())
