"""Time `LowRankLinear` against a dense `nn.Linear` forward: when does `k (m + n) < m n` pay off in wall time?

    python benchmarks/lowrank_linear.py --out runs/lowrank_linear            # full grid (a few minutes on 2 cores)
    python benchmarks/lowrank_linear.py --out /tmp/ll --quick                # small grid, short timings

Shapes are SmolLM2-135M's (576x576 attention, 576->1536 and 1536->576 MLP) plus a 4096x4096 (7B-class) case; ranks
follow the compression ratio R as `floor((1 - R) m n / (m + n))`, so the factors hold (1 - R) of the dense parameters.
`--round 16` adds rows with each rank rounded down to a multiple of 16. `--layout row column` times `W_u` stored
row-major (`out x rank` contiguous) and column-major (svdkit's default since it ran faster at batch 1).
`--stream-mb 256` cycles through copies of each matrix holding that many megabytes, so that weights come from memory
as in a decode step (a single small matrix otherwise stays in the CPU caches and flatters both sides).
The `rule` column is `svdkit.speed.low_rank_pays` for that shape, rank and token count.
Writes `lowrank_linear.json` (every measurement) and `lowrank_linear.md` (a table) under `--out`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import platform
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from svdkit.modules import LowRankLinear
from svdkit.speed import low_rank_pays

log = logging.getLogger("benchmarks.lowrank_linear")

SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096)]  # (in_features, out_features)
RATIOS = [0.2, 0.4, 0.6]
TOKENS = [1, 8, 512]


def rank_for(in_features: int, out_features: int, ratio: float) -> int:
    """The rank whose two factors hold `(1 - ratio)` of the dense matrix's parameters."""
    return max(1, math.floor((1 - ratio) * in_features * out_features / (in_features + out_features)))


def time_call(fns: list, x: torch.Tensor, min_run_time: float) -> tuple[float, float]:
    """(best, median) seconds per call of `fn(x)`, cycling through `fns` (copies of one layer); torch.utils.benchmark
    handles warm-up and CUDA synchronisation. The best block is the robust figure on a shared machine, where other
    processes inflate the median."""
    timer = benchmark.Timer(stmt="for fn in fns: fn(x)", globals={"fns": fns, "x": x},
                            num_threads=torch.get_num_threads())
    for fn in fns:
        fn(x)  # warm-up (and, for a compiled module, compilation for this shape)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return min(m.times) / len(fns), m.median / len(fns)


def copies(make, nbytes: int, stream_mb: float) -> list:
    """Enough modules from `make()` to hold `stream_mb` megabytes (at least one)."""
    return [make() for _ in range(max(1, int(stream_mb * 2**20 / nbytes)))]


def make_dense(in_f: int, out_f: int, device: str, dtype: torch.dtype) -> nn.Linear:
    return nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).eval()


def make_low_rank(in_f: int, out_f: int, rank: int, layout: str, device: str, dtype: torch.dtype) -> LowRankLinear:
    """A random `LowRankLinear` with `W_u` column-major (svdkit's layout) or row-major."""
    layer = LowRankLinear(in_f, out_f, rank, device=device, dtype=dtype).eval()
    return row_major_u(layer) if layout == "row" else layer


def row_major_u(layer: LowRankLinear) -> LowRankLinear:
    """The same layer with `W_u` stored row-major (`out x rank` contiguous), the layout before svdkit 0.1's change."""
    layer.u.weight = nn.Parameter(layer.u.weight.detach().contiguous())
    return layer


def compiled(module: nn.Module) -> object | None:
    """`torch.compile(module)` if compiling works on this machine, else None (logged)."""
    weight = next(module.parameters())
    try:
        fn = torch.compile(module, dynamic=False)
        with torch.inference_mode():
            fn(torch.zeros(2, module.in_features, dtype=weight.dtype, device=weight.device))
        return fn
    except Exception as e:  # inductor needs a working C++ (CPU) or Triton (CUDA) toolchain
        log.warning("torch.compile unavailable (%s: %s); timing eager only", type(e).__name__, str(e).splitlines()[0])
        return None


