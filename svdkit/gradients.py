"""Gradient statistics of the decoder-block linears, computed block by block on the compute device so that
only one block is resident: FWSVD's Fisher row importance (squared weight gradients of the LM loss) and the
loss gradients at every block's output, from which K-FAC's output-side Grams are computed block by block
(`svdkit.output_grams`).

Reverse mode, decomposed over blocks: a forward pass writes every block's input to a spill folder on disk;
the loss gradient at the last block's output comes from the model's own head (the blocks replayed); then
each block, from the last to the first, is taken onto the device once, its inputs read back, and every window
back-propagated on its own (the Fisher needs per-window gradients), passing the input gradient down. The
gradient arriving at a block's output can be handed over (`_Sums.outputs`) as it goes, so host memory holds one
block's activations, never the model's depth of them. With several processes each rank takes its share of the
windows (sums are all-reduced in float64 by the caller).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._fs import check_space
from .allocation.base import LABELS
from .blocks import Blocks
from .dist import progress_bar, together, world
from .errors import ConfigError
from .layout import block_linears
from .linalg import NumericalError, accumulate_gram, no_tf32
from .parking import Parking
from .stream import Stream, capture, first_only, replayed

log = logging.getLogger(__name__)

GradientSink = Callable[[int, list[torch.Tensor]], None]  # (block, the loss gradient at its output, per window)
GramSink = Callable[[int, dict[str, torch.Tensor]], None]  # (block, its output-gradient Grams by full linear name)


@dataclass
class _Sums:
    """What a backward pass accumulates: Fisher row sums (None: not wanted), the gradients at each block's output
    handed to `outputs` (None: not wanted), output-gradient Grams (`grams`: one `m x m` float64 accumulator per
    linear of the block, filled by `block_backward`), each block's Grams handed to `block_grams` as the pass
    leaves the block (None: not wanted), and the loss whose gradient is taken (per-window `mean` or `sum` over
    tokens; `labels` as in `LABELS`)."""

    rows: dict[str, torch.Tensor] | None = None
    outputs: GradientSink | None = None
    grams: dict[str, torch.Tensor] | None = None
    block_grams: GramSink | None = None
    reduction: str = "mean"
    labels: str = "data"


class _Spill:
    """The block inputs of one gradient pass, parked on disk block by block (`svdkit.parking.Parking`, under
    `parent`, default the system's temporary folder) and each read back once when its block's backward runs."""

    def __init__(self, parent: Path | None) -> None:
        self._park = Parking(parent)
        self._meta: dict[int, Stream] = {}

    def put(self, i: int, x: Stream) -> None:
        self._park.put(str(i), x.hidden)
        self._meta[i] = Stream([], x.extra, x.device, x.store, x.tuple_output)

    def take(self, i: int) -> Stream:
        meta = self._meta.pop(i)
        hidden = [t.to(meta.store) for t in self._park.take(str(i))]
        return Stream(hidden, meta.extra, meta.device, meta.store, meta.tuple_output)

    def close(self) -> None:
        self._park.close()


def model_labels(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """Next-token labels drawn from the model's own distribution (`batch x seq x vocab` logits -> `batch x seq`),
    on the host with a host generator seeded by `seed`: the same labels whatever device computed the logits."""
    probs = logits.float().softmax(-1).reshape(-1, logits.shape[-1]).cpu()
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(probs, 1, generator=gen).reshape(logits.shape[:-1])


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
                targets = model_labels(logits.detach(), int(windows[b])).to(blocks.device)
            nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            nll = nll.mean(dim=1) if sums.reduction == "mean" else nll.sum(dim=1)
            if not torch.isfinite(nll).all():
                raise NumericalError(f"the model's calibration loss is not finite on window {windows[b]}")
            (grad,) = torch.autograd.grad(nll.sum(), h)
            grads.append(grad.to(final.store))
    return grads


def fisher_row_importance(blocks: Blocks, calib: torch.Tensor, fisher_samples: int | None = None,
                          progress: bool = True, spill: Path | None = None) -> dict[str, torch.Tensor]:
    """`I_i = sum over windows of sum_j (dL_w/dW_ij)^2` for every block linear (rows = outputs), float64 on the
    device; `L_w` is the mean next-token loss of window `w`, over the first `fisher_samples` windows (None: all).
    Block inputs are spilled under `spill`."""
    layout = blocks.layout
    rows = {layout.full(i, name): torch.zeros(m, dtype=torch.float64, device=blocks.device)
            for i, block in enumerate(layout.linears) for name, (m, _) in block.items()}
    _gradient_pass(blocks, calib, fisher_samples, _Sums(rows=rows), "fisher", progress, spill)
    for t in rows.values():
        world().all_reduce(t)
    return rows


def block_output_gradients(blocks: Blocks, calib: torch.Tensor, sink: GradientSink, grad_samples: int | None = None,
                           labels: str = "data", progress: bool = True, spill: Path | None = None) -> None:
    """`sink(i, grads)` for every block, last block first: the gradient of each window's summed next-token loss
    with respect to block `i`'s output (one `1 x seq x width` tensor per window of this rank's share of the first
    `grad_samples` calibration windows, None: all). These are what K-FAC's output-side Grams are computed from,
    block by block (`svdkit.output_grams`): `width` numbers per token and block, where the Grams take `m^2`
    per linear.

    `labels="data"` uses the text's next tokens (the empirical Fisher); `labels="model"` draws each label from
    the model's own prediction (seeded by the window's index), whose expectation is the Fisher of the model's
    distribution: the curvature of the KL divergence from the dense model. Only activation gradients are
    formed, never weight gradients. Block inputs are spilled to a scratch folder under `spill` (default: the
    system's temporary folder).
    """
    if labels not in LABELS:
        raise ConfigError(f"labels must be one of {LABELS}, got {labels!r}")
    _gradient_pass(blocks, calib, grad_samples, _Sums(outputs=sink, reduction="sum", labels=labels), "output gradients",
                   progress, spill)


def block_output_grams(blocks: Blocks, calib: torch.Tensor, sink: GramSink, grad_samples: int | None = None,
                       labels: str = "data", progress: bool = True, spill: Path | None = None) -> None:
    """`sink(i, grams)` for every block, last block first: the output-gradient Grams of block `i`'s linears
    (float64, by full name, this rank's share of the windows, not yet summed over ranks), computed by the pass's
    own backward: the Grams `block_output_gradients`' gradients give, without a second backward. Worth it
    where a block's Grams take less room than its gradients (`m^2` per linear against `tokens x width`)."""
    if labels not in LABELS:
        raise ConfigError(f"labels must be one of {LABELS}, got {labels!r}")
    _gradient_pass(blocks, calib, grad_samples, _Sums(block_grams=sink, reduction="sum", labels=labels),
                   "output-gradient Grams", progress, spill)


def spill_bytes(blocks: Blocks, tokens: int) -> int:
    """Disk a gradient pass over `tokens` calibration tokens spills: every block's input, held at once at most."""
    width = int(blocks.model.config.get_text_config().hidden_size)
    return len(blocks) * tokens * width * blocks.compute_dtype.itemsize


def _gradient_pass(blocks: Blocks, calib: torch.Tensor, samples: int | None, sums: _Sums, desc: str,
                   progress: bool, spill: Path | None) -> None:
    """This rank's share of the first `samples` windows (None: all): forward with every block's input spilled, then
    back-propagation block by block, with a progress bar."""
    calib = calib if samples is None else calib[:samples]
    if calib.shape[0] < 1:
        raise ConfigError("a gradient pass needs at least one calibration window")
    index = list(range(calib.shape[0]))
    w = world()
    if w.active:  # per-window sums: each rank takes its share of the windows, the sums are added up at the end
        index = w.shard(calib.shape[0])
        calib = calib[index]
    n = len(blocks)
    spilled = spill_bytes(blocks, calib.numel())
    bar = progress_bar(total=2 * n, desc=desc, unit="block", disable=not progress)
    inputs = _Spill(spill)
    try:
        # every collective (the Grams' all-reduce) lies between these rank-local steps, never inside one
        with together(f"computing {desc} (forward pass)"):
            check_space(Path(spill or tempfile.gettempdir()), spilled, f"the {desc} pass's spilled block inputs")
            x = capture(blocks, calib, 1, shard=False)  # one window per batch: per-window gradients
            with torch.no_grad():
                for i in range(n):
                    inputs.put(i, x)
                    with blocks.on_device(i) as block:
                        x = x.run(block)
                    bar.update()
            grad = _loss_gradient(blocks, x, [calib[b : b + 1] for b in range(calib.shape[0])], index, sums)
            del x
        for i in reversed(range(n)):
            with together(f"computing {desc} (block {i})"):
                grad = _backward_step(blocks, i, inputs.take(i), grad, sums)
            bar.update()
    finally:
        inputs.close()
        bar.close()


def gram_accumulators(layout, i: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeroed float64 `m x m` output-gradient Gram accumulators of block `i`'s linears, by full name."""
    return {layout.full(i, name): torch.zeros(m, m, dtype=torch.float64, device=device)
            for name, (m, _) in layout.linears[i].items()}


def _backward_step(blocks: Blocks, i: int, x: Stream, grad: list[torch.Tensor], sums: _Sums) -> list[torch.Tensor]:
    """Block `i` of a gradient pass: hand over the gradient at its output and/or its Grams, return the gradient at
    its input."""
    if sums.outputs is not None:
        sums.outputs(i, grad)
    if sums.block_grams is not None:
        sums.grams = gram_accumulators(blocks.layout, i, blocks.device)
    with blocks.on_device(i) as block:
        grad = block_backward(block, blocks.layout, i, x, grad, sums)
    if sums.block_grams is not None:
        sums.block_grams(i, sums.grams)
        sums.grams = None
    return grad


def block_backward(block: nn.Module, layout, i: int, x: Stream, grad_out: list[torch.Tensor], sums: _Sums,
                   outputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Back-propagate each window through block `i` (on the compute device); add its squared weight-gradient row
    sums (`sums.rows`) and its output-gradient Grams (`sums.grams`, by full linear name: this rank's windows,
    full precision, TF32 off); return the gradients at the block's input. The block's outputs, which the
    backward's forward computes anyway, are appended to `outputs` (on `x.store`) when it is given."""
    grad_in = []
    with torch.enable_grad(), no_tf32():
        linears = block_linears(block)
        full = {name: layout.full(i, name) for name in linears}
        saved = {name: p.requires_grad for name, p in block.named_parameters()}
        for p in block.parameters():
            p.requires_grad_(False)
        if sums.rows is not None:
            for m in linears.values():
                m.weight.requires_grad_(True)
        handles = []
        if sums.grams is not None:
            local = sums.grams

            def on_output(name: str):
                def hook(_module, _args, out):
                    if out.requires_grad:
                        out.register_hook(lambda g: accumulate_gram(local[full[name]], g.detach()))

                return hook

            handles = [m.register_forward_hook(on_output(name)) for name, m in linears.items()]
        try:
            for b in range(len(x)):
                h = x.batch(b).detach().requires_grad_(True)
                extra = first_only(x.extra, h.shape[0], b)
                y = block(h, *extra.args[0], **extra.kwargs[0])
                y = y[0] if isinstance(y, (tuple, list)) else y
                if outputs is not None:
                    outputs.append(y.detach().to(x.store))
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
    return grad_in
