"""Perplexity as the SVD-LLM / GPTQ evaluations compute it.

Tokenize the whole text once, cut it into non-overlapping windows of `seqlen` tokens, average the
next-token negative log-likelihood over every predicted token (in float32 or better), exponentiate.
A window whose logits are not finite is counted and reported, never dropped silently.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..data import DataError, tokenize

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
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
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, attr, None)
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


def perplexity(
    model,
    tokenizer,
    text: str | torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 4,
    strict: bool = False,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on `text` (a string, or token ids) in non-overlapping `seqlen` windows.

    With `strict=True` a non-finite window raises `NonFiniteError`; otherwise it is excluded and counted.
    """
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
    device = next(model.parameters()).device
    windows = ids[: n * seqlen].view(n, seqlen)
    total, counted, bad = 0.0, 0, 0
    for i in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress, leave=False):
        nll, finite = window_nll(model, windows[i : i + batch_size].to(device))
        bad += int((~finite).sum())
        total += float(nll[finite].sum())
        counted += int(finite.sum())
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
