"""Zero-shot accuracy of SmolLM2-135M (dense, and any compressed variants) on svdkit's offline cloze task.

    python benchmarks/zeroshot_smollm2.py --out runs/zeroshot                          # dense, all 500 items
    python benchmarks/zeroshot_smollm2.py --out runs/zs --limit 100 --models smollm2-135m runs/svdllm-0.2

`--models` takes embedded names, Hugging Face folders or folders written by `svdkit.save` (compressed models
load with their `LowRankLinear` layers). The task is smoke-level (see docs/zeroshot.md), not a paper benchmark.
Writes `zeroshot.json` (every result, with timings and machine details) and `zeroshot.md` (a table) under `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from svdkit.evaluation.zeroshot import DEFAULT_TASK, zero_shot
from svdkit.models import count_parameters, load_model

log = logging.getLogger("benchmarks.zeroshot_smollm2")


def label(name_or_path: str) -> str:
    """A short row label: the embedded name, or the folder's name."""
    return Path(name_or_path).name if os.path.isdir(name_or_path) else name_or_path


def evaluate_model(name_or_path: str, args: argparse.Namespace) -> dict:
    """Load one model and run the tasks on it; returns a JSON-ready record."""
    start = time.perf_counter()
    model, tok = load_model(name_or_path, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - start
    params = count_parameters(model)
    log.info("%s: %s parameters, loaded in %.1f s", name_or_path, f"{params['total']:,}", load_s)
    result = zero_shot(
        model, tok, args.tasks, limit=args.limit, batch_size=args.batch_size, include_path=args.include_path
    )
    return {
        "model": name_or_path,
        "label": label(name_or_path),
        "parameters": params,
        "load_seconds": round(load_s, 2),
        **result,
    }


def markdown(records: list[dict], tasks: list[str]) -> str:
    """One row per model: parameters, acc (acc_norm) per task, average acc, evaluation time."""
    header = ["model", "parameters", *[f"{t} acc (acc_norm)" for t in tasks], "avg acc", "items/task", "eval s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        cells = [r["label"], f"{r['parameters']['total'] / 1e6:.1f} M"]
        n = set()
        for t in tasks:
            res = r["tasks"].get(t, {})
            acc, norm, err = res.get("acc"), res.get("acc_norm"), res.get("acc_stderr")
            n.add(res.get("samples"))
            text = "n/a" if acc is None else f"{acc:.3f}" + (f" ± {err:.3f}" if err is not None else "")
            cells.append(text + (f" ({norm:.3f})" if norm is not None else ""))
        avg = r["average_acc"]
        items = ", ".join(str(x) for x in sorted(n, key=str))
        cells += ["n/a" if avg is None else f"{avg:.3f}", items, f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for zeroshot.json and zeroshot.md")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"], help="embedded names or model folders")
    parser.add_argument("--tasks", nargs="+", default=[DEFAULT_TASK], help="lm-eval task names")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--include-path", default=None, help="folder of extra task YAML files")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    records = [evaluate_model(m, args) for m in args.models]
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    with open(args.out / "zeroshot.json", "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "machine": machine, "results": records}, f, indent=2)
    table = markdown(records, args.tasks)
    (args.out / "zeroshot.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
