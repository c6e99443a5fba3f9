"""svdkit's own lm-evaluation-harness tasks: offline, smoke-level cloze tests shipped as YAML + JSONL.

They exist so that zero-shot accuracy can be measured without network access; they are not one of the
papers' benchmarks (ARC, PIQA, HellaSwag, ...). `build.py` regenerates the JSONL files deterministically.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
SHIPPED_TASKS: tuple[str, ...] = ("svdkit_ptb_cloze", "svdkit_wiki_cloze")
SHIPPED_TAG = "svdkit_cloze"  # runs all of SHIPPED_TASKS
DEFAULT_TASK = "svdkit_ptb_cloze"

__all__ = ["DEFAULT_TASK", "SHIPPED_TAG", "SHIPPED_TASKS", "TASKS_DIR"]
