"""Memory and time of `svdkit compress` as models get deeper and wider: the proof that memory does not grow with
depth, measured on random-weight LLaMA checkpoints written block by block (bf16, SmolLM2's tokenizer).

    python benchmarks/scale.py depth  --depths 48 96 192 384            # hidden 512, intermediate 1792, 8/2 heads
    python benchmarks/scale.py width  --widths 1024 2048 4096           # 2 blocks, LLaMA-3-8B proportions
    python benchmarks/scale.py capped --depth 384 --cap-mb 1024         # inside a cgroup (v1) memory cap
    python benchmarks/scale.py svd-route --shapes 1024x3584 4096x14336  # gesdd against eigh of the smaller Gram
    python benchmarks/scale.py checkpoint --work /tmp/llama-1b --layers 16 --vocab 128256  # a LLaMA-3.2-1B shape

Every measurement is one `svdkit compress --method M --ratio 0.4 --nsamples 8 --seqlen 512
--max-shard-size 64MB` (`--method`, default svdllm; `ada-kfac` adds the gradient pass) in its own process under
`/usr/bin/time` (peak RSS, wall time); the split into factorization and the rest comes from the report it writes.
Results are merged into `--out/scale.json` and `--out/scale.md` (a series replaces the same series of the same
method). Run on an otherwise idle machine; the checkpoints go to `--work` (the 384-block one is 2.7 GB) and are
deleted after each run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("benchmarks.scale")

VOCAB = 49152  # SmolLM2's tokenizer
SHARD = "64MB"  # output shards (the writer streams them; 2GB is the command's default)


def llama_config(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int, vocab: int = VOCAB):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                       tie_word_embeddings=True, dtype="bfloat16", bos_token_id=1, eos_token_id=2)


def write_checkpoint(path: Path, config, seed: int = 0) -> int:
    """A random-weight checkpoint written one block at a time (never the whole model in memory); returns its
    bytes. Linear weights ~ N(0, 1/in_features), norms 1, embeddings N(0, 0.02): activations with structure."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from svdkit.models import embedded_folder
    from svdkit.shards import ShardWriter

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(path, "model", max_shard_bytes=512 * 2**20)
    prefix = "model.layers."

    def random(name: str, shape: torch.Size) -> torch.Tensor:
        if "norm" in name:
            return torch.ones(shape, dtype=torch.bfloat16)
        std = 0.02 if "embed" in name else 1.0 / math.sqrt(shape[-1])
        return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)

    state = {k: v for k, v in skeleton.state_dict().items() if k != "lm_head.weight"}
    writer.add({k: random(k, v.shape) for k, v in state.items() if not k.startswith(prefix)})
    for i in range(config.num_hidden_layers):
        writer.add({k: random(k, v.shape) for k, v in state.items() if k.startswith(f"{prefix}{i}.")})
    files = writer.finish()
    config.save_pretrained(path)
    src = embedded_folder("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, path / name)
    return sum(f.stat().st_size for f in files if f.suffix == ".safetensors")


# `--code DIR` runs another checkout's svdkit (e.g. a commit before a change); `--legacy` for one that predates
# the --scratch and --threads options (its scratch then goes to TMPDIR, which is watched the same way)
RUN = {"code": None, "legacy": False, "tag": "", "shard": SHARD}


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def compress_run(ckpt: Path, out: Path, method: str, cgroup: str | None = None, extra: list[str] | None = None
                 ) -> dict:
    """One `svdkit compress` in its own process: peak RSS and wall time (GNU time), the peak bytes of its scratch
    folder (sampled every half second), and the report's split."""
    scratch = out.parent / f"{out.name}-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    cmd = [sys.executable, "-m", "svdkit", "compress", "--model", str(ckpt), "--method", method, "--ratio", "0.4",
           "--calib", "wiki", "--nsamples", "8", "--seqlen", "512", "--out", str(out), "--overwrite",
           "--max-shard-size", RUN["shard"], *([] if RUN["legacy"] else ["--scratch", str(scratch)]), *(extra or [])]
    timed = ["/usr/bin/time", "-f", "SVDKIT_TIME %M %e", *cmd]
    if cgroup is not None:  # run inside the cgroup: the shell joins it, then execs the command
        timed = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *timed]
    env = {**os.environ, "TQDM_DISABLE": "1", "TMPDIR": str(scratch)}
    if RUN["code"]:
        env["PYTHONPATH"] = str(RUN["code"])
    peak, done, trace, child = [0], threading.Event(), [], {}
    t0 = time.perf_counter()

    def watch() -> None:  # scratch bytes every half second; the process tree's RSS every 10 s (a coarse timeline)
        n = 0
        while not done.wait(0.5):
            peak[0] = max(peak[0], _tree_bytes(scratch))
            n += 1
            if n % 20 == 0 and "pid" in child:
                trace.append((round(time.perf_counter() - t0), round(_tree_rss(child["pid"]) / 2**20)))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        popen = subprocess.Popen(timed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        child["pid"] = popen.pid
        stdout, stderr = popen.communicate()
        proc = subprocess.CompletedProcess(timed, popen.returncode, stdout, stderr)
    finally:
        done.set()
        watcher.join()
    (out.parent / f"{out.name}.log").write_text(proc.stderr)  # svdkit's log, to place the RSS timeline's phases
    line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("SVDKIT_TIME")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"svdkit compress failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    _, rss_kb, wall = line.split()
    report = json.loads((out / "svdkit_report.json").read_text())
    factorizing = sum(m["seconds"] for m in report["matrices"])
    left = _tree_bytes(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"method": method, "tag": RUN["tag"], "peak_rss_mb": int(rss_kb) / 1024, "wall_s": float(wall),
            "compress_s": report["seconds"], "factorize_s": factorizing, "output_bytes": _folder_bytes(out),
            "peak_scratch_bytes": peak[0], "scratch_left_bytes": left, "rss_trace_s_mb": trace}


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (Linux /proc), 0 once it is gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            total += next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:")), 0)
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(_tree_rss(int(c)) for c in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def depth_series(args) -> list[dict]:
    rows = []
    for layers in args.depths:
        cfg = llama_config(512, 1792, 8, 2, layers)
        ckpt, out = args.work / f"depth-{layers}", args.work / f"depth-{layers}-out"
        t0 = time.perf_counter()
        size = write_checkpoint(ckpt, cfg)
        log.info("depth %d: checkpoint %.2f GB written in %.0f s", layers, size / 1e9, time.perf_counter() - t0)
        row = {"series": "depth", "layers": layers, "hidden": 512, "intermediate": 1792, "checkpoint_bytes": size,
               **compress_run(ckpt, out, args.method)}
        row["rss_over_checkpoint"] = row["peak_rss_mb"] * 2**20 / size
        log.info("depth %d: %s", layers, row)
        rows.append(row)
        shutil.rmtree(ckpt)
        shutil.rmtree(out)
    return rows


WIDTHS = {1024: (3584, 8, 2), 2048: (7168, 16, 4), 4096: (14336, 32, 8)}  # LLaMA-3-8B proportions


def width_series(args) -> list[dict]:
    rows = []
    for hidden in args.widths:
        inter, heads, kv = WIDTHS[hidden]
        cfg = llama_config(hidden, inter, heads, kv, args.layers, args.vocab)
        ckpt, out = args.work / f"width-{hidden}", args.work / f"width-{hidden}-out"
        size = write_checkpoint(ckpt, cfg)
        row = {"series": "width", "layers": args.layers, "hidden": hidden, "intermediate": inter, "vocab": args.vocab,
               "checkpoint_bytes": size, **compress_run(ckpt, out, args.method)}
        row["seconds_per_block"] = row["compress_s"] / args.layers
        log.info("width %d: %s", hidden, row)
        rows.append(row)
        shutil.rmtree(ckpt)
        shutil.rmtree(out)
    return rows


def checkpoint(args) -> list[dict]:
    """Only write a random-weight LLaMA of the given shape to `--work` (e.g. for benchmarks/inference.py)."""
    cfg = llama_config(args.hidden, args.intermediate, args.heads, args.kv_heads, args.layers, args.vocab)
    size = write_checkpoint(args.work, cfg)
    log.info("wrote %s: %.2f GB, %.2fB parameters", args.work, size / 1e9, size / 2e9)
    return []


def capped(args) -> list[dict]:
    """One run inside a cgroup v1 memory cap smaller than the checkpoint (needs root)."""
    cgroup = Path("/sys/fs/cgroup/memory") / f"svdkit-scale-{os.getpid()}"
    cfg = llama_config(512, 1792, 8, 2, args.depth)
    ckpt, out = args.work / f"capped-{args.depth}", args.work / f"capped-{args.depth}-out"
    size = write_checkpoint(ckpt, cfg)
    cap = args.cap_mb * 2**20
    if cap >= size:
        raise SystemExit(f"the cap ({args.cap_mb} MB) must be smaller than the checkpoint ({size / 2**20:.0f} MB)")
    cgroup.mkdir()
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(cap))
        swap = cgroup / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(cap))  # no escape into swap either
        row = {"series": "capped", "layers": args.depth, "hidden": 512, "intermediate": 1792,
               "checkpoint_bytes": size, "cap_bytes": cap, **compress_run(ckpt, out, args.method, str(cgroup))}
        row["cgroup_max_usage_bytes"] = int((cgroup / "memory.max_usage_in_bytes").read_text())
        row["cgroup_failcnt"] = int((cgroup / "memory.failcnt").read_text())
    finally:
        cgroup.rmdir()
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    log.info("capped: %s", row)
    return [row]


