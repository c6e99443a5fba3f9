"""Gradient statistics of the decoder-block linears, computed block by block on the compute device so that
only one block is resident: FWSVD's Fisher row importance (squared weight gradients of the LM loss) and
K-FAC's output-side Gram matrices (outer products of the gradients at each linear's output).

Reverse mode, decomposed over blocks: a forward pass stores every block's input for a chunk of windows;
the loss gradient at the last block's output comes from the model's own head (the blocks replayed); then
each block, from the last to the first, is taken onto the device once and back-propagates every window
on its own (the Fisher needs per-window gradients), passing the input gradient down. With several
processes each rank takes its share of the windows and the sums are all-reduced in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import Blocks
from .dist import progress_bar, together, world
from .engine import Stream, _first_only, capture, replayed
from .errors import ConfigError
from .layout import block_linears
from .linalg import NumericalError, accumulate_gram, check_finite

log = logging.getLogger(__name__)

LABELS = ("data", "model")  # next-token labels: the text's (empirical Fisher) or drawn from the model (its Fisher)


@dataclass
class _Sums:
    """What a backward pass accumulates: Fisher row sums and/or output-gradient Grams (None: not wanted), and
    the loss whose gradient is taken (per-window `mean` or `sum` over tokens; `labels` as in `LABELS`)."""

    rows: dict[str, torch.Tensor] | None = None
    grams: dict[str, torch.Tensor] | None = None
    reduction: str = "mean"
    labels: str = "data"


def _loss_gradient(blocks: Blocks, final: Stream, ids: list[torch.Tensor], windows: Sequence[int],
                   sums: _Sums) -> list[torch.Tensor]:
    """d(sum over windows of each window's next-token loss) / d(final hidden states), window by window.
    `windows` are the global indices of the windows: model-drawn labels are seeded by them, so the draw does not
    depend on how windows are shared between processes."""
    grads = []
    with torch.enable_grad(), blocks.head_on_device() as model, replayed(blocks, final.tuple_output) as first:
        for b, batch_ids in enumerate(ids):
            h = final.batch(b).detach().requires_grad_(True)
            first.value = h
            logits = model(batch_ids.to(blocks.device), use_cache=False).logits[:, :-1].float()
            if sums.labels == "data":
                targets = batch_ids[:, 1:].to(blocks.device)
            else:
                gen = torch.Generator(device=logits.device).manual_seed(int(windows[b]))
                probs = logits.detach().softmax(-1).reshape(-1, logits.shape[-1])
                targets = torch.multinomial(probs, 1, generator=gen).reshape(logits.shape[:-1])
            nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            nll = nll.mean(dim=1) if sums.reduction == "mean" else nll.sum(dim=1)
            if not torch.isfinite(nll).all():
                raise NumericalError(f"the model's calibration loss is not finite on window {windows[b]}")
            (grad,) = torch.autograd.grad(nll.sum(), h)
            grads.append(grad.to(final.store))
    return grads


def fisher_row_importance(blocks: Blocks, calib: torch.Tensor, windows: int | None = None, chunk: int = 8,
                          progress: bool = True) -> dict[str, torch.Tensor]:
    """`I_i = sum over windows of sum_j (dL_w/dW_ij)^2` for every block linear (rows = outputs), float64 on the
    device; `L_w` is the mean next-token loss of window `w`. `chunk` windows are processed per round."""
    layout = blocks.layout
    rows = {layout.full(i, name): torch.zeros(m, dtype=torch.float64, device=blocks.device)
            for i, block in enumerate(layout.linears) for name, (m, _) in block.items()}
    _gradient_pass(blocks, calib, windows, chunk, _Sums(rows=rows), "fisher", progress)
    for t in rows.values():
        world().all_reduce(t)
    return rows


def output_gradient_grams(blocks: Blocks, calib: torch.Tensor, windows: int | None = None, labels: str = "data",
                          chunk: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    """K-FAC's output-side factor of every block linear: `G = sum_t g_t g_t^T` (`m x m`, float64, on the host),
    `g_t` the gradient of the window's summed next-token loss with respect to that linear's output at token `t`,
    summed over the first `windows` calibration windows (None: all).

    `labels="data"` uses the text's next tokens (the empirical Fisher); `labels="model"` draws each label from
    the model's own prediction (seeded by the window's index), whose expectation is the Fisher of the model's
    distribution: the curvature of the KL divergence from the dense model. Only activation gradients are
    formed, never weight gradients. Host memory: `8 m^2` bytes per linear (about 1.4 GB for SmolLM2-135M).
    """
    if labels not in LABELS:
        raise ConfigError(f"labels must be one of {LABELS}, got {labels!r}")
    layout = blocks.layout
    grams = {layout.full(i, name): torch.zeros(m, m, dtype=torch.float64)
             for i, block in enumerate(layout.linears) for name, (m, _) in block.items()}
    _gradient_pass(blocks, calib, windows, chunk, _Sums(grams=grams, reduction="sum", labels=labels),
                   "output gradients", progress)
    w = world()
    for name, g in grams.items():
        if w.active:  # the collective runs where the process group's backend wants its tensors
            g.copy_(w.all_reduce(g.to(blocks.device)).cpu())
        check_finite(g, f"output-gradient Gram matrix of {name}")
    return grams


def _gradient_pass(blocks: Blocks, calib: torch.Tensor, windows: int | None, chunk: int, sums: _Sums, desc: str,
                   progress: bool) -> None:
    """This rank's share of the first `windows` windows through `_rounds`, with a progress bar."""
    calib = calib if windows is None else calib[:windows]
    if calib.shape[0] < 1:
        raise ConfigError("a gradient pass needs at least one calibration window")
    index = list(range(calib.shape[0]))
    w = world()
    if w.active:  # per-window sums: each rank takes its share of the windows, the sums are added up at the end
        index = w.shard(calib.shape[0])
        calib = calib[index]
    n = len(blocks)
    rounds = range(0, calib.shape[0], chunk)
    bar = progress_bar(total=len(rounds) * 2 * n, desc=desc, unit="block", disable=not progress)
    with together(f"computing {desc}"):
        _rounds(blocks, calib, index, rounds, chunk, sums, bar)
    bar.close()


