"""Mean and spread over calibration seeds: merge the results.json of several same-protocol sweeps (one per
seed) into one JSON of raw rows and one Markdown table. A source may also be an earlier output of this script
(its rows keep their seeds), so new sweeps can be added to a merge whose sweep folders are gone. A sweep with
`--train-nsamples N` labels its methods `SPEC [train N]`.

    python benchmarks/seeds.py results/q17-seed0 results/q17-seed1 results/q17-seed2 \
        --out docs/measurements/q17_seeds --methods svdllm,adasvd,...
    python benchmarks/seeds.py docs/measurements/q17_seeds.json results/q17-seed2 --out docs/measurements/q17_seeds
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

PROTOCOL = ("model", "calib", "nsamples", "seqlen", "eval", "eval_seqlen", "max_windows")


def load(folders: list[str]) -> tuple[dict, list[dict]]:
    """Every run of every folder, each tagged with its seed; the protocols must agree except for the seed. Two
    sources with the same seed must not both hold a (method, ratio) pair."""
    rows, proto, seen = [], None, set()
    for folder in folders:
        path = Path(folder)
        path = path if path.is_file() else path / "results.json"  # a sweep folder, or a results JSON itself
        res = json.loads(path.read_text(encoding="utf-8"))
        merged = "protocol" in res  # this script's own output: rows tagged with their seeds
        cfg = {k: (res["protocol"] if merged else res["config"])[k] for k in PROTOCOL}
        if proto is None:
            proto = cfg
        elif cfg != proto:
            raise SystemExit(f"{folder}: protocol {cfg} differs from {proto}")
        train = None if merged else res["config"].get("train_nsamples")  # refinement's windows, when more
        for r in res["runs"]:
            if train and r["method"] != "dense":
                r = {**r, "method": f"{r['method']} [train {train}]"}
            seed = r["seed"] if merged else res["config"]["seed"]
            key = (r["method"], r["ratio"], seed)
            if r["method"] != "dense" and key in seen:
                raise SystemExit(f"{path}: {r['method']} @ {r['ratio']:g} seed {seed} is in two sources")
            seen.add(key)
            rows.append({**r, "seed": seed})
    return proto or {}, rows


def fmt(x: float) -> str:
    if not math.isfinite(x):
        return "nan"
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def summarize(rows: list[dict], methods: list[str] | None, data: list[str]) -> list[dict]:
    """Per (method, ratio): seeds, mean, min, max and sample standard deviation of each perplexity."""
    order = methods or list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for m in order:
        for ratio in sorted({r["ratio"] for r in rows if r["method"] == m}):
            runs = sorted((r for r in rows if r["method"] == m and r["ratio"] == ratio), key=lambda r: r["seed"])
            entry = {"method": m, "ratio": ratio, "seeds": [r["seed"] for r in runs],
                     "params_total": runs[0]["params_total"],
                     "seconds_mean": statistics.fmean(r["seconds"] for r in runs)}
            ft = [r.get("extra", {}).get("finetune", {}).get("seconds") for r in runs]
            if all(f is not None for f in ft):
                entry["finetune_seconds_mean"] = statistics.fmean(ft)
            for d in data:
                vals = [r["ppl"][d] for r in runs]
                entry[d] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
                            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals}
            out.append(entry)
    return out


def markdown(proto: dict, summary: list[dict], data: list[str]) -> str:
    head = (f"Protocol: {proto.get('model')}, calibration {proto.get('nsamples')} x {proto.get('seqlen')} tokens of "
            f"{proto.get('calib')} (one draw per seed), perplexity at seqlen {proto.get('eval_seqlen')} over "
            f"{proto.get('max_windows')} windows of each test split. Mean over the seeds, then min-max.\n\n")
    cols = ["method", "ratio", "seeds"] + [f"{d} mean (min-max)" for d in data] + ["parameters", "compression s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for e in summary:
        cells = [f"`{e['method']}`", f"{e['ratio']:g}", ",".join(map(str, e["seeds"]))]
        cells += [f"{fmt(e[d]['mean'])} ({fmt(e[d]['min'])}-{fmt(e[d]['max'])})" for d in data]
        cells += [f"{e['params_total'] / 1e6:.1f}M", f"{e['seconds_mean']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="sweep output folders (or their results JSON files), one per seed")
    p.add_argument("--out", required=True, help="path without extension: writes .json and .md")
    p.add_argument("--methods", default="", help="comma-separated methods, in table order (default: all)")
    args = p.parse_args()
    proto, rows = load(args.folders)
    methods = [m for m in args.methods.split(",") if m] or None
    rows = [r for r in rows if r["method"] != "dense"]
    summary = summarize(rows, methods, proto["eval"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"protocol": proto, "summary": summary, "runs": rows}, indent=1),
                                        encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(proto, summary, proto["eval"]), encoding="utf-8")
    print(markdown(proto, summary, proto["eval"]))


if __name__ == "__main__":
    main()
