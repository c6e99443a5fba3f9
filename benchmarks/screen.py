"""Cheap screening of method options on held-out *training* text, so that no choice is tuned on test pages.

Proxy: perplexity on `--windows` windows of the wiki train split that overlap no calibration window, and
on as many windows of the PTB train split (out of domain). Every spec is compressed in memory from a fresh
copy of the dense model with the sweep-style statistics cache (output-gradient Grams included); `--ft`
configs fine-tune copies of the first spec's compressed model instead (one compression, several fine-tuning
settings). Block-local refinement is screened as a spec (`ada-kfac:rf_steps=64`). Appends one JSON line per
result to `--out`.

    python benchmarks/screen.py --ratio 0.4 --seed 0 --specs "kfac,kfac:damping=1" --out results/screen.jsonl
    python benchmarks/screen.py --ratio 0.4 --specs adasvd --ft "steps=16;lr=1e-4" --ft "steps=16;lr=3e-4" ...
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch

import svdkit
from svdkit.data import load_text, tokenize
from svdkit.finetune import FinetuneConfig, finetune, window_loss
from svdkit.methods import parse_method
from svdkit.models import cache_dir
from svdkit.specs import build, split_spec
from svdkit.stats_cache import StatsCache, stats_key

log = logging.getLogger("screen")


def held_out(ids: torch.Tensor, n: int, seqlen: int, calib_starts: list[int] | None = None) -> torch.Tensor:
    """`n` windows taken from the end of the token stream backwards, skipping any that overlaps calibration."""
    out, end = [], ids.numel()
    while len(out) < n and end - seqlen >= 0:
        start = end - seqlen
        if not calib_starts or all(start + seqlen <= s or start >= s + seqlen for s in calib_starts):
            out.append(ids[start:end])
        end = start
    if len(out) < n:
        raise SystemExit(f"only {len(out)} held-out windows of {seqlen} tokens are available")
    return torch.stack(out)


def calib_starts(n_tokens: int, n: int, seqlen: int, seed: int) -> list[int]:
    """The window starts `svdkit.calibration` draws (same generator and call)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seqlen, (n,), generator=gen).tolist()


def proxy(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Perplexity of `model` on each held-out set."""
    return {name: math.exp(window_loss(model, d)) for name, d in data.items()}


def parse_ft(spec: str) -> FinetuneConfig:
    """A `FinetuneConfig` from `key=value` pairs separated by `;` or `,` (e.g. `steps=16;lr=1e-4`)."""
    return build(FinetuneConfig, "ft", split_spec(f"ft:{spec}")[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ratio", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--specs", required=True, help="comma-separated method specs (options separated by ';')")
    p.add_argument("--ft", action="append", default=[], help="fine-tuning config for the first spec, e.g. "
                   "steps=16;lr=1e-4;phases=uv (repeatable)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    dense, tok = svdkit.load_model(args.model, device=args.device)
    calib = svdkit.calibration("wiki", tok, n=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    wiki = tokenize(tok, load_text("wiki", "train"))
    data = {"wiki-train-heldout": held_out(wiki, args.windows, args.seqlen,
                                           calib_starts(wiki.numel(), args.nsamples, args.seqlen, args.seed)),
            "ptb-train": held_out(tokenize(tok, load_text("ptb", "train")), args.windows, args.seqlen)}
    if any(torch.equal(w, c) for w in data["wiki-train-heldout"] for c in calib):
        raise SystemExit("a held-out window is a calibration window")
    cache = StatsCache(cache_dir() / "stats" / stats_key(dense, calib))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:
        row.update(ratio=args.ratio, seed=args.seed, windows=args.windows)
        log.info("%s", row)
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    for i, spec in enumerate(s for s in args.specs.split(",") if s):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        rep = svdkit.compress(model, parse_method(spec, ratio=args.ratio), calib, stats_cache=cache, progress=False)
        estimates = {k: v for k, v in rep.extra.items() if k in ("global_loss_estimate", "uniform_loss_estimate")}
        record({"spec": spec, "proxy_ppl": proxy(model, data), "params_total": rep.params_after["total"],
                "seconds": time.perf_counter() - t0, "extra": estimates})
        if i == 0:
            for ft in args.ft:
                tuned = copy.deepcopy(model)
                res = finetune(tuned, calib, parse_ft(ft))
                record({"spec": spec, "ft": ft, "proxy_ppl": proxy(tuned, data), "ft_seconds": res["seconds"],
                        "ft_loss": [[sum(ph["losses"][:4]) / 4, sum(ph["losses"][-4:]) / 4] for ph in res["phases"]]})
                del tuned
        del model


if __name__ == "__main__":
    main()
