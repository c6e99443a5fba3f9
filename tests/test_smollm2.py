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


def test_smollm2_compress_save_reload_is_bit_identical(smollm2, tmp_path):
    """The real model through the whole flow, on a small calibration set (a smoke test, not a quality one)."""
    import torch

    from svdkit import SVDLLM, LowRankLinear, calibration, compress, load, save

    model, tok = load_model("smollm2-135m")  # a fresh copy: compress works in place
    calib = calibration("wiki", tok, n=4, seqlen=128, seed=0)
    report = compress(model, SVDLLM(ratio=0.4), calib, progress=False)
    assert report.params_after["block_linears"] < 0.61 * report.params_before["block_linears"]
    assert all(e.info["whitening"] in ("cholesky", "eigen", "output") for e in report.matrices)
    save(model, tmp_path / "c", tokenizer=tok, report=report)
    loaded, _ = load(tmp_path / "c")
    assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == 30 * 7
    ids = calib[:1, :64]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    res = perplexity(loaded, tok, load_text("ptb", "test"), seqlen=256, max_windows=2, progress=False)
    assert res.ok and res.ppl > smollm2_dense_ppl(smollm2)


def smollm2_dense_ppl(smollm2) -> float:
    model, tok = smollm2
    return perplexity(model, tok, load_text("ptb", "test"), seqlen=256, max_windows=2, progress=False).ppl


@pytest.mark.slow
@pytest.mark.parametrize("ratio, ptb_ref, wiki_ref", [(0.2, 587, 87.8), (0.4, 4869, 296), (0.6, 21143, 1731)])
def test_svdllm_matches_the_official_code_on_the_same_protocol(ratio, ptb_ref, wiki_ref):
    """Official SVD-LLM (whitening only), 64 x 512 wiki calibration, seqlen 512, 40 windows. Calibration
    windows differ between the two implementations, so the check is loose on the out-of-domain PTB: it swings
    with the windows (measured with seed 0: 773, 7,461, 18,112; at 0.2 with seed 1: 527), within a factor 2
    of the official code's at every ratio."""
    from svdkit import SVDLLM, calibration, compress

    model, tok = load_model("smollm2-135m")
    compress(model, SVDLLM(ratio=ratio), calibration("wiki", tok, n=64, seqlen=512, seed=0), progress=False)
    wiki = perplexity(model, tok, load_text("wiki", "test"), seqlen=512, max_windows=40, progress=False)
    ptb = perplexity(model, tok, load_text("ptb", "test"), seqlen=512, max_windows=40, progress=False)
    assert wiki.ppl == pytest.approx(wiki_ref, rel=0.15)
    assert ptb_ref / 2 < ptb.ppl < 2 * ptb_ref
    assert ptb.ppl > wiki.ppl  # out of domain for a Wikipedia calibration set
