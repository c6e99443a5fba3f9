"""Parking a block's statistics on disk: what comes back is what went, and nothing is kept that is not wanted."""

import pytest
import torch

from svdkit.errors import ConfigError
from svdkit.parking import Parking, PendingStatistics
from svdkit.statistics import GroupAccumulator


def accumulator(n: int, seed: int, two_streams: bool = True) -> GroupAccumulator:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    return GroupAccumulator(x.T @ x, x.abs().sum(0), tokens=3 * n, gram_c=(x.T @ x) * 2 if two_streams else None,
                            cross=(x.T @ x) * 3 if two_streams else None)


def test_parked_tensors_and_accumulators_come_back_bit_identical_and_leave_nothing(tmp_path):
    park = Parking(tmp_path)
    acc, single, t = accumulator(16, 0), accumulator(8, 1, two_streams=False), torch.randn(5, 7, dtype=torch.float64)
    park.put("a", acc)
    park.put("b", single)
    park.put("t", t)
    folder = next(tmp_path.iterdir())
    assert len(list(folder.iterdir())) == 3 and "a" in park
    back = park.take("a")
    assert back.tokens == acc.tokens and all(torch.equal(getattr(back, f), getattr(acc, f))
                                             for f in ("gram", "abs_sum", "gram_c", "cross"))
    assert park.take("b").gram_c is None and torch.equal(park.take("t"), t)
    assert list(folder.iterdir()) == [] and "a" not in park
    park.put("x", t)
    park.put("y", t * 2)
    assert torch.equal(park.take("x"), t)
    park.put("z", t * 3)  # written after a take: no file is reused
    assert torch.equal(park.take("y"), t * 2) and torch.equal(park.take("z"), t * 3)
    hidden = [torch.randn(1, 4, 8).bfloat16(), torch.randn(2, 3, 8).bfloat16()]  # a stream's batches
    park.put("h", hidden)
    park.put("none", [])
    back = park.take("h")
    assert len(back) == 2 and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(back, hidden, strict=True))
    assert park.take("none") == []
    park.put("left", t)
    park.close()
    assert list(tmp_path.iterdir()) == []


def test_pending_statistics_keep_only_the_wanted_groups_and_grams(tmp_path):
    for parking in (None, Parking(tmp_path)):
        stats = {"q": accumulator(8, 0), "o": accumulator(8, 1), "down": accumulator(16, 2)}
        expected = {k: v.gram.clone() for k, v in stats.items()}
        pending = PendingStatistics(stats, {"q", "down"}, parking)
        assert stats == {} if parking is not None else set(stats) == {"q", "down"}  # "o" is another rank's
        grams = {"b.q": torch.eye(8, dtype=torch.float64), "b.o": torch.eye(8, dtype=torch.float64)}
        pending.add_grams(grams, {"b.q"})
        assert grams == {}
        assert torch.equal(pending.group("down").gram, expected["down"])
        assert pending.group("down") is pending.group("down")  # built once: its linears share the whitening
        assert pending.group("o") is None and torch.equal(pending.out_gram("b.q"), torch.eye(8, dtype=torch.float64))
        assert pending.out_gram("b.o") is None
        pending.release("down")
        assert "down" not in pending.live and torch.equal(pending.group("q").gram, expected["q"])
        pending.close()
    assert list(tmp_path.iterdir()) == []


def test_parking_refuses_a_disk_too_small_and_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError, match="SVDKIT_PARK_BYTES="):
        Parking(tmp_path, need=10**18)
    assert list(tmp_path.iterdir()) == []
