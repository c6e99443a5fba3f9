"""Where a compression's time goes: samples an `svdkit compress` run with py-spy (`pip install py-spy`) and sums
the samples by stage of the walk (the gradient pass, the statistics, the output-gradient Grams, refinement,
adaCR's importance pass, factorizing, ...), with the share spent in Gram products inside each.

    python benchmarks/time_profile.py --out docs/measurements/time_profile -- \\
        --model smollm2-135m --ratio 0.2 --calib wiki --nsamples 32 --seqlen 512 --seed 0

`--raw FILE` summarises an existing `py-spy record --format raw` file instead of running one.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

# (stage, function names that put a sample in it; `caller.callee` names a call), in order of priority
STAGES = [
    ("gradient pass: loss gradient at the head", ("_loss_gradient",)),
    ("gradient pass: backward through the blocks", ("_gradient_pass.block_backward", "_backward_step")),
    ("gradient pass: forward with spilled inputs", ("_gradient_pass",)),
    ("importance pass (adaCR)", ("AdaCR.plan", "Profiler.block_similarity")),
    ("walk: input statistics (both streams through the dense block)", ("block_statistics",)),
    ("walk: output-gradient Grams (backward through the dense block)", ("GramWalker.grams",)),
    ("walk: factorizing", ("_BlockCompressor._factorize_all",)),
    ("walk: refinement", ("BlockRefiner.fit",)),
    ("walk: writing the compressed block", ("_Walk.finish",)),
    ("walk: compressed stream through the compressed block", ("_Walk.live",)),
    ("loading the model and data", ("open_model", "calibration_and_training")),
]
GRAM = "accumulate_gram"


def _functions(stack: str) -> list[str]:
    """Function names of a py-spy raw stack, outermost first (`name (file:line)` -> `name`)."""
    return [re.sub(r" \(.*\)$", "", frame) for frame in stack.split(";")]


def stage_of(names: list[str]) -> str:
    """The first stage (in `STAGES` order) any frame of the sample belongs to, else `other`."""
    calls = set(names) | {f"{a}.{b}" for a, b in zip(names, names[1:], strict=False)}
    for stage, keys in STAGES:
        if calls.intersection(keys):
            return stage
    return "other"


def summarise(raw: Path, rate: int) -> dict:
    """Seconds (samples / rate) per stage, and of those the seconds inside Gram products."""
    seconds, gram = Counter(), Counter()
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        names = _functions(stack)
        stage = stage_of(names)
        seconds[stage] += int(n) / rate
        if GRAM in names:
            gram[stage] += int(n) / rate
    total = sum(seconds.values())
    rows = [{"stage": s, "seconds": round(v, 1), "share": round(v / total, 4), "gram_seconds": round(gram[s], 1)}
            for s, v in seconds.most_common()]
    return {"total_seconds": round(total, 1), "stages": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/time_profile")
    p.add_argument("--rate", type=int, default=20, help="py-spy samples per second")
    p.add_argument("--raw", type=Path, help="summarise this py-spy raw file instead of running a compression")
    p.add_argument("compress_args", nargs=argparse.REMAINDER, help="after --: the svdkit compress arguments")
    args = p.parse_args()
    cmd = [a for a in args.compress_args if a != "--"]
    raw = args.raw
    if raw is None:
        raw = Path(tempfile.mkdtemp()) / "profile.txt"
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(["py-spy", "record", "--rate", str(args.rate), "--format", "raw", "-o", str(raw), "--",
                            sys.executable, "-m", "svdkit", "compress", *cmd, "--out", out, "--overwrite"], check=True)
    result = {"command": "svdkit compress " + " ".join(cmd), "rate": args.rate, **summarise(raw, args.rate)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"`{result['command']}`, sampled by py-spy at {args.rate} Hz: {result['total_seconds']:,.0f} s", "",
             "| stage | s | share | of which Gram products s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['seconds']:,.1f} | {100 * r['share']:.1f} % | {r['gram_seconds']:,.1f} |"
              for r in result["stages"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
