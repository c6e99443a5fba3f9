"""One process against several: wall time, where it goes, peak memory, and whether the factors agree, for one
`svdkit compress` run (by default SmolLM2-135M, svdllm at 0.4, 64 x 512 wiki calibration tokens).

    python benchmarks/distributed.py --out results/distributed --procs 1 2 --threads 1

Each measurement is `svdkit compress ... --nproc N` (torchrun on this machine, gloo on CPU) in its own process
tree under `/usr/bin/time` (wall time; peak RSS of the largest process), with `OMP_NUM_THREADS=--threads` in
every process, so N processes use N x threads cores; the compressed model is then evaluated (PTB and wiki,
seqlen 512, --max-windows windows each) by the same processes. The report svdkit writes splits the time into
factorizing (summed over ranks) and the rest (forward passes, Gram statistics, all-reduce, allocation,
writing). Every run's factor products W_u W_v are compared with the first run's. Writes distributed.json and
distributed.md to --out. Run it on an otherwise idle machine with at least max(procs) x threads cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def products(folder: Path) -> dict[str, torch.Tensor]:
    """Every low-rank matrix of a saved folder as W_u W_v in float64 (the factors' signs are not unique)."""
    from svdkit.io import tensor_index

    index = tensor_index(folder)
    t = index.read(index.names())
    return {k[: -len(".u.weight")]: t[k].double() @ t[k[: -len(".u.weight")] + ".v.weight"].double()
            for k in t if k.endswith(".u.weight")}


def measure(args: argparse.Namespace, nproc: int, out: Path) -> dict:
    """One `svdkit compress` with `nproc` processes; its wall time, peak RSS and the report's time split."""
    cmd = [sys.executable, "-m", "svdkit", "compress", "--model", args.model, "--method", args.method,
           "--ratio", str(args.ratio), "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen",
           str(args.seqlen), "--seed", "0", "--format", "svdkit", "--out", str(out), "--nproc", str(nproc),
           "--eval", "ptb,wiki", "--eval-seqlen", "512", "--max-windows", str(args.max_windows)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    run = subprocess.run(["/usr/bin/time", "-f", "WALL %e RSS %M", *cmd], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    wall, rss = re.findall(r"WALL ([\d.]+) RSS (\d+)", run.stderr)[-1]
    report = json.loads((out / "svdkit_report.json").read_text())
    factorize = sum(m["seconds"] for m in report["matrices"])
    return {"procs": nproc, "threads_per_proc": args.threads, "wall_s": float(wall),
            "compress_s": report["seconds"], "factorize_s_summed": factorize,
            "other_s": report["seconds"] - factorize / nproc, "peak_rss_mb": int(rss) / 1024,
            "ppl": {k: v["ppl"] for k, v in report["perplexity"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="svdllm")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--max-windows", type=int, default=40, help="evaluation windows per corpus (PTB, wiki)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, first = [], None
    with tempfile.TemporaryDirectory(dir=args.out) as work:
        for n in args.procs:
            folder = Path(work) / f"p{n}"
            row = measure(args, n, folder)
            prods = products(folder)
            if first is None:
                first = prods
            row["max_rel_diff_vs_first"] = max(
                float((prods[k] - first[k]).norm() / first[k].norm()) for k in first)
            rows.append(row)
            shutil.rmtree(folder)
            print(json.dumps(row), flush=True)
    base = rows[0]["wall_s"]
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "command": " ".join(sys.argv), "model": args.model, "method": args.method, "ratio": args.ratio,
            "calibration": f"{args.nsamples} x {args.seqlen} {args.calib}"}
    (args.out / "distributed.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    lines = [f"`{meta['command']}` ({meta['machine']}, torch {meta['torch']}; {meta['calibration']})", "",
             "| processes x threads | wall s | speed-up | compress s | factorizing s (summed over ranks) | "
             "rest s (compress - factorizing / N) | peak RSS MB (largest process) | max rel. diff of W_u W_v | "
             "PTB / wiki ppl |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['procs']} x {r['threads_per_proc']} | {r['wall_s']:.1f} | {base / r['wall_s']:.2f}x | "
                     f"{r['compress_s']:.1f} | {r['factorize_s_summed']:.1f} | {r['other_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['max_rel_diff_vs_first']:.1e} | "
                     f"{r['ppl']['ptb']:.4f} / {r['ppl']['wiki']:.4f} |")
    (args.out / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
