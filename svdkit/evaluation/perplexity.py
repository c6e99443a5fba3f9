"""Perplexity as the SVD-LLM / GPTQ evaluations compute it.

Tokenize the whole text once, cut it into non-overlapping windows of `seqlen` tokens, average the
next-token negative log-likelihood over every predicted token (in float32 or better), exponentiate.
A window whose logits are not finite is counted and reported, never dropped silently.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from ..blocks import Blocks, StreamedModel
from ..data import DataError, tokenize
from ..dist import progress_bar, together, world
from ..errors import SvdkitError
from ..stream import as_blocks, capture, replayed

log = logging.getLogger(__name__)


class NonFiniteError(SvdkitError, RuntimeError):
    """Raised when a model produces non-finite logits and the caller asked for strictness."""


@dataclass
class PerplexityResult:
    """Perplexity over `windows` windows (`tokens` predicted tokens); `nonfinite_windows` are excluded."""

    ppl: float
    nll: float
    windows: int
    tokens: int
    seqlen: int
    nonfinite_windows: int = 0

    @property
    def ok(self) -> bool:
        return self.nonfinite_windows == 0 and math.isfinite(self.ppl)

    def to_dict(self) -> dict:
        return asdict(self)


def max_context(model) -> int | None:
    """The model's maximum sequence length, if its config states one."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


@torch.no_grad()
def window_nll(model, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (float64) and a finiteness flag for each window of a (b, seqlen) batch."""
    logits = model(windows, use_cache=False).logits[:, :-1].float()
    finite = torch.isfinite(logits).flatten(1).all(dim=1)
    targets = windows[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll.double().sum(dim=1), finite


@torch.no_grad()
def blockwise_window_nll(blocks: Blocks, windows: torch.Tensor, batch_size: int, activations: str = "auto",
                         progress: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`window_nll` for every batch, computed block by block: all windows through block i, then block i+1, then
    the model's head on the final hidden states. Only one block is on the device at a time."""
    x = capture(blocks, windows, batch_size, activations, shard=False)
    for i in progress_bar(range(len(blocks)), desc="perplexity", unit="block", disable=not progress, leave=False):
        with blocks.on_device(i) as block:
            x = x.run(block)
    with blocks.head_on_device() as model, replayed(blocks, x.tuple_output) as first:
        for b in range(len(x)):
            first.value = x.batch(b)
            yield window_nll(model, windows[b * batch_size : (b + 1) * batch_size].to(blocks.device))


def _windows(model, tokenizer, text: str | torch.Tensor, seqlen: int, max_windows: int | None,
             batch_size: int) -> torch.Tensor:
    """The checked options' non-overlapping `n x seqlen` windows of `text`'s token ids."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1 (got {batch_size})")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be at least 1 (got {max_windows}); None evaluates every window")
    limit = max_context(model)
    if limit is not None and seqlen > limit:
        raise DataError(f"seqlen {seqlen} is longer than the model's maximum context of {limit} tokens")
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2 (got {seqlen})")
    ids = text if isinstance(text, torch.Tensor) else tokenize(tokenizer, text)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def _summed(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int, int]:
    """The finite windows' summed NLL and count, and the non-finite count, added up over every rank."""
    total, counted, bad = 0.0, 0, 0
    with together("evaluating perplexity"):
        for nll, finite in batches:
            bad += int((~finite).sum())
            total += float(nll[finite].sum())
            counted += int(finite.sum())
    total, counted, bad = world().sum([total, counted, bad])
    return total, int(counted), int(bad)


def perplexity(
    model,
    tokenizer,
    text: str | torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 4,
    strict: bool = False,
    progress: bool = True,
    *,
    device: torch.device | str | None = None,
    blockwise: bool | None = None,
    activations: str = "auto",
) -> PerplexityResult:
    """Perplexity of `model` on `text` (a string, or token ids) in non-overlapping `seqlen` windows.

    `model` is an in-memory model or a `StreamedModel` (blocks on disk). `blockwise` (the default for a
    `StreamedModel`, or when `device` differs from the model's) evaluates all windows block by block on
    `device`, so a model that fits neither the device nor memory can be evaluated; otherwise the model
    runs whole, on its own device. With `strict=True` a non-finite window raises `NonFiniteError`;
    otherwise it is excluded and counted.
    """
    windows = _windows(model, tokenizer, text, seqlen, max_windows, batch_size)
    n = windows.shape[0]
    w = world()
    if w.active:  # each rank evaluates its share of the windows; the sums are added up below
        if n < w.size:
            raise DataError(f"{n} windows cannot be shared by {w.size} processes")
        windows = windows[w.shard(n)]
    if blockwise is None:
        blockwise = isinstance(model, StreamedModel) or (
            device is not None and torch.device(device) != next(model.parameters()).device)
    if blockwise:
        batches = blockwise_window_nll(as_blocks(model, device), windows, batch_size, activations, progress)
    else:
        home = next(model.parameters()).device
        starts = progress_bar(range(0, windows.shape[0], batch_size), desc="perplexity", unit="batch",
                              disable=not progress, leave=False)
        batches = (window_nll(model, windows[i : i + batch_size].to(home)) for i in starts)
    total, counted, bad = _summed(batches)
    if bad:
        msg = f"{bad} of {n} windows produced non-finite logits"
        if strict:
            raise NonFiniteError(msg)
        log.warning("%s; they are excluded from the perplexity", msg)
    tokens = counted * (seqlen - 1)
    mean = total / tokens if tokens else float("nan")
    return PerplexityResult(
        ppl=math.exp(mean) if math.isfinite(mean) else float("nan"),
        nll=mean,
        windows=n,
        tokens=tokens,
        seqlen=seqlen,
        nonfinite_windows=bad,
    )


def evaluate_corpora(model, tokenizer, names: list[str], *, seqlen: int = 512, max_windows: int | None = None,
                     batch_size: int = 4, device: torch.device | str | None = None, activations: str = "auto",
                     texts: dict[str, torch.Tensor] | None = None, progress: bool = True) -> dict[str, dict]:
    """Perplexity on each corpus's test split (`texts` may hold them already tokenized), as a JSON-ready dict
    keyed by corpus name."""
    from ..data import load_text

    out = {}
    for name in names:
        ids = texts[name] if texts is not None and name in texts else tokenize(tokenizer, load_text(name, "test"))
        out[name] = perplexity(model, tokenizer, ids, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size,
                               progress=progress, device=device, activations=activations).to_dict()
    return out
