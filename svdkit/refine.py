"""Block-local refinement: right after a block's matrices are factorized, train its low-rank factors so that the
compressed block reproduces what the dense block outputs, with only that block on the device.

End-to-end fine-tuning (`svdkit.finetune`) needs the whole compressed model in memory; this needs one block and
one block's activations, so it runs inside the compression walk at any depth, and with several processes. The
walk hands over the block's inputs and the dense block's outputs on them (computed before the factorization
replaced its matrices):

- `target="stream"`: the inputs are the compressed stream (what the block will see in the compressed model), the
  targets the dense block's outputs on those inputs: the block learns to undo its own truncation error;
- `target="anchored"`: the dense model's inputs and outputs (AA-SVD's anchoring): the block learns the dense
  block's map where the dense model goes.

With `correct=c`, the stream target moves a fraction `c` of the way to the dense model's outputs: at 1 the block
learns to undo the error of every compressed block up to and including itself, as end-to-end fine-tuning does for
the whole model.

Loss: `relative` (squared error over the targets' squared norm, so every block trains alike), `token` (each
token's squared error over its own target's squared norm, averaged: where one token carries most of the hidden
state's norm, as an attention sink does in SmolLM2's blocks 11-27, it does not drown the others), `mse`, or
`fisher`: the error `e` measured as `e^T G e`, `G` the Gram of the loss gradients at the block's output (the
output-side K-FAC statistic of the block's last linear that writes the hidden size, an MLP's down projection),
over the targets' squared norm in the same metric. To second order that is what the error costs the model's loss,
so directions the later blocks ignore weigh little.

The factors `W_u`, `W_v` of every `LowRankLinear` in the block train together with AdamW (warm-up, then cosine
decay); `norms=True` trains the block's norm weights too. A block whose objective (over all its windows) ends
higher than it started gets its factors back as they were (`kept: false` in the report), or, with `retries`, is
trained again from them at a quarter of the learning rate. Every step takes the same windows on every rank (a
seeded draw of the global window indices): each rank adds its share, the gradients are all-reduced, and every
rank takes the same step, so one process and several give the same factors up to summation order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch
from torch import nn

from .blocks import move_module
from .dist import progress_bar, world
from .finetune import lr_multiplier
from .linalg import NumericalError, check_finite
from .methods.kfac import output_whitener
from .methods.refine import BACKOFF, FISHER_DAMPING, RefineConfig
from .modules import LowRankLinear
from .stream import Stream, first_only

log = logging.getLogger(__name__)


def metric_root(gram: torch.Tensor, damping: float = FISHER_DAMPING) -> torch.Tensor:
    """`P` (float32) with `P P^T = G + damping * mean(diag G) * I`, so that `||e P||^2` is `e`'s squared size in
    the damped metric `G`: K-FAC's damped output whitener (`kfac.output_whitener`) as a dense matrix."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"a metric must be a square matrix, got shape {tuple(gram.shape)}")
    check_finite(gram, "the loss-gradient Gram of a block's output")
    if not float(gram.double().diagonal().mean()) > 0:
        raise NumericalError("the loss-gradient Gram of a block's output is zero: no metric for rf_loss=fisher")
    root = output_whitener(gram, damping)  # a damped copy: `gram` is left as it is
    return root.right(torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)).float()


def trainable(block: nn.Module, norms: bool) -> list[nn.Parameter]:
    """What refinement trains: the factors of every `LowRankLinear` (not their biases), and the norm weights."""
    params = [p for m in block.modules() if isinstance(m, LowRankLinear) for p in (m.u.weight, m.v.weight)]
    if norms:
        params += [m.weight for m in block.modules()
                   if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter)]
    return params


class _Windows:
    """One block's training pairs on this rank, from one or more segments (the calibration windows, then any
    training-only ones), each a stream of inputs with a target per batch; and the block's other arguments for a
    batch of any size (every window has the same length and positions). Windows have global ids: segment by
    segment, a segment's window `j` on rank `r` is `offset + r + j * size` (what `capture` gives each rank), so
    one process and several number the same windows alike."""

    def __init__(self, segments: list[tuple[Stream, list[torch.Tensor]]], root: torch.Tensor | None = None) -> None:
        w = world()
        self.stream, self.root = segments[0][0], root  # `root`: the `fisher` loss's metric root (`metric_root`)
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # local window -> (input, target), stored rows
        ids: list[int] = []
        offset = 0
        for stream, targets in segments:
            pairs = [(x[o], targets[b][o]) for b, x in enumerate(stream.hidden) for o in range(x.shape[0])]
            ids += [offset + w.rank + j * w.size for j in range(len(pairs))]
            self.rows += pairs
            offset += int(w.sum([len(pairs)])[0]) if w.active else len(pairs)
        self.local, self.total = len(self.rows), offset
        self.index = {g: j for j, g in enumerate(ids)}

    def _rows(self, local: list[int], which: int) -> torch.Tensor:
        return torch.stack([self.rows[j][which] for j in local]).to(self.stream.device, torch.float32)

    def mine(self, global_ids: list[int]) -> list[int]:
        """This rank's local indices of the global windows `global_ids`, in their order."""
        return [self.index[g] for g in global_ids if g in self.index]

    def sums(self, block: nn.Module, local: list[int], loss: str) -> tuple[torch.Tensor, float]:
        """`sum ||y - t||^2` over the windows (with autograd) and its normaliser's share on this rank: the targets'
        squared norm (`relative`) or their number of elements (`mse`); for `token`, the sum over tokens of each
        token's squared error over its target's squared norm, and the number of tokens; for `fisher`, the error's
        and the targets' squared sizes in the metric."""
        if not local:
            return torch.zeros((), device=self.stream.device), 0.0
        x, t = self._rows(local, 0), self._rows(local, 1)
        extra = first_only(self.stream.extra, len(local))
        y = block(x, *extra.args[0], **extra.kwargs[0])
        y = y[0] if isinstance(y, (tuple, list)) else y
        if loss == "fisher":
            return (((y.float() - t) @ self.root) ** 2).sum(), float(((t @ self.root).double() ** 2).sum())
        err = (y.float() - t) ** 2
        if loss == "token":  # every token's error relative to its own target: a massive-activation token counts once
            scale = (t**2).sum(-1)
            return (err.sum(-1) / scale.clamp_min(1e-12 * float(scale.mean()) + 1e-30)).sum(), float(scale.numel())
        norm = float((t.double() ** 2).sum()) if loss == "relative" else float(t.numel())
        return err.sum(), norm