def run(args: argparse.Namespace) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    rows = []
    for device in devices:
        for in_f, out_f in args.shapes:
            torch.manual_seed(0)
            nbytes = in_f * out_f * dtype.itemsize
            dense = copies(functools.partial(make_dense, in_f, out_f, device, dtype), nbytes, args.stream_mb)
            ranks = []
            for ratio in args.ratios:
                rank = rank_for(in_f, out_f, ratio)
                ranks.append((ratio, rank))
                if args.round > 1 and rank >= args.round and rank % args.round:
                    ranks.append((ratio, rank - rank % args.round))
            for ratio, rank in ranks:
                for layout in args.layout:
                    make = functools.partial(make_low_rank, in_f, out_f, rank, layout, device, dtype)
                    low = copies(make, rank * (in_f + out_f) * dtype.itemsize, args.stream_mb)
                    for mode in modes:
                        if mode == "compile":
                            torch._dynamo.reset()
                            fd, fl = [compiled(m) for m in dense], [compiled(m) for m in low]
                            if any(f is None for f in fd + fl):
                                modes = ["eager"]
                                continue
                        else:
                            fd, fl = dense, low
                        for tokens in args.tokens:
                            x = torch.randn(tokens, in_f, device=device, dtype=dtype)
                            with torch.inference_mode():
                                t_dense = time_call(fd, x, args.min_run_time)
                                t_low = time_call(fl, x, args.min_run_time)
                            row = {
                                "device": device,
                                "mode": mode,
                                "dtype": args.dtype,
                                "layout": layout,
                                "in_features": in_f,
                                "out_features": out_f,
                                "ratio": ratio,
                                "rank": rank,
                                "tokens": tokens,
                                "copies": len(low),
                                "flops_fraction": rank * (in_f + out_f) / (in_f * out_f),
                                "rule_pays": low_rank_pays(out_f, in_f, rank, tokens=tokens),
                                "dense_us": t_dense[0] * 1e6,
                                "lowrank_us": t_low[0] * 1e6,
                                "dense_median_us": t_dense[1] * 1e6,
                                "lowrank_median_us": t_low[1] * 1e6,
                                "speedup": t_dense[0] / t_low[0],
                            }
                            rows.append(row)
                            log.info(
                                "%s %s %dx%d R=%.1f k=%d %s-major u, T=%d: dense %.1f us, low-rank %.1f us (x%.2f)",
                                device, mode, in_f, out_f, ratio, rank, layout, tokens, row["dense_us"],
                                row["lowrank_us"], row["speedup"],
                            )  # fmt: skip
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# LowRankLinear vs nn.Linear forward",
        "",
        f"torch {meta['torch']}, {meta['threads']} threads, {meta['cpu']}; dtype {meta['dtype']}; "
        "best block of torch.utils.benchmark's blocked_autorange (medians in the JSON). `k(m+n)/mn` is the "
        "low-rank share of the dense FLOPs and parameters; speedup > 1 means the low-rank forward is faster; rule: "
        f"what svdkit.speed.low_rank_pays predicts. Weights streamed from {meta['stream_mb']} MB of copies.",
        "",
        "| device | mode | u layout | in -> out | R | rank | k(m+n)/mn | tokens | dense (us) | low-rank (us) | speedup "
        "| rule |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['mode']} | {r['layout']} | {r['in_features']} -> {r['out_features']} | "
            f"{r['ratio']:.1f} | "
            f"{r['rank']} | {r['flops_fraction']:.2f} | {r['tokens']} | {r['dense_us']:.1f} | {r['lowrank_us']:.1f} | "
            f"{r['speedup']:.2f} | {'low rank' if r['rule_pays'] else 'dense'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output folder for lowrank_linear.json / .md")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    p.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in SHAPES], help="IN x OUT, e.g. 576x1536")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile timings")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="small grid and short timings, for a smoke run")
    p.add_argument("--layout", nargs="+", default=["column", "row"], choices=["column", "row"],
                   help="memory layout of W_u: column-major (svdkit's default) and/or row-major")
    p.add_argument("--round", type=int, default=16, help="also time each rank rounded down to a multiple of this")
    p.add_argument("--stream-mb", type=float, default=256.0,
                   help="megabytes of copies of each matrix to cycle through (0: one copy, cache-resident)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    if args.quick:
        args.shapes, args.tokens, args.min_run_time = args.shapes[:3], [1, 512], 0.1
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "dtype": args.dtype,
        "stream_mb": args.stream_mb,
    }
    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lowrank_linear.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "lowrank_linear.md").write_text(markdown(rows, meta))
    log.info("wrote %s", args.out / "lowrank_linear.md")


if __name__ == "__main__":
    main()
