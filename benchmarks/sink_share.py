"""Where a block's output norm sits: for each decoder block of a model, the share of the targets' squared norm
held by the first token of each window (an attention sink) and by the largest token, and the block's update
`||y - x||^2` relative to `||y||^2`. Explains what refinement's `relative` loss fits (docs/results.md).

    python benchmarks/sink_share.py --model smollm2-135m --windows 4 --out docs/measurements/sink_share
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import svdkit
from svdkit.blocks import Blocks
from svdkit.stream import capture


def shares(model_name: str, windows: int, seqlen: int, seed: int) -> list[dict]:
    """One row per block: first-token share, largest-token share and update share of the squared norm."""
    model, tok = svdkit.load_model(model_name)
    calib = svdkit.calibration("wiki", tok, n=windows, seqlen=seqlen, seed=seed)
    blocks = Blocks(model)
    x = capture(blocks, calib, windows)
    rows = []
    with torch.no_grad():
        for i, block in enumerate(blocks.list):
            y = x.run(block)
            h, d = y.hidden[0].float(), y.hidden[0].float() - x.hidden[0].float()
            norm = (h**2).sum(-1)  # (windows, seqlen)
            rows.append({"block": i, "first_token": float(norm[:, 0].sum() / norm.sum()),
                         "largest_token": float(norm.max(-1).values.sum() / norm.sum()),
                         "update": float((d**2).sum() / norm.sum())})
            x = y
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/sink_share")
    args = p.parse_args()
    rows = shares(args.model, args.windows, args.seqlen, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": vars(args), "blocks": rows}, indent=1) + "\n")
    lines = [f"{args.model}, {args.windows} x {args.seqlen} tokens of wiki train (seed {args.seed}): share of each "
             "block output's squared norm", "", "| block | first token | largest token | update ||y - x||^2 |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['block']} | {r['first_token']:.3f} | {r['largest_token']:.3f} | {r['update']:.4f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