class BlockRefiner:
    """Refines each block the compression walk hands over (`fit`) and keeps a report of it."""

    def __init__(self, config: RefineConfig, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.blocks: list[dict] = []
        self.seconds = 0.0
        self.windows = 0  # the windows each block trained on (all ranks)
        self.metrics: dict[int, torch.Tensor] = {}  # block -> its output's loss-gradient Gram (`fisher` loss)

    def set_metric(self, i: int, gram: torch.Tensor) -> None:
        """Block `i`'s output loss-gradient Gram, for the `fisher` loss (taken by `fit`). A copy: the
        factorization damps the block's Grams in place."""
        self.metrics[i] = gram.detach().to("cpu", torch.float64, copy=True)

    @property
    def target(self) -> str:
        return self.config.target

    def report(self) -> dict:
        return {"config": asdict(self.config), "windows": self.windows, "seconds": self.seconds, "blocks": self.blocks}

    def objective(self, block: nn.Module, data: _Windows) -> float:
        """The training objective over every window (all ranks), without gradients."""
        w = world()
        num, den = 0.0, 0.0
        with torch.no_grad():
            for start in range(0, data.local, self.config.batch):
                s, n = data.sums(block, list(range(start, min(start + self.config.batch, data.local))),
                                 self.config.loss)
                num, den = num + float(s), den + n
        num, den = w.sum([num, den]) if w.active else (num, den)
        return num / den if den > 0 else float("nan")

    @torch.enable_grad()
    def fit(self, i: int, block: nn.Module, segments: list[tuple[Stream, list[torch.Tensor]]]) -> None:
        """Train block `i` (compressed, on the compute device) in float32 towards each segment's targets (one
        tensor per batch of its stream) on that stream's inputs."""
        cfg, t0 = self.config, time.perf_counter()
        params = trainable(block, cfg.norms)
        if not params:
            return  # nothing low-rank in this block (kept dense)
        dtype = params[0].dtype
        device = params[0].device
        if dtype != torch.float32:
            move_module(block, device, torch.float32)
            params = trainable(block, cfg.norms)
        saved = {n: p.requires_grad for n, p in block.named_parameters()}
        root = None
        if cfg.loss == "fisher":
            if i not in self.metrics:
                raise RuntimeError(f"svdkit bug: rf_loss=fisher without the output Gram of block {i}")
            root = metric_root(self.metrics.pop(i)).to(device)
        data = _Windows(segments, root)
        try:
            for p in block.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            before = self.objective(block, data)
            start = [p.detach().clone() for p in params]
            lr = cfg.lr
            for attempt in range(cfg.retries + 1):
                losses = self._train(i, block, params, data, lr)
                after = self.objective(block, data)
                kept = after < before
                if kept:
                    break
                with torch.no_grad():  # worse on its own objective (a learning rate too high): undo, maybe retry
                    for p, p0 in zip(params, start, strict=True):
                        p.copy_(p0)
                if attempt < cfg.retries:
                    lr *= BACKOFF
        finally:
            for n, p in block.named_parameters():
                p.requires_grad_(saved[n])
                p.grad = None
            if dtype != torch.float32:
                move_module(block, device, dtype)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.windows = data.total
        self.blocks.append({"block": i, "objective_before": before, "objective_after": after, "kept": kept,
                            "first_loss": losses[0], "last_loss": losses[-1], "seconds": seconds, "lr": lr,
                            "attempts": attempt + 1})
        log.debug("refined block %d: objective %.4g -> %.4g in %.1f s", i, before, after, seconds)

    def _train(self, i: int, block: nn.Module, params: list[nn.Parameter], data: _Windows, lr: float) -> list[float]:
        cfg, w = self.config, world()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg.steps, cfg.warmup))
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)  # the same draw on every rank
        order: list[int] = []
        losses = []
        bar = progress_bar(range(cfg.steps), desc=f"refine block {i}", unit="step", leave=False,
                           disable=not self.progress)
        for _ in bar:
            if len(order) < cfg.batch:
                order += torch.randperm(data.total, generator=gen).tolist()
            ids, order = order[: cfg.batch], order[cfg.batch :]
            num, den = data.sums(block, data.mine(ids), cfg.loss)
            den = w.sum([den])[0] if w.active else den
            loss = num / den
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:  # a rank without windows in this batch has nothing to differentiate
                loss.backward()
            total = float(loss.detach())
            if w.active:
                total = w.sum([total])[0]
                for p in params:  # a rank without windows in this batch adds zeros
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    w.all_reduce(p.grad)
            if total != total or total in (float("inf"), float("-inf")):
                raise NumericalError(f"non-finite refinement loss in block {i}; lower rf_lr")
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4g}")
        return losses