def svd_route(args) -> list[dict]:
    """Time a float64 `gesdd` of an m x n matrix (m <= n) against the eigendecomposition of its smaller Gram
    `A A^T` (m x m), which gives the same U, s and V = A^T U / s, and report how far the two disagree."""
    rows = []
    torch.manual_seed(0)
    for shape in args.shapes:
        m, n = (int(v) for v in shape.split("x"))
        # A whitened weight: decaying spectrum, so the tail is small as it is in practice
        a = torch.randn(m, n, dtype=torch.float64) @ torch.diag(torch.logspace(0, -4, n, dtype=torch.float64))
        t0 = time.perf_counter()
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        t_svd = time.perf_counter() - t0
        t0 = time.perf_counter()
        evals, evecs = torch.linalg.eigh(a @ a.T)
        s2 = evals.flip(0).clamp_min(0).sqrt()
        u2 = evecs.flip(1)
        vh2 = (u2.T @ a) / s2[:, None]
        t_eig = time.perf_counter() - t0
        k = int(0.6 * m * n / (m + n))  # the rank at ratio 0.4
        approx_svd = (u[:, :k] * s[:k]) @ vh[:k]
        approx_eig = (u2[:, :k] * s2[:k]) @ vh2[:k]
        rows.append({"series": "svd-route", "m": m, "n": n, "gesdd_s": t_svd, "eigh_gram_s": t_eig,
                     "speedup": t_svd / t_eig, "rank": k,
                     "sigma_rel_diff": float(((s - s2).abs() / s).max()),
                     "truncation_rel_diff": float(torch.linalg.norm(approx_svd - approx_eig) / torch.linalg.norm(a))})
        log.info("svd route %s: %s", shape, rows[-1])
    return rows


