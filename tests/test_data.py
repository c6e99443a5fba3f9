import json

import pytest
import torch

from svdkit import calibration, load_text
from svdkit.data import DataError, tokenize, wiki_pages


def test_ptb_is_single_spaced_sentences():
    text = load_text("ptb", "test")
    assert text.startswith("no it was n't black monday but while")
    assert "\n" not in text and "  " not in text and text == text.strip()


def test_wiki_splits_are_disjoint_page_ranges_without_redirects_or_markup():
    pages = wiki_pages()
    train, test = load_text("wiki", "train"), load_text("wiki", "test")
    cut = int(0.8 * len(pages))
    assert train == "\n\n".join(pages[:cut]) and test == "\n\n".join(pages[cut:])
    assert train.startswith("Anarchism is a political philosophy")
    for text in (train, test):
        assert "#REDIRECT" not in text and "'''" not in text and "[[" not in text and "==" not in text


def test_unknown_names_and_splits_fail_clearly():
    with pytest.raises(DataError, match="unknown data set 'nope'"):
        load_text("nope")
    with pytest.raises(DataError, match="unknown split"):
        load_text("ptb", "dev")


def test_calibration_is_reproducible_from_seed(tokenizer):
    a = calibration("ptb", tokenizer, n=8, seqlen=32, seed=1, split="valid")
    b = calibration("ptb", tokenizer, n=8, seqlen=32, seed=1, split="valid")
    c = calibration("ptb", tokenizer, n=8, seqlen=32, seed=2, split="valid")
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every window is a contiguous slice of the split's token stream
    ids = tokenize(tokenizer, load_text("ptb", "valid"))
    first = a[0]
    starts = (ids[: ids.numel() - 32] == first[0]).nonzero().flatten()
    assert any(torch.equal(ids[s : s + 32], first) for s in starts.tolist())


def test_calibration_rejects_short_text(tokenizer):
    with pytest.raises(DataError, match="fewer than one window"):
        calibration("a few words only", tokenizer, n=2, seqlen=64)
    with pytest.raises(DataError, match="empty"):
        calibration("   ", tokenizer, n=2, seqlen=64)


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_wikitext2_loader_joins_rows_with_blank_lines(tmp_path):
    f = _write_jsonl(tmp_path / "wt2.jsonl", [{"text": " = Title = "}, {"text": ""}, {"text": " Body text ."}])
    assert load_text("wikitext2", "test", data_files=f) == " = Title = \n\n\n\n Body text ."


def test_ptb_hf_loader_joins_sentences_with_spaces(tmp_path):
    f = _write_jsonl(tmp_path / "ptb.jsonl", [{"sentence": " a b "}, {"sentence": "c d"}])
    assert load_text("ptb-hf", "test", data_files=f) == "a b c d"


def test_c4_loader_keeps_the_first_1100_documents(tmp_path):
    f = _write_jsonl(tmp_path / "c4.jsonl", [{"text": f"doc{i}", "url": "x"} for i in range(1200)])
    text = load_text("c4", "valid", data_files=f)
    assert text.split() == [f"doc{i}" for i in range(1100)]


def test_hub_loader_without_network_says_so(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="need network access"):
        load_text("wikitext2", "test")
