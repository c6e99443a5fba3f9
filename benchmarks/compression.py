"""Compression wall time and peak resident memory, per method, and how they grow with the number of
calibration tokens and with model width. Each measurement runs in its own process so its peak RSS is
its own. Writes compression.json (after every measurement) and compression.md to --out.

    python benchmarks/compression.py --out results/bench \
        --methods svd,asvd,fwsvd,svdllm,svdllm-update,svdllm-v2,adasvd,ressvd --n 64 \
        --growth-method svdllm --nsamples 16,32,64,128 --widths 256,512,1024,2048
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    """One measurement: load (or build) the model, sample calibration, compress; print JSON timings."""
    import torch

    import svdkit
    from svdkit.methods import parse_method

    if args.width:
        from transformers import LlamaConfig, LlamaForCausalLM

        width = args.width
        heads = width // 64
        cfg = LlamaConfig(vocab_size=49152, hidden_size=width, intermediate_size=int(width * 8 / 3) // 64 * 64,
                          num_hidden_layers=4, num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1),
                          max_position_embeddings=2048)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        calib = torch.randint(0, 49152, (args.n, args.seqlen), generator=torch.Generator().manual_seed(0))
    else:
        model, tok = svdkit.load_model(args.model)
        calib = svdkit.calibration("wiki", tok, n=args.n, seqlen=args.seqlen, seed=0)
    t0 = time.perf_counter()
    report = svdkit.compress(model, parse_method(args.method, ratio=args.ratio), calib, progress=False)
    seconds = time.perf_counter() - t0
    factorize = sum(m.seconds for m in report.matrices)
    print(json.dumps({"seconds": seconds, "factorize_seconds": factorize,
                      "params": report.params_before["block_linears"]}))


def run_one(method: str, n: int, seqlen: int, ratio: float, model: str, width: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--n", str(n), "--seqlen", str(seqlen),
           "--ratio", str(ratio), "--model", model] + (["--width", str(width)] if width else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        return {"method": method, "n": n, "width": width, "error": f"exit status {status}"}
    res = json.loads(out.strip().splitlines()[-1])
    return {"method": method, "n": n, "tokens": n * seqlen, "width": width, "ratio": ratio,
            "peak_rss_mb": usage.ru_maxrss / 1024, **res}


def growth(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x: the measured exponent of growth."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="svdllm")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="svd,asvd,fwsvd,svdllm,svdllm-update,svdllm-v2,adasvd,ressvd",
                   help="methods timed on the real model with --n calibration windows")
    p.add_argument("--growth-method", default="svdllm", help="method of the token and width growth series")
    p.add_argument("--nsamples", default="16,32,64,128", help="calibration windows for the token-growth series")
    p.add_argument("--widths", default="256,512,1024,2048", help="hidden sizes of the random LLaMAs (empty: skip)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--out", default="results/bench")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    rows: list[dict] = []

    def measure(method: str, n: int, width: int | None, series: str) -> None:
        rows.append({"series": series, **run_one(method, n, args.seqlen, args.ratio, args.model, width)})
        print(json.dumps(rows[-1]), flush=True)
        (out / "compression.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))

    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        measure(method, args.n, None, "method")
    g = args.growth_method
    for n in [int(x) for x in args.nsamples.split(",") if x]:
        if not (n == args.n and g in methods):  # that point is already in the per-method series
            measure(g, n, None, "tokens")
    for w in [int(x) for x in args.widths.split(",") if x and int(x)]:
        measure(g, 16, w, "width")
    ok = [r for r in rows if "error" not in r]
    tok = [r for r in ok if r["method"] == g and not r["width"]]
    wid = [r for r in ok if r["method"] == g and r["width"]]
    summary = {g: {
        "time_vs_tokens_exponent": growth([r["tokens"] for r in tok], [r["seconds"] for r in tok]),
        "memory_vs_tokens_exponent": growth([r["tokens"] for r in tok], [r["peak_rss_mb"] for r in tok]),
        "time_vs_width_exponent": growth([r["width"] for r in wid], [r["seconds"] for r in wid]),
    }}
    (out / "compression.json").write_text(json.dumps({"machine": machine, "rows": rows, "growth": summary}, indent=1))
    lines = [f"Machine: {machine['cpus']} CPUs, {machine['platform']}. Ratio {args.ratio}, seqlen {args.seqlen}.", "",
             "| method | model | calibration tokens | seconds | factorize s | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['width'] or args.model} | | error: {r['error']} | | |")
            continue
        model = f"random LLaMA, hidden {r['width']}, 4 blocks" if r["width"] else args.model
        lines.append(f"| {r['method']} | {model} | {r['tokens']:,} | {r['seconds']:.1f} | "
                     f"{r['factorize_seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "| method | time ~ tokens^a | memory ~ tokens^a | time ~ width^a |", "|---|---|---|---|"]
    for method, exps in summary.items():
        cells = [f"{v:.2f}" if v is not None else "-" for v in exps.values()]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (out / "compression.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
