import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from svdkit.data import DataError
from svdkit.evaluation import perplexity
from svdkit.evaluation.perplexity import NonFiniteError


class FixedDistribution(nn.Module):
    """Predicts the same next-token distribution `probs` at every position; NaN where `poison` appears."""

    def __init__(self, probs: torch.Tensor, poison: int | None = None):
        super().__init__()
        self.logp = nn.Parameter(probs.log(), requires_grad=False)
        self.poison = poison
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, ids, use_cache=False):
        logits = self.logp.expand(*ids.shape, -1).clone()
        if self.poison is not None:
            logits[(ids == self.poison).any(dim=1)] = float("nan")
        return SimpleNamespace(logits=logits)


def test_uniform_model_has_vocabulary_size_perplexity():
    ids = torch.randint(0, 50, (400,))
    res = perplexity(FixedDistribution(torch.full((50,), 1 / 50)), None, ids, seqlen=16, progress=False)
    assert res.windows == 25 and res.tokens == 25 * 15
    assert res.ppl == pytest.approx(50.0, rel=1e-6)  # logits are evaluated in float32


def test_known_distribution_gives_known_perplexity():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 3] * 20)
    res = perplexity(FixedDistribution(probs), None, ids, seqlen=8, max_windows=5, batch_size=2, progress=False)
    # each window predicts tokens 1..7 of [0,1,2,3,0,1,2,3]: targets 1,2,3,0,1,2,3
    expected = -sum(math.log(probs[t]) for t in [1, 2, 3, 0, 1, 2, 3]) / 7
    assert res.windows == 5 and res.nll == pytest.approx(expected, rel=1e-6)  # logits are evaluated in float32
    assert res.ppl == pytest.approx(math.exp(expected), rel=1e-6)  # logits are evaluated in float32


def test_nonfinite_windows_are_counted_not_hidden():
    ids = torch.randint(0, 10, (160,))
    ids[40] = 11  # lands in window 2 of 10 (seqlen 16)
    model = FixedDistribution(torch.full((12,), 1 / 12), poison=11)
    res = perplexity(model, None, ids, seqlen=16, progress=False)
    assert res.nonfinite_windows == 1 and not res.ok and res.windows == 10 and res.tokens == 9 * 15
    assert res.ppl == pytest.approx(12.0)
    with pytest.raises(NonFiniteError, match="1 of 10 windows"):
        perplexity(model, None, ids, seqlen=16, strict=True, progress=False)


def test_bad_windows_fail_clearly():
    model = FixedDistribution(torch.full((4,), 0.25))
    with pytest.raises(DataError, match="longer than the model's maximum context"):
        perplexity(model, None, torch.zeros(1000, dtype=torch.long), seqlen=128)
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(model, None, torch.zeros(10, dtype=torch.long), seqlen=16)
