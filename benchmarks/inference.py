"""Prefill and decode throughput and peak memory of a dense or compressed model, with the normal or low-rank KV cache.

    python benchmarks/inference.py --out runs/inference                                   # SmolLM2-135M, full grid
    python benchmarks/inference.py --out /tmp/inf --synthetic-ratio 0 0.4 0.6 \\
        --batch 1 --context 512 --new-tokens 16                                           # quick dense vs 40 %/60 %

`--models` takes anything `svdkit.load_model` accepts (an embedded name, a dense or svdkit-compressed folder).
`--synthetic-ratio R` replaces every decoder linear by its plain truncated SVD at ratio R (rank
`floor((1 - R) m n / (m + n))`) so that speed can be measured before a real compressed model exists; 0 keeps the
model as loaded. Each configuration runs one prefill of `batch x context` random tokens, then `--new-tokens` greedy
decode steps, both through the model's forward with an explicit cache. Each configuration runs in a fresh process
(`--no-isolate` to reuse one), so its peak memory, the process RSS sampled during the run (CPU) or
`torch.cuda.max_memory_allocated` (CUDA), is its own; the KV cache's own size is reported exactly.
Writes `inference.json` and `inference.md` under `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import multiprocessing as mp
import platform
import threading
import time
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

import svdkit
from svdkit.kvcache import (
    LowRankKVCache,
    LowRankKVError,
    cache_argument,
    cache_bytes_per_token,
    cache_nbytes,
    disable_low_rank_kv_cache,
    enable_low_rank_kv_cache,
)
from svdkit.models import block_linears, find_blocks, weight_matrix
from svdkit.modules import LowRankLinear

log = logging.getLogger("benchmarks.inference")


# --------------------------------------------------------------------------------------------- synthetic compression
def rank_for(in_features: int, out_features: int, ratio: float) -> int:
    """The rank whose two factors hold `(1 - ratio)` of the dense matrix's parameters."""
    return max(1, math.floor((1 - ratio) * in_features * out_features / (in_features + out_features)))


@torch.no_grad()
def synthetic_compress(model: nn.Module, ratio: float) -> nn.Module:
    """Replace every decoder-block linear by its truncated SVD at `ratio` (in place): a stand-in compressed model."""
    _, blocks = find_blocks(model)
    for block in blocks:
        for name, linear in block_linears(block).items():
            w = weight_matrix(linear)
            out_f, in_f = w.shape
            rank = rank_for(in_f, out_f, ratio)
            u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
            root = s[:rank].sqrt()
            low = LowRankLinear.from_factors(
                (u[:, :rank] * root).to(w.dtype), (root[:, None] * vh[:rank]).to(w.dtype), linear.bias
            )
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, low)
    return model


# --------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory over a `with` block: CUDA allocator peak, or the process RSS sampled every `interval` s."""

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = self.peak = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())


def _rss() -> int:
    """Resident set size of this process in bytes (psutil, else /proc)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_once(model: nn.Module, kind: str, batch: int, context: int, new_tokens: int, seed: int = 0) -> dict:
    """One prefill of `batch x context` random tokens, then `new_tokens` greedy decode steps; times and memory."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(seed)).to(device)
    cache = LowRankKVCache(model) if kind == "low-rank" else DynamicCache(config=model.config)
    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        arg = {cache_argument(model): cache}
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **arg)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, use_cache=True, **arg)
        _sync(device)
        t2 = time.perf_counter()
    prefill, decode = t1 - t0, t2 - t1
    return {
        "prefill_s": prefill,
        "prefill_tok_s": batch * context / prefill,
        "decode_s": decode,
        "decode_tok_s": batch * new_tokens / decode if new_tokens else None,
        "decode_ms_per_step": 1e3 * decode / new_tokens if new_tokens else None,
        "peak_mem_mb": mem.peak / 2**20,
        "peak_mem_delta_mb": (mem.peak - mem.baseline) / 2**20,
        "kv_cache_mb": cache_nbytes(cache) / 2**20,
    }


def prepare(name: str, ratio: float, dtype: str, device: str) -> nn.Module:
    """Load `name` and, for `ratio > 0`, replace its decoder linears by truncated SVDs."""
    model, _ = svdkit.load_model(name, dtype=dtype, device=device)
    if ratio > 0:
        synthetic_compress(model, ratio)
    with torch.no_grad():  # own every tensor: safetensors mmaps the file, whose touched pages would count as RSS
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    _release_freed_memory()
    return model


