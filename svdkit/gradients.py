"""Gradient statistics of the decoder-block linears, computed block by block on the compute device so that
only one block is resident: FWSVD's Fisher row importance (squared weight gradients of the LM loss) and
K-FAC's output-side Gram matrices (outer products of the gradients at each linear's output).

Reverse mode, decomposed over blocks: a forward pass writes every block's input to a spill folder on disk;
the loss gradient at the last block's output comes from the model's own head (the blocks replayed); then
each block, from the last to the first, is taken onto the device once, its inputs read back, and every window
back-propagated on its own (the Fisher needs per-window gradients), passing the input gradient down. A block's
output-gradient Grams are complete when its backward ends and are handed over then (`sink`), so host memory
holds one block's activations and Grams, never the model's depth of them. With several processes each rank
takes its share of the windows and the sums are all-reduced in float64.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._fs import Scratch, check_space
from .blocks import Blocks
from .dist import progress_bar, together, world
from .engine import Stream, _first_only, capture, replayed
from .errors import ConfigError
from .layout import block_linears
from .linalg import NumericalError, accumulate_gram, check_finite, no_tf32

log = logging.getLogger(__name__)

LABELS = ("data", "model")  # next-token labels: the text's (empirical Fisher) or drawn from the model (its Fisher)
GramSink = Callable[[int, dict[str, torch.Tensor]], None]  # (block, {full linear name: its Gram on the host})


@dataclass
class _Sums:
    """What a backward pass accumulates: Fisher row sums (None: not wanted) and/or output-gradient Grams, handed
    block by block to `grams` (None: not wanted), and the loss whose gradient is taken (per-window `mean` or
    `sum` over tokens; `labels` as in `LABELS`)."""

    rows: dict[str, torch.Tensor] | None = None
    grams: GramSink | None = None
    reduction: str = "mean"
    labels: str = "data"


class _Spill:
    """The block inputs of one gradient pass, one safetensors file per block in a scratch folder (under
    `parent`, default the system's temporary folder), each read back once when its block's backward runs;
    removed at the end (and by the next pass, if this process is killed)."""

    def __init__(self, parent: Path | None) -> None:
        self._dir = Scratch("spill", parent)
        self._meta: dict[int, Stream] = {}

    def put(self, i: int, x: Stream) -> None:
        from safetensors.torch import save_file

        save_file({str(b): t.detach().cpu().contiguous() for b, t in enumerate(x.hidden)},
                  os.path.join(self._dir.path, f"{i}.safetensors"))
        self._meta[i] = Stream([], x.extra, x.device, x.store, x.tuple_output)

    def take(self, i: int) -> Stream:
        from safetensors.torch import load_file

        path = os.path.join(self._dir.path, f"{i}.safetensors")
        stored = load_file(path)
        os.remove(path)
        meta = self._meta.pop(i)
        hidden = [stored[str(b)].to(meta.store) for b in range(len(stored))]
        return Stream(hidden, meta.extra, meta.device, meta.store, meta.tuple_output)

    def close(self) -> None:
        self._dir.cleanup()


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


def fisher_row_importance(blocks: Blocks, calib: torch.Tensor, windows: int | None = None, progress: bool = True,
                          spill: Path | None = None) -> dict[str, torch.Tensor]:
    """`I_i = sum over windows of sum_j (dL_w/dW_ij)^2` for every block linear (rows = outputs), float64 on the
    device; `L_w` is the mean next-token loss of window `w`. Block inputs are spilled under `spill`."""
    layout = blocks.layout
    rows = {layout.full(i, name): torch.zeros(m, dtype=torch.float64, device=blocks.device)
            for i, block in enumerate(layout.linears) for name, (m, _) in block.items()}
    _gradient_pass(blocks, calib, windows, _Sums(rows=rows), "fisher", progress, spill)
    for t in rows.values():
        world().all_reduce(t)
    return rows


def output_gradient_grams(blocks: Blocks, calib: torch.Tensor, windows: int | None = None, labels: str = "data",
                          progress: bool = True, sink: GramSink | None = None, spill: Path | None = None
                          ) -> dict[str, torch.Tensor] | None:
    """K-FAC's output-side factor of every block linear: `G = sum_t g_t g_t^T` (`m x m`, float64, on the host),
    `g_t` the gradient of the window's summed next-token loss with respect to that linear's output at token `t`,
    summed over the first `windows` calibration windows (None: all).

    `labels="data"` uses the text's next tokens (the empirical Fisher); `labels="model"` draws each label from
    the model's own prediction (seeded by the window's index), whose expectation is the Fisher of the model's
    distribution: the curvature of the KL divergence from the dense model. Only activation gradients are
    formed, never weight gradients.

    With a `sink`, each block's Grams (`8 m^2` bytes per linear) go to `sink(block, grams)` as soon as that
    block's backward ends, last block first, and nothing is returned: a sink that writes them out keeps host
    memory at one block's Grams. Without one they are collected and returned (about 1.4 GB for SmolLM2-135M).
    Block inputs are spilled to a temporary folder under `spill` (default: the system's temporary folder).
    """
    if labels not in LABELS:
        raise ConfigError(f"labels must be one of {LABELS}, got {labels!r}")
    collected: dict[str, torch.Tensor] = {}
    w = world()

    def finish(i: int, grams: dict[str, torch.Tensor]) -> None:
        for g in grams.values():  # the collective runs where the process group's backend wants its tensors
            w.all_reduce(g)
        with together(f"storing the output-gradient Grams of block {i}"):  # e.g. a full disk on the writing rank
            for name, g in grams.items():
                check_finite(g, f"output-gradient Gram matrix of {name}")
                grams[name] = g.cpu()
            if sink is not None:
                sink(i, grams)
            else:
                collected.update(grams)

    _gradient_pass(blocks, calib, windows, _Sums(grams=finish, reduction="sum", labels=labels),
                   "output gradients", progress, spill)
    return None if sink is not None else collected


def spill_bytes(blocks: Blocks, tokens: int) -> int:
    """Disk a gradient pass over `tokens` calibration tokens spills: every block's input, held at once at most."""
    width = int(blocks.model.config.get_text_config().hidden_size)
    return len(blocks) * tokens * width * blocks.compute_dtype.itemsize


def _gradient_pass(blocks: Blocks, calib: torch.Tensor, windows: int | None, sums: _Sums, desc: str,
                   progress: bool, spill: Path | None) -> None:
    """This rank's share of the first `windows` windows: forward with every block's input spilled, then
    back-propagation block by block, with a progress bar."""
    calib = calib if windows is None else calib[:windows]
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
            check_space(spill or Path(tempfile.gettempdir()), spilled, f"the {desc} pass's spilled block inputs")
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
                grad, grams = _block_backward(blocks, i, inputs.take(i), grad, sums)
            if sums.grams is not None:
                sums.grams(i, grams)
            bar.update()
    finally:
        inputs.close()
        bar.close()


def _block_backward(blocks: Blocks, i: int, x: Stream, grad_out: list[torch.Tensor], sums: _Sums
                    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Back-propagate each window through block `i`; add its squared weight-gradient row sums and gather its
    output-gradient Grams (this rank's windows; full precision, TF32 off); return the gradients at the block's
    input and the Grams by full linear name ({} when not wanted)."""
    grad_in = []
    with blocks.on_device(i) as block, torch.enable_grad(), no_tf32():
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
            local = {name: torch.zeros(m, m, dtype=torch.float64, device=blocks.device)
                     for name, (m, _) in blocks.layout.linears[i].items()}

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
    return grad_in, {full[name]: g for name, g in local.items()}