def _rounds(blocks: Blocks, calib: torch.Tensor, index: list[int], rounds: range, chunk: int, sums: _Sums,
            bar) -> None:
    """This rank's windows, `chunk` at a time: forward storing each block's inputs, then back-propagation."""
    n = len(blocks)
    for start in rounds:
        ids = calib[start : start + chunk]
        x = capture(blocks, ids, 1, shard=False)  # one window per batch: per-window gradients
        inputs = []
        with torch.no_grad():
            for i in range(n):
                inputs.append(x)
                with blocks.on_device(i) as block:
                    x = x.run(block)
                bar.update()
        grad = _loss_gradient(blocks, x, [ids[b : b + 1] for b in range(ids.shape[0])],
                              index[start : start + chunk], sums)
        for i in reversed(range(n)):
            grad = _block_backward(blocks, i, inputs[i], grad, sums)
            inputs[i] = None
            bar.update()


def _block_backward(blocks: Blocks, i: int, x: Stream, grad_out: list[torch.Tensor], sums: _Sums
                    ) -> list[torch.Tensor]:
    """Back-propagate each window through block `i`; add its squared weight-gradient row sums and/or its
    output-gradient Grams; return the gradients at the block's input."""
    grad_in = []
    with blocks.on_device(i) as block, torch.enable_grad():
        linears = block_linears(block)
        full = {name: blocks.layout.full(i, name) for name in linears}
        saved = {name: p.requires_grad for name, p in block.named_parameters()}
        for p in block.parameters():
            p.requires_grad_(False)
        if sums.rows is not None:
            for m in linears.values():
                m.weight.requires_grad_(True)
        local = {}  # this block's Grams, accumulated on the device
        handles = []
        if sums.grams is not None:
            local = {name: torch.zeros_like(sums.grams[full[name]], device=blocks.device) for name in linears}

            def on_output(name: str):
                def hook(_module, _args, out):
                    if out.requires_grad:
                        out.register_hook(lambda g: accumulate_gram(local[name], g.detach()))

                return hook

            handles = [m.register_forward_hook(on_output(name)) for name, m in linears.items()]
        try:
            for b in range(len(x)):
                h = x.batch(b).detach().requires_grad_(True)
                extra = _first_only(x.extra, h.shape[0], b)
                y = block(h, *extra.args[0], **extra.kwargs[0])
                y = y[0] if isinstance(y, (tuple, list)) else y
                params = [m.weight for m in linears.values()] if sums.rows is not None else []
                grads = torch.autograd.grad(y, [h, *params], grad_outputs=grad_out[b].to(y.device, y.dtype))
                grad_in.append(grads[0].to(x.store))
                if sums.rows is not None:
                    for (name, m), g in zip(linears.items(), grads[1:], strict=True):
                        g = g if isinstance(m, nn.Linear) else g.t()  # Conv1D stores the weight transposed
                        sums.rows[full[name]] += (g.double() ** 2).sum(dim=1)
        finally:
            for handle in handles:
                handle.remove()
            for name, p in block.named_parameters():
                p.requires_grad_(saved[name])
        for name, g in local.items():
            sums.grams[full[name]] += g.cpu()
    return grad_in
