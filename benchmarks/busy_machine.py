"""Factorizing time on a busy machine: one compression alone, then two identical ones at once, each in its own
process; the slowdown is each concurrent run's factorizing seconds over the lone run's.

On 2 cores two CPU-bound jobs should each run about 2x slower. OpenMP threads that spin while they wait, and
processes that each start one thread per core, made float64 factorizations 26-48x slower instead; svdkit lets
waiting threads sleep (`OMP_WAIT_POLICY=PASSIVE`, `svdkit.threads`). Run it with `OMP_WAIT_POLICY=ACTIVE` in the
environment to see the spinning behaviour with today's code.

    python benchmarks/busy_machine.py --out docs/measurements [--code OTHER_CHECKOUT --tag before]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["compress", "--model", "smollm2-135m", "--method", "svdllm", "--ratio", "0.4", "--calib", "wiki",
        "--nsamples", "8", "--seqlen", "256"]


def start(out: Path, code: str | None) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if code:
        env["PYTHONPATH"] = code
    return subprocess.Popen([sys.executable, "-m", "svdkit", *ARGS, "--out", str(out), "--overwrite"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, out: Path) -> dict:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"svdkit compress failed:\n{err[-3000:]}")
    report = json.loads((out / "svdkit_report.json").read_text())
    return {"compress_s": report["seconds"], "factorize_s": sum(m["seconds"] for m in report["matrices"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/measurements"))
    p.add_argument("--code", default=None, help="run the svdkit of this checkout (PYTHONPATH)")
    p.add_argument("--tag", default="", help="a label kept with the row (e.g. before / after)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        alone = finish(start(work / "alone", args.code), work / "alone")
        alone["wall_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        procs = [start(work / f"pair{k}", args.code) for k in (0, 1)]
        pair = [finish(proc, work / f"pair{k}") for k, proc in enumerate(procs)]
        wall = time.perf_counter() - t0
    row = {"tag": args.tag, "command": "svdkit " + " ".join(ARGS), "cores": os.cpu_count(), "alone": alone,
           "pair": pair, "pair_wall_s": wall,
           "factorize_slowdown": [r["factorize_s"] / alone["factorize_s"] for r in pair]}
    print(json.dumps(row, indent=1))
    path = args.out / "busy_machine.json"
    rows = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r.get("tag") != args.tag]
    rows.append(row)
    path.write_text(json.dumps(rows, indent=1))
    lines = ["| code | factorizing s alone | factorizing s, two at once | slowdown | compress s alone / at once |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        pair = " / ".join(f"{x['factorize_s']:.1f}" for x in r["pair"])
        slow = " / ".join(f"{s:.1f}x" for s in r["factorize_slowdown"])
        both = " / ".join(f"{x['compress_s']:.0f}" for x in r["pair"])
        lines.append(f"| {r['tag'] or '-'} | {r['alone']['factorize_s']:.1f} | {pair} | {slow} | "
                     f"{r['alone']['compress_s']:.0f} / {both} |")
    (args.out / "busy_machine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
