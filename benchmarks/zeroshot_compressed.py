"""Zero-shot accuracy of SmolLM2-135M dense and compressed at several ratios (`--method`, a spec as for
`svdkit compress`, default svdllm; calibration 64 x 512 wiki tokens, `--seed`), on svdkit's offline cloze tasks
(smoke-level, see docs/zeroshot.md). Reuses the one-shot statistics cache of `svdkit sweep`.

    python benchmarks/zeroshot_compressed.py --ratios 0,0.4,0.6 --limit 200 --out results/zeroshot
    python benchmarks/zeroshot_compressed.py --method ada-kfac --ratios 0,0.2,0.4,0.6 --out results/zeroshot-ada-kfac
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import svdkit
from svdkit.methods import parse_method
from svdkit.models import cache_dir
from svdkit.stats_cache import StatsCache, stats_key


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", default="0,0.4,0.6")
    p.add_argument("--tasks", default="svdkit_ptb_cloze,svdkit_wiki_cloze")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--method", default="svdllm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/zeroshot")
    args = p.parse_args()
    out, rows = Path(args.out), []
    out.mkdir(parents=True, exist_ok=True)
    for ratio in (float(r) for r in args.ratios.split(",")):
        model, tok = svdkit.load_model("smollm2-135m")
        if ratio > 0:
            calib = svdkit.calibration("wiki", tok, n=args.nsamples, seqlen=512, seed=args.seed)
            cache = StatsCache(cache_dir() / "stats" / stats_key(model, calib))
            svdkit.compress(model, parse_method(args.method, ratio=ratio), calib, progress=False, stats_cache=cache)
        start = time.perf_counter()
        res = svdkit.zero_shot(model, tok, args.tasks.split(","), limit=args.limit, batch_size=8)
        rows.append({"method": args.method if ratio > 0 else "dense", "ratio": ratio, "seed": args.seed,
                     "seconds": time.perf_counter() - start, "tasks": res["tasks"]})
        print(json.dumps(rows[-1]["tasks"]), flush=True)
    (out / "zeroshot_compressed.json").write_text(json.dumps(rows, indent=1))
    tasks = args.tasks.split(",")
    lines = [f"| {args.method} ratio | " + " | ".join(f"{t} acc (acc_norm)" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for r in rows:
        cells = [f"{r['tasks'][t]['acc']:.3f} ({r['tasks'][t]['acc_norm']:.3f})" for t in tasks]
        lines.append(f"| {r['ratio']:g} | " + " | ".join(cells) + " |")
    (out / "zeroshot_compressed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