def _cap(row: dict) -> str:
    return f"{row['cap_bytes'] / 2**20:,.0f}" if row.get("cap_bytes") else "-"


def _scratch(row: dict) -> str:
    return f"{row['peak_scratch_bytes'] / 2**20:,.0f}" if "peak_scratch_bytes" in row else "-"


def _method(row: dict) -> str:
    return row.get("method", "svdllm")  # rows measured before the method was recorded ran svdllm


def markdown(rows: list[dict]) -> str:
    out = []
    depth = [r for r in rows if r["series"] in ("depth", "capped")]
    if depth:
        out += ["| method | code | blocks | checkpoint GB | cap MB | peak RSS MB | RSS / checkpoint | "
                "peak scratch MB | wall s | compress s | factorizing s |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {_method(r)} | {r.get('tag') or '-'} | {r['layers']} | {r['checkpoint_bytes'] / 1e9:.2f} | "
                f"{_cap(r)} | {r['peak_rss_mb']:,.0f} | {r['peak_rss_mb'] * 2**20 / r['checkpoint_bytes']:.2f} | "
                f"{_scratch(r)} | {r['wall_s']:.0f} | {r['compress_s']:.0f} | {r['factorize_s']:.0f} |" for r in depth]
    width = [r for r in rows if r["series"] == "width"]
    if width:
        out += ["", "| method | code | hidden | blocks | vocab | checkpoint GB | peak RSS MB | peak scratch MB | "
                "s per block | factorizing s (share) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {_method(r)} | {r.get('tag') or '-'} | {r['hidden']} | {r['layers']} | {r.get('vocab', VOCAB):,} | "
                f"{r['checkpoint_bytes'] / 1e9:.2f} | {r['peak_rss_mb']:,.0f} | {_scratch(r)} | "
                f"{r['compress_s'] / r['layers']:.0f} | {r['factorize_s']:.0f} "
                f"({100 * r['factorize_s'] / r['compress_s']:.0f} %) |" for r in width if "compress_s" in r]
        out += [f"\n{_method(r)}, width {r['hidden']}, {r['layers']} blocks: {r.get('note', 'no timing')}"
                for r in width if "compress_s" not in r]  # a run stopped by hand: its note says what was measured
    route = [r for r in rows if r["series"] == "svd-route"]
    if route:
        out += ["", "| matrix | gesdd s | eigh of A A^T s | speed-up | max rel. singular value diff | "
                "rank-k truncation diff |", "|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r['m']} x {r['n']} | {r['gesdd_s']:.2f} | {r['eigh_gram_s']:.2f} | {r['speedup']:.1f}x | "
                f"{r['sigma_rel_diff']:.1e} | {r['truncation_rel_diff']:.1e} |" for r in route]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["depth", "width", "capped", "svd-route", "checkpoint"])
    parser.add_argument("--out", type=Path, default=Path("docs/measurements"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/svdkit-scale"))
    parser.add_argument("--depths", type=int, nargs="+", default=[48, 96, 192, 384])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096], choices=sorted(WIDTHS))
    parser.add_argument("--depth", type=int, default=384)
    parser.add_argument("--cap-mb", type=int, default=1024)
    parser.add_argument("--method", default="svdllm", help="the --method of every svdkit compress run")
    parser.add_argument("--layers", type=int, default=2, help="blocks of the width series' models (and checkpoint's)")
    parser.add_argument("--hidden", type=int, default=2048, help="checkpoint: hidden size")
    parser.add_argument("--intermediate", type=int, default=8192, help="checkpoint: MLP width")
    parser.add_argument("--heads", type=int, default=32, help="checkpoint: attention heads")
    parser.add_argument("--kv-heads", type=int, default=8, help="checkpoint: key/value heads")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary of the width series' models (LLaMA-3: "
                        "128256; the tokenizer stays SmolLM2's, so calibration uses its first 49,152 ids)")
    parser.add_argument("--shard", default=SHARD, help="--max-shard-size of the compress runs")
    parser.add_argument("--code", type=Path, default=None, help="run the svdkit of this checkout (PYTHONPATH)")
    parser.add_argument("--legacy", action="store_true", help="that checkout predates --scratch and --threads")
    parser.add_argument("--tag", default="", help="a label kept with the rows (e.g. before / after)")
    parser.add_argument("--shapes", nargs="+", default=["1024x3584", "2048x7168", "4096x14336"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    RUN.update(code=args.code, legacy=args.legacy, tag=args.tag, shard=args.shard)
    rows = {"depth": depth_series, "width": width_series, "capped": capped, "svd-route": svd_route,
            "checkpoint": checkpoint}[args.what](args)
    if not rows:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scale.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    def key(r: dict) -> tuple:  # a new row replaces the same series' row of the same method, tag and model shape
        width = r.get("hidden") if r["series"] == "width" else None
        return r["series"], _method(r), r.get("tag", ""), r.get("layers"), r.get("vocab", VOCAB), width

    series = {key(r) for r in rows}
    kept = [r for r in old["rows"] if key(r) not in series]
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}, "rows": kept + rows}
    path.write_text(json.dumps(result, indent=1))
    (args.out / "scale.md").write_text(markdown(result["rows"]))
    print(markdown(rows))


if __name__ == "__main__":
    main()
