"""Peak memory of factorizing one matrix with the default method (`ada-kfac`: two-sided whitening, adaComp),
measured on reduced analogues of the widest LLaMA matrices, in units of that matrix's output-side Gram.

A 70B `gate_proj` is 28,672 x 8,192: its output-gradient Gram `G` is 28,672^2 float64 = 6.6 GB, and every copy of
it the factorization makes (damping, symmetrising, jitter, the Cholesky factor) costs as much again. The analogue
keeps the shape's proportions at a quarter of the width (7,168 x 2,048: G is 0.41 GB); peak memory above what
the inputs hold, divided by `8 m^2`, is the number of G-sized matrices alive at once, which carries over to the
full width. Each shape runs in its own process (CPU: peak RSS sampled every 2 ms; CUDA: the allocator's peak).

    python benchmarks/factorize_memory.py --shapes 7168x2048 4096x1024 [--device cuda] [--out docs/measurements]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(m: int, n: int, device: str, method: str) -> dict:
    """Factorize one random m x n matrix at ratio 0.4 with `method` and report the peak above the inputs."""
    import torch

    from svdkit.methods import LayerStats, parse_method

    torch.manual_seed(0)
    dev = torch.device(device)

    def psd(k: int) -> torch.Tensor:
        b = torch.randn(k, 256, dtype=torch.float64, device=dev)
        g = b @ b.T
        g.diagonal().add_(1e-3 * float(g.diagonal().mean()))
        return g

    w = torch.randn(m, n, dtype=torch.float64, device=dev) / n**0.5
    h = psd(n)
    stats = LayerStats(gram=h, tokens=4096, gram_c=h.clone(), cross=h.clone(), out_gram=psd(m))
    rank = int(0.6 * m * n / (m + n))
    spec = parse_method(method, ratio=0.4)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        base, peak, done = _rss(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    t0 = time.perf_counter()
    spec.factorize(w, stats, rank)
    seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated(dev) - base
    else:
        done.set()
        sampler.join()
        extra = max(peak[0], _rss()) - base
    gram = 8 * m * m
    return {"m": m, "n": n, "method": method, "device": device, "rank": rank, "seconds": seconds,
            "peak_extra_bytes": extra, "gram_bytes": gram, "peak_in_grams": extra / gram}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["7168x2048"])
    p.add_argument("--method", default="ada-kfac")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="folder for factorize_memory.json and .md")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one shape in this process
    args = p.parse_args()
    if args.one:
        m, n = (int(v) for v in args.one.split("x"))
        print(json.dumps(measure(m, n, args.device, args.method)))
        return
    rows = []
    for shape in args.shapes:
        run = subprocess.run([sys.executable, __file__, "--one", shape, "--device", args.device, "--method",
                              args.method], capture_output=True, text=True, check=True)
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    table = ["| m x n | method | device | G (GB) | peak above inputs (GB) | in G's | seconds |",
             "|---|---|---|---:|---:|---:|---:|"]
    table += [f"| {r['m']} x {r['n']} | {r['method']} | {r['device']} | {r['gram_bytes'] / 1e9:.2f} | "
              f"{r['peak_extra_bytes'] / 1e9:.2f} | {r['peak_in_grams']:.2f} | {r['seconds']:.1f} |" for r in rows]
    print("\n".join(table))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "factorize_memory.json").write_text(json.dumps(rows, indent=2))
        (out / "factorize_memory.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
