"""Where a decode step's time goes: the matmuls (what low rank shrinks) against everything else.

    python benchmarks/decode_profile.py --out results/decode-profile --synthetic-ratio 0 0.4 0.6 --round-ranks 16

Each ratio: the model of `benchmarks/inference.py` (`--synthetic-ratio`, `--round-ranks`, `--fuse`), one prefill of
`--context` random tokens into a `DynamicCache`, a few warm-up steps, then `--steps` greedy decode steps timed
plainly and the same number again under `torch.profiler`. The profile's self CPU time is grouped into matmuls
(`aten::mm`, `addmm`, `bmm`), concatenation (`aten::cat`: the KV cache grown by one token, RoPE's
`rotate_half`), attention (`scaled_dot_product`) and the rest; what the wall time holds beyond the profiled
operations is Python and dispatch. Writes `decode_profile.json` and `.md` under `--out`. Run it alone: the figures
are times.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from inference import prepare
from transformers.cache_utils import DynamicCache

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "concatenation": ("aten::cat",),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"),
}


def _group(name: str) -> str:
    return next((g for g, names in GROUPS.items() if name in names), "other operations")


@torch.inference_mode()
def profile_decode(model: torch.nn.Module, context: int, steps: int, warmup: int = 4) -> dict:
    """Milliseconds per decode step: plain wall time, and the profiled self CPU time by group."""
    from torch.profiler import ProfilerActivity, profile

    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def step() -> None:
        nonlocal out
        out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - t0) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    groups = dict.fromkeys([*GROUPS, "other operations"], 0.0)
    calls = dict.fromkeys(groups, 0)
    for e in prof.key_averages():
        g = _group(e.key)
        groups[g] += e.self_cpu_time_total / 1e3 / steps
        calls[g] += e.count // steps
    return {"wall_ms_per_step": wall, "profiled_ms_per_step": groups, "calls_per_step": calls}


def markdown(rows: list[dict], meta: dict) -> str:
    names = [*GROUPS, "other operations"]
    lines = [
        "# Where a decode step's time goes",
        "",
        f"torch {meta['torch']}, {meta['device']}, {meta['threads']} threads, float32, batch 1, context "
        f"{meta['context']}, {meta['steps']} steps; ms per step (profiled self CPU time; calls per step in brackets). "
        "Wall: the same steps without the profiler.",
        "",
        "| R | params (M) | wall ms | " + " | ".join(names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for r in rows:
        cells = " | ".join(f"{r['profiled_ms_per_step'][n]:.1f} ({r['calls_per_step'][n]})" for n in names)
        lines.append(f"| {r['ratio']} | {r['params'] / 1e6:.1f} | {r['wall_ms_per_step']:.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--synthetic-ratio", type=float, nargs="+", default=[0.0, 0.4, 0.6], metavar="R")
    p.add_argument("--round-ranks", type=int, default=1, metavar="M")
    p.add_argument("--fuse", action="store_true")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"torch": torch.__version__, "device": platform.machine(), "threads": torch.get_num_threads(),
            "context": args.context, "steps": args.steps, "round_ranks": args.round_ranks, "fuse": args.fuse}
    rows = []
    for ratio in args.synthetic_ratio:
        model = prepare(args.model, ratio, "float32", "cpu", args.round_ranks, args.fuse)
        row = {"ratio": ratio, "params": sum(t.numel() for t in model.parameters()),
               **profile_decode(model, args.context, args.steps)}
        rows.append(row)
        del model
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_profile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "decode_profile.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
