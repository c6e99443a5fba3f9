"""Decode speed with `torch.compile`: does compiling the step remove the fixed part that low rank does not shrink?

    python benchmarks/compiled_decode.py --out results/compiled-decode --synthetic-ratio 0 0.6 --round-ranks 16

Each ratio: the model of `benchmarks/inference.py` with transformers' preallocated `StaticCache` (fixed shapes, so
one compiled graph serves every step), an eager prefill of `--context` random tokens, then greedy decode steps
timed eager and compiled (`torch.compile(model.forward)`, default mode; the compilation is timed apart, on the
first steps). Writes `compiled_decode.json` and `.md` under `--out`. Run it alone: the figures are times.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from inference import prepare
from transformers.cache_utils import StaticCache


@torch.inference_mode()
def decode_times(model: torch.nn.Module, context: int, steps: int, compiled: bool, warmup: int = 3) -> dict:
    """Milliseconds per decode step after an eager prefill, the seconds the first steps took (the compilation, when
    compiled) and the greedy tokens."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=context + warmup + steps)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                cache_position=torch.arange(context))
    forward = torch.compile(model.forward, dynamic=False) if compiled else model.forward
    pos, tokens = context, []

    def step() -> None:
        nonlocal out, pos
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(int(nxt))
        out = forward(input_ids=nxt, past_key_values=cache, use_cache=True, cache_position=torch.tensor([pos]),
                      position_ids=torch.tensor([[pos]]))
        pos += 1

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"ms_per_step": (time.perf_counter() - t0) / steps * 1e3, "warmup_s": first, "tokens": tokens}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--synthetic-ratio", type=float, nargs="+", default=[0.0, 0.6], metavar="R")
    p.add_argument("--round-ranks", type=int, default=1, metavar="M")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"torch": torch.__version__, "device": platform.machine(), "threads": torch.get_num_threads(),
            "context": args.context, "steps": args.steps, "round_ranks": args.round_ranks}
    rows = []
    for ratio in args.synthetic_ratio:
        model = prepare(args.model, ratio, "float32", "cpu", args.round_ranks)
        eager = decode_times(model, args.context, args.steps, compiled=False)
        compiled = decode_times(model, args.context, args.steps, compiled=True)
        rows.append({"ratio": ratio, "params": sum(t.numel() for t in model.parameters()),
                     "eager_ms_per_step": eager["ms_per_step"], "compiled_ms_per_step": compiled["ms_per_step"],
                     "compile_s": compiled["warmup_s"], "same_tokens": eager["tokens"] == compiled["tokens"]})
        del model
        torch._dynamo.reset()
    dense = next((r for r in rows if r["ratio"] == 0.0), None)
    lines = ["# Decode with torch.compile", "",
             f"torch {meta['torch']}, {meta['device']}, {meta['threads']} threads, float32, batch 1, StaticCache, "
             f"context {meta['context']}, {meta['steps']} steps; x dense: against the dense row in the same mode.", "",
             "| R | params (M) | eager ms/step | compiled ms/step | compiled speed-up | eager x dense "
             "| compiled x dense | first steps (compile) s | same tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        xe = f"{dense['eager_ms_per_step'] / r['eager_ms_per_step']:.2f}" if dense else "-"
        xc = f"{dense['compiled_ms_per_step'] / r['compiled_ms_per_step']:.2f}" if dense else "-"
        lines.append(f"| {r['ratio']} | {r['params'] / 1e6:.1f} | {r['eager_ms_per_step']:.1f} | "
                     f"{r['compiled_ms_per_step']:.1f} | {r['eager_ms_per_step'] / r['compiled_ms_per_step']:.2f}x | "
                     f"{xe} | {xc} | {r['compile_s']:.0f} | {'yes' if r['same_tokens'] else 'NO'} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compiled_decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "compiled_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
