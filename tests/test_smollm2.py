"""The real embedded model: a quick smoke test in the default run, the full protocol under -m slow."""

import pytest

from svdkit import count_parameters, load_model, load_text, perplexity


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_smollm2_loads_and_predicts_ptb(smollm2):
    model, tok = smollm2
    assert count_parameters(model)["total"] == 134_515_008
    res = perplexity(model, tok, load_text("ptb", "test"), seqlen=256, max_windows=4, progress=False)
    assert res.ok and 30 < res.ppl < 150


@pytest.mark.slow
def test_smollm2_reference_perplexities(smollm2):
    model, tok = smollm2
    ptb = perplexity(model, tok, load_text("ptb", "test"), seqlen=512, max_windows=40, progress=False)
    wiki = perplexity(model, tok, load_text("wiki", "test"), seqlen=512, max_windows=40, progress=False)
    assert ptb.ppl == pytest.approx(63.35, rel=0.02)  # independent implementation of the same protocol
    assert wiki.ppl == pytest.approx(19.88, rel=0.05)