def _release_freed_memory() -> None:
    """Return freed heap to the OS (glibc `malloc_trim`), so RSS tracks live memory, not the SVD step's leftovers."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(
    model: nn.Module, label: str, ratio: float, kind: str, batch: int, context: int, new_tokens: int, repeats: int = 1
) -> dict:
    """One benchmark row (best prefill and best decode over `repeats` runs, highest memory peak); raises
    `LowRankKVError` when the low-rank cache does not apply (dense k/v)."""
    if kind == "low-rank":
        enable_low_rank_kv_cache(model)
    try:
        run_once(model, kind, 1, 16, 2)  # warm-up: first-call allocations and lazy initialisation
        runs = [run_once(model, kind, batch, context, new_tokens) for _ in range(repeats)]
    finally:
        disable_low_rank_kv_cache(model)
    res = dict(runs[0])
    for r in runs[1:]:
        if r["prefill_s"] < res["prefill_s"]:
            res.update({k: r[k] for k in ("prefill_s", "prefill_tok_s")})
        if new_tokens and r["decode_s"] < res["decode_s"]:
            res.update({k: r[k] for k in ("decode_s", "decode_tok_s", "decode_ms_per_step")})
        res["peak_mem_mb"] = max(res["peak_mem_mb"], r["peak_mem_mb"])
        res["peak_mem_delta_mb"] = max(res["peak_mem_delta_mb"], r["peak_mem_delta_mb"])
    row = {
        "model": label,
        "ratio": ratio,
        "kv_cache": kind,
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "params": sum(p.numel() for p in model.parameters()),
        "cache_bytes_per_token": cache_bytes_per_token(model, kind),
        **res,
    }
    log.info(
        "%s R=%s %s B=%d ctx=%d: prefill %.0f tok/s, decode %.1f tok/s, peak %.0f MB (+%.0f), KV %.1f MB",
        label, ratio, kind, batch, context, row["prefill_tok_s"], row["decode_tok_s"] or 0,
        row["peak_mem_mb"], row["peak_mem_delta_mb"], row["kv_cache_mb"],
    )  # fmt: skip
    return row


def _isolated(config: tuple, opts: dict) -> dict | str:
    """Worker for `--isolate`: a fresh process per row, so its peak RSS is that configuration's alone."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    name, ratio, kind, batch, context = config
    model = prepare(name, ratio, opts["dtype"], opts["device"])
    try:
        return measure(model, name, ratio, kind, batch, context, opts["new_tokens"], opts["repeats"])
    except LowRankKVError as e:
        return str(e)


def run_all(args: argparse.Namespace) -> list[dict]:
    configs = [
        (name, ratio, kind, batch, context)
        for name in args.models
        for ratio in args.synthetic_ratio
        for kind in args.kv_cache
        for batch in args.batch
        for context in args.context
    ]
    opts = {k: getattr(args, k) for k in ("threads", "dtype", "device", "new_tokens", "repeats")}
    rows, skipped, loaded = [], set(), {}
    for config in configs:
        name, ratio, kind, batch, context = config
        if (name, ratio, kind) in skipped:
            continue
        if args.isolate:
            pool = mp.get_context("spawn").Pool(1, maxtasksperchild=1)
            try:
                row = pool.apply(_isolated, (config, opts))
            finally:
                pool.close()
                pool.join()
        else:
            if (name, ratio) not in loaded:
                loaded.clear()
                gc.collect()
                loaded[name, ratio] = prepare(name, ratio, args.dtype, args.device)
            try:
                row = measure(loaded[name, ratio], name, ratio, kind, batch, context, args.new_tokens, args.repeats)
            except LowRankKVError as e:
                row = str(e)
        if isinstance(row, str):
            log.info("%s R=%s: %s KV cache skipped (%s)", name, ratio, kind, row)
            skipped.add((name, ratio, kind))
        else:
            rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Inference throughput and memory",
        "",
        f"torch {meta['torch']}, device {meta['device']}, {meta['threads']} threads, dtype {meta['dtype']}. "
        "Prefill: one forward over batch x context tokens; decode: greedy steps with the cache (best of the "
        "repeats). Peak memory is the process RSS (CPU) or the CUDA allocator peak; delta is above the state "
        "before the run. KV bytes/token is per sequence, summed over layers.",
        "",
        "| model | R | params (M) | KV cache | batch | context | prefill tok/s | decode tok/s | ms/step "
        "| peak MB | delta MB | KV MB | KV bytes/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        decode = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        step = f"{r['decode_ms_per_step']:.1f}" if r["decode_ms_per_step"] else "-"
        lines.append(
            f"| {r['model']} | {r['ratio']} | {r['params'] / 1e6:.1f} | {r['kv_cache']} | {r['batch']} | "
            f"{r['context']} | {r['prefill_tok_s']:.0f} | {decode} | {step} | {r['peak_mem_mb']:.0f} | "
            f"{r['peak_mem_delta_mb']:.0f} | {r['kv_cache_mb']:.1f} | {r['cache_bytes_per_token']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output folder for inference.json / .md")
    p.add_argument("--models", nargs="+", default=["smollm2-135m"], help="names or folders for svdkit.load_model")
    p.add_argument("--synthetic-ratio", type=float, nargs="+", default=[0.0], metavar="R",
                   help="truncated-SVD every decoder linear at ratio R first (0: the model as loaded)")  # fmt: skip
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--context", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps after the prefill")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration; the best times are kept")
    p.add_argument("--kv-cache", nargs="+", default=["normal", "low-rank"], choices=["normal", "low-rank"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    no_isolate = "run all configurations in this process (faster; peak RSS becomes a running maximum)"
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help=no_isolate)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "isolated": args.isolate,
    }
    rows = run_all(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "inference.md").write_text(markdown(rows, meta))
    log.info("wrote %s", args.out / "inference.md")


if __name__ == "__main__":
    main()
