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
`--round-ranks M` rounds the synthetic ranks to multiples of M within the same parameter budget (`svdkit.speed`).
`--fuse` gives the low-rank pairs that read one input (q/k/v, gate/up) one stacked `W_v` (`svdkit.fused`).

The memory-bound limit: a batch-1 decode step has to read every weight once (the input embedding table only where
it is not tied to `lm_head`) plus the KV cache, so at the machine's read bandwidth (measured once per run as the
best large matrix-vector product, `--bandwidth-gb-s` to give it) it cannot be faster than `bandwidth / bytes` steps
per second. Each row reports the bytes a decode step reads (the cache at the middle of the decode), that bound in
tokens per second, and the measured decode speed as a percentage of it; the Markdown also gives decode and prefill
speed against the dense row of the same batch and context. The low-rank cache also rebuilds keys (compute, not
bytes), which the bound does not count; `low-rank-values` caches full keys and only the (folded) value latents.
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
from transformers.cache_utils import DynamicCache, StaticCache

import svdkit
from svdkit.kvcache import (
    CACHE_KINDS,
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
from svdkit.speed import round_ranks

log = logging.getLogger("benchmarks.inference")
# static: transformers' StaticCache, preallocated for context + new tokens (no per-step concatenation of the cache)
KINDS = (*CACHE_KINDS, "static")


# --------------------------------------------------------------------------------------------- synthetic compression
def rank_for(in_features: int, out_features: int, ratio: float) -> int:
    """The rank whose two factors hold `(1 - ratio)` of the dense matrix's parameters."""
    return max(1, math.floor((1 - ratio) * in_features * out_features / (in_features + out_features)))


@torch.no_grad()
def synthetic_compress(model: nn.Module, ratio: float, multiple: int = 1, random: bool = False) -> nn.Module:
    """Replace every decoder-block linear by its truncated SVD at `ratio` (in place): a stand-in compressed model;
    `multiple > 1` rounds the ranks to multiples of it within the same parameter budget. `random=True` takes random
    factors of the same shapes instead (speed depends on shapes and dtype only; no SVD of large matrices)."""
    _, blocks = find_blocks(model)
    shapes = {f"{i}.{name}": tuple(weight_matrix(linear).shape)
              for i, block in enumerate(blocks) for name, linear in block_linears(block).items()}
    ranks = {key: rank_for(n, m, ratio) for key, (m, n) in shapes.items()}
    if multiple > 1:
        ranks = round_ranks(shapes, ranks, multiple)
    for i, block in enumerate(blocks):
        for name, linear in block_linears(block).items():
            w = weight_matrix(linear)
            rank = ranks[f"{i}.{name}"]
            if random:
                m, n = w.shape
                low = LowRankLinear.from_factors((torch.randn(m, rank) / rank**0.5).to(w.dtype),
                                                 (torch.randn(rank, n) / n**0.5).to(w.dtype), linear.bias)
            else:
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
    if kind == "normal":
        cache = DynamicCache(config=model.config)
    elif kind == "static":
        cache = StaticCache(config=model.config, max_cache_len=context + new_tokens)
    else:  # low-rank: key and value latents; low-rank-values: full keys, value latents (values folded in both)
        cache = LowRankKVCache(model, keys="latent" if kind == "low-rank" else "full")
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


def prepare(name: str, ratio: float, dtype: str, device: str, multiple: int = 1, fuse: bool = False,
            random: bool = False) -> nn.Module:
    """Load `name` and, for `ratio > 0`, replace its decoder linears by truncated SVDs (ranks rounded to `multiple`;
    sibling pairs fused with `fuse`; random factors of the same shapes with `random`)."""
    model, _ = svdkit.load_model(name, dtype=dtype, device=device)
    if ratio > 0:
        synthetic_compress(model, ratio, multiple, random)
    if fuse and any(isinstance(m, LowRankLinear) for m in model.modules()):
        svdkit.fuse_shared_inputs(model)
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


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once; an untied input embedding table only by rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is not emb.weight:
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def decode_bytes(model: nn.Module, per_token: int, batch: int, context: int, new_tokens: int) -> int:
    """Bytes one decode step reads: the weights, plus each sequence's KV cache (`per_token` bytes a token) at the
    middle of the decode."""
    return weight_bytes(model) + round(per_token * batch * (context + new_tokens / 2))


@torch.inference_mode()
def read_bandwidth(device: str, dtype: str, megabytes: int = 256, repeats: int = 5) -> float:
    """The machine's read bandwidth in bytes/s as decode sees it: the best of `repeats` matrix-vector products with
    a `megabytes` weight matrix (far beyond the caches), with the current thread count."""
    dt = getattr(torch, dtype)
    side = int((megabytes * 2**20 / dt.itemsize) ** 0.5)
    w = torch.randn(side, side, dtype=dt, device=device)
    x = torch.randn(1, side, dtype=dt, device=device)
    best = math.inf
    for _ in range(repeats + 1):
        _sync(torch.device(device))
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        _sync(torch.device(device))
        best = min(best, time.perf_counter() - t0)
    return w.numel() * w.element_size() / best


def add_bounds(rows: list[dict], bandwidth: float) -> None:
    """Each row's memory-bound decode limit (tok/s) and its measured decode speed as a percentage of it."""
    for r in rows:
        r["decode_bound_tok_s"] = r["batch"] * bandwidth / r["decode_bytes_per_step"]
        r["decode_pct_of_bound"] = 100 * r["decode_tok_s"] / r["decode_bound_tok_s"] if r["decode_tok_s"] else None


def measure(
    model: nn.Module, label: str, ratio: float, kind: str, batch: int, context: int, new_tokens: int, repeats: int = 1
) -> dict:
    """One benchmark row (best prefill and best decode over `repeats` runs, highest memory peak); raises
    `LowRankKVError` when the low-rank cache does not apply (dense k/v)."""
    if kind not in ("normal", "static"):
        enable_low_rank_kv_cache(model)
    try:
        run_once(model, kind, 1, 16, 2)  # warm-up: first-call allocations and lazy initialisation
        runs = [run_once(model, kind, batch, context, new_tokens) for _ in range(repeats)]
    finally:
        disable_low_rank_kv_cache(model)
    per_token = cache_bytes_per_token(model, "normal" if kind == "static" else kind)  # StaticCache holds the same
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
        "cache_bytes_per_token": per_token,
        "decode_bytes_per_step": decode_bytes(model, per_token, batch, context, new_tokens),
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
    model = prepare(name, ratio, opts["dtype"], opts["device"], opts["round_ranks"], opts["fuse"],
                    opts["random_factors"])
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
    opts = {k: getattr(args, k) for k in ("threads", "dtype", "device", "new_tokens", "repeats", "round_ranks", "fuse",
                                          "random_factors")}
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
                loaded[name, ratio] = prepare(name, ratio, args.dtype, args.device, args.round_ranks, args.fuse,
                                              args.random_factors)
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


def _row(rows: list[dict], r: dict, ratio: float, kv_cache: str) -> dict | None:
    """The row of the same model, batch and context as `r` with this ratio and KV cache."""
    for d in rows:
        same = all(d[k] == r[k] for k in ("model", "batch", "context"))
        if same and d["ratio"] == ratio and d["kv_cache"] == kv_cache:
            return d
    return None


def markdown(rows: list[dict], meta: dict) -> str:
    bw, multiple = meta.get("bandwidth_gb_s"), meta.get("round_ranks", 1)
    extra = (f", read bandwidth {bw:.1f} GB/s" if bw else "") + (
        f", ranks rounded to multiples of {multiple}" if multiple > 1 else "") + (
        ", sibling pairs fused (q/k/v, gate/up)" if meta.get("fuse") else "")
    lines = [
        "# Inference throughput and memory",
        "",
        f"torch {meta['torch']}, device {meta['device']}, {meta['threads']} threads, dtype {meta['dtype']}{extra}. "
        "Prefill: one forward over batch x context tokens; decode: greedy steps with the cache (best of the "
        "repeats). Bound: the memory-bound decode limit, read bandwidth / bytes read per step (weights + KV cache); "
        "% bound: measured decode speed against it. x dense: against the dense row (normal cache) of the same "
        "batch and context (bytes: what the bytes read per step allow); x normal cache: the low-rank cache against "
        "the normal one at the same ratio. Peak memory is the process RSS (CPU) or the CUDA "
        "allocator peak; delta is above the state before the run. KV bytes/token is per sequence, summed over layers.",
        "",
        "| model | R | params (M) | KV cache | batch | context | prefill tok/s | x dense | decode tok/s | x dense "
        "| x dense (bytes) | x normal cache | bound tok/s | % bound | ms/step | peak MB | delta MB | KV MB "
        "| KV bytes/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = _row(rows, r, 0.0, "normal")
        n = _row(rows, r, r["ratio"], "normal")
        x_normal = f"{r['decode_tok_s'] / n['decode_tok_s']:.2f}" if n and r["decode_tok_s"] else "-"
        decode = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        step = f"{r['decode_ms_per_step']:.1f}" if r["decode_ms_per_step"] else "-"
        x_prefill = f"{r['prefill_tok_s'] / d['prefill_tok_s']:.2f}" if d else "-"
        x_decode = f"{r['decode_tok_s'] / d['decode_tok_s']:.2f}" if d and r["decode_tok_s"] else "-"
        x_bytes = f"{d['decode_bytes_per_step'] / r['decode_bytes_per_step']:.2f}" if d else "-"
        bound = f"{r['decode_bound_tok_s']:.1f}" if r.get("decode_bound_tok_s") else "-"
        pct = f"{r['decode_pct_of_bound']:.0f}" if r.get("decode_pct_of_bound") else "-"
        lines.append(
            f"| {r['model']} | {r['ratio']} | {r['params'] / 1e6:.1f} | {r['kv_cache']} | {r['batch']} | "
            f"{r['context']} | {r['prefill_tok_s']:.0f} | {x_prefill} | {decode} | {x_decode} | {x_bytes} | "
            f"{x_normal} | {bound} | "
            f"{pct} | {step} | {r['peak_mem_mb']:.0f} | {r['peak_mem_delta_mb']:.0f} | {r['kv_cache_mb']:.1f} | "
            f"{r['cache_bytes_per_token']} |"
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
    p.add_argument("--kv-cache", nargs="+", default=["normal", "low-rank"], choices=list(KINDS),
                   help="normal; low-rank (key and value latents, values folded); low-rank-values (full keys); "
                   "static (transformers' preallocated StaticCache)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--round-ranks", type=int, default=1, metavar="M",
                   help="round synthetic ranks to multiples of M within the same parameter budget (1: off)")
    p.add_argument("--random-factors", action="store_true",
                   help="synthetic models get random factors of the ranks' shapes (speed only: no SVD to wait for)")
    p.add_argument("--fuse", action="store_true",
                   help="fuse the low-rank pairs that share an input (svdkit.fuse_shared_inputs)")
    p.add_argument("--bandwidth-gb-s", type=float, default=None,
                   help="read bandwidth for the memory-bound column (default: measured once at the start)")
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
        "round_ranks": args.round_ranks,
        "fuse": args.fuse,
    }
    bandwidth = args.bandwidth_gb_s * 1e9 if args.bandwidth_gb_s else read_bandwidth(args.device, args.dtype)
    meta["bandwidth_gb_s"] = bandwidth / 1e9
    log.info("read bandwidth %.1f GB/s", bandwidth / 1e9)
    rows = run_all(args)
    add_bounds(rows, bandwidth)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "inference.md").write_text(markdown(rows, meta))
    log.info("wrote %s", args.out / "inference.md")


if __name__ == "__main__":
    main()
