"""Loaders the shipped task YAMLs reference with `custom_dataset: !function _load.<name>`.

lm-eval imports this file by path (not as `svdkit.tasks._load`), so it is self-contained; the JSONL is
found next to this file whatever the working directory is, which a relative `data_files` could not do.
"""

from __future__ import annotations

import json
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def load_jsonl(name: str):
    """The rows of `name` (a JSONL file in this folder) as a `DatasetDict` with one `test` split."""
    import datasets

    with open(_HERE / name, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def ptb_cloze(**_kwargs):
    """Data of `svdkit_ptb_cloze`; lm-eval passes the task's metadata as keyword arguments, unused here."""
    return load_jsonl("ptb_cloze.jsonl")


def wiki_cloze(**_kwargs):
    """Data of `svdkit_wiki_cloze`; lm-eval passes the task's metadata as keyword arguments, unused here."""
    return load_jsonl("wiki_cloze.jsonl")
