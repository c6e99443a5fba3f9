"""Fisher information of the decoder-block linears, for FWSVD: squared gradients of the LM loss, computed
block by block on the compute device so that only one block is resident.

Reverse mode, decomposed over blocks: a forward pass stores every block's input for a chunk of windows;
the loss gradient at the last block's output comes from the model's own head (the blocks replayed); then
each block, from the last to the first, is taken onto the device once and back-propagates every window
on its own (the Fisher needs per-window gradients), passing the input gradient down.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .blocks import Blocks
from .dist import progress_bar, together, world
from .engine import Stream, _first_only, capture, replayed
from .layout import block_linears
from .linalg import NumericalError

log = logging.getLogger(__name__)


def _loss_gradient(blocks: Blocks, final: Stream, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    """d(sum of per-window mean next-token losses) / d(final hidden states), batch by batch."""
    grads = []
    with torch.enable_grad(), blocks.head_on_device() as model, replayed(blocks, final.tuple_output) as first:
        for b, batch_ids in enumerate(ids):
            h = final.batch(b).detach().requires_grad_(True)
            first.value = h
            logits = model(batch_ids.to(blocks.device), use_cache=False).logits[:, :-1].float()
            targets = batch_ids[:, 1:].to(blocks.device)
            nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)
            if not torch.isfinite(nll).all():
                raise NumericalError(f"the model's calibration loss is not finite on window {b}")
            (grad,) = torch.autograd.grad(nll.sum(), h)
            grads.append(grad.to(final.store))
    return grads


def fisher_row_importance(blocks: Blocks, calib: torch.Tensor, windows: int | None = None, chunk: int = 8,
                          progress: bool = True) -> dict[str, torch.Tensor]:
    """`I_i = sum over windows of sum_j (dL_w/dW_ij)^2` for every block linear (rows = outputs), float64 on the
    device; `L_w` is the mean next-token loss of window `w`. `chunk` windows are processed per round."""
    layout = blocks.layout
    calib = calib if windows is None else calib[:windows]
    w = world()
    if w.active:  # per-window sums: each rank takes its share of the windows, the sums are added up at the end
        calib = calib[w.shard(calib.shape[0])]
    importance = {layout.full(i, name): torch.zeros(m, dtype=torch.float64, device=blocks.device)
                  for i, block in enumerate(layout.linears) for name, (m, _) in block.items()}
    n = len(blocks)
    rounds = range(0, calib.shape[0], chunk)
    bar = progress_bar(total=len(rounds) * 2 * n, desc="fisher", unit="block", disable=not progress)
    with together("computing Fisher sums"):
        _rounds(blocks, calib, rounds, chunk, importance, bar)
    bar.close()
    for t in importance.values():
        w.all_reduce(t)
    return importance


def _rounds(blocks: Blocks, calib: torch.Tensor, rounds: range, chunk: int, importance: dict, bar) -> None:
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
        grad = _loss_gradient(blocks, x, [ids[b : b + 1] for b in range(ids.shape[0])])
        for i in reversed(range(n)):
            grad = _block_backward(blocks, i, inputs[i], grad, importance)
            inputs[i] = None
            bar.update()


def _block_backward(blocks: Blocks, i: int, x: Stream, grad_out: list[torch.Tensor],
                    importance: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Back-propagate each window through block `i`; add its squared weight-gradient row sums; return the
    gradients at the block's input."""
    grad_in = []
    with blocks.on_device(i) as block, torch.enable_grad():
        linears = block_linears(block)
        saved = {name: p.requires_grad for name, p in block.named_parameters()}
        for p in block.parameters():
            p.requires_grad_(False)
        for m in linears.values():
            m.weight.requires_grad_(True)
        try:
            for b in range(len(x)):
                h = x.batch(b).detach().requires_grad_(True)
                extra = _first_only(x.extra, h.shape[0], b)
                y = block(h, *extra.args[0], **extra.kwargs[0])
                y = y[0] if isinstance(y, (tuple, list)) else y
                params = [m.weight for m in linears.values()]
                grads = torch.autograd.grad(y, [h, *params], grad_outputs=grad_out[b].to(y.device, y.dtype))
                grad_in.append(grads[0].to(x.store))
                for (name, m), g in zip(linears.items(), grads[1:], strict=True):
                    g = g if isinstance(m, nn.Linear) else g.t()  # Conv1D stores the weight transposed
                    importance[blocks.layout.full(i, name)] += (g.double() ** 2).sum(dim=1)
        finally:
            for name, p in block.named_parameters():
                p.requires_grad_(saved[name])
    return grad_in
