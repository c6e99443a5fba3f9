"""`svdkit sweep`: compress and evaluate every (method, ratio) pair, reuse one-shot statistics, and write
results.json, a Markdown table and a perplexity-vs-ratio plot."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._fs import Scratch
from .blocks import Blocks
from .data import calibration_and_training, load_text, tokenize
from .dist import progress_bar, world
from .errors import ConfigError, SvdkitError
from .evaluation import evaluate_corpora
from .io import open_streamed
from .layout import count_parameters
from .methods import parse_method
from .models import cache_dir, load_model, open_model, resolve_device
from .pipeline import compress_to, quantize_to
from .quant import parse_quant, stored_bytes
from .report import fmt_ppl
from .stats_cache import StatsCache, stats_key

log = logging.getLogger(__name__)


@dataclass
class SweepConfig:
    """What a sweep runs: methods (specs such as `adasvd:tau=0`) x ratios, on one calibration set."""

    model: str = "smollm2-135m"
    methods: list[str] = field(default_factory=lambda: ["svd", "svdllm"])
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.4])
    calib: str = "wiki"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    train_nsamples: int | None = None  # windows refinement and fine-tuning train on (None: the calibration ones)
    eval: list[str] = field(default_factory=lambda: ["ptb", "wiki"])
    eval_seqlen: int = 512
    max_windows: int | None = 40
    out: str = "results"
    cache: bool = True
    dense: bool = True  # evaluate the uncompressed model as the first row
    device: str | None = None
    dtype: str = "auto"
    activations: str = "auto"
    batch_size: int = 4  # evaluation batch size
    quantize: list[str] = field(default_factory=list)  # also quantize each model: specs such as `gptq:bits=4`
    resume: bool = False  # keep the finished pairs of an existing results.json with the same protocol
    overwrite: bool = False  # replace an existing results.json
    zeroshot: list[str] = field(default_factory=list)  # lm-eval tasks run on each model (loaded whole, rank 0)
    zeroshot_limit: int | None = None  # items per task (None: all)


# What must match for runs of an earlier sweep to be reused by `resume` (a results.json from before a field existed
# counts as that field's default).
PROTOCOL = ("model", "dtype", "calib", "nsamples", "seqlen", "seed", "train_nsamples", "eval", "eval_seqlen",
            "max_windows", "zeroshot", "zeroshot_limit")


class SweepError(SvdkitError, ValueError):
    """An existing results folder that cannot be continued or replaced as asked."""


def _previous_runs(cfg: SweepConfig, path: Path) -> list[dict]:
    """The runs of an earlier sweep in `path` to keep: none, or all of them when resuming the same protocol."""
    if not path.exists():
        return []
    if cfg.overwrite:
        return []
    if not cfg.resume:
        raise SweepError(f"{path} already exists: pass --resume to continue that sweep or --overwrite to replace it")
    old = json.loads(path.read_text(encoding="utf-8"))
    now, defaults = asdict(cfg), asdict(SweepConfig())
    diff = [k for k in PROTOCOL if old["config"].get(k, defaults[k]) != now[k]]
    if diff:
        was = ", ".join(f"{k}={old['config'].get(k, defaults[k])!r}" for k in diff)
        raise SweepError(f"cannot resume {path}: it was run with {was}")
    return old["runs"]


def _write_json(path: Path, obj) -> None:
    if not world().main:  # only rank 0 writes files
        return
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _is_dense(method: str) -> bool:
    """Rows of the uncompressed model (`dense`, and `dense+gptq-4` for its quantized copies)."""
    return method == "dense" or method.startswith("dense+")


def _mb(run: dict) -> str:
    return f"{run['bytes'] / 1e6:.1f}" if run.get("bytes") else ""


def markdown_table(results: dict) -> str:
    """Rows: methods; columns: ratio x data set (perplexity); then parameters kept, stored bytes and
    compression time. Dense rows repeat their one value under every ratio."""
    cfg = results["config"]
    runs = results["runs"]
    ratios = sorted({r["ratio"] for r in runs if not _is_dense(r["method"])})
    header = ["method"] + [f"{ratio:g} {d}" for ratio in ratios for d in cfg["eval"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        if _is_dense(r["method"]):
            lines.append(f"| {r['method']} | " + " | ".join(fmt_ppl(r["ppl"][d]) for _ in ratios for d in cfg["eval"])
                         + " |")
    methods = list(dict.fromkeys(r["method"] for r in runs if not _is_dense(r["method"])))
    for m in methods:
        cells = []
        for ratio in ratios:
            run = next((r for r in runs if r["method"] == m and r["ratio"] == ratio), None)
            cells += [fmt_ppl(run["ppl"][d]) if run else "" for d in cfg["eval"]]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| method | ratio | " + " | ".join(cfg["eval"]) + " | parameters kept | decoder linears removed "
              "| stored MB | compression s | non-finite windows |",
              "|---|---|" + "---|" * len(cfg["eval"]) + "---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['method']} | {r['ratio']:g} | " + " | ".join(fmt_ppl(r["ppl"][d]) for d in cfg["eval"])
                     + f" | {r['params_total']:,} | {100 * r['linear_removed']:.1f}% | {_mb(r)} "
                     f"| {r['seconds']:.1f} | {r['nonfinite_windows']} |")
    lines += _zeroshot_table(runs)
    proto = (f"Protocol: {cfg['model']}, calibration {cfg['nsamples']} x {cfg['seqlen']} tokens of {cfg['calib']} "
             f"(seed {cfg['seed']}), perplexity at seqlen {cfg['eval_seqlen']} over "
             f"{cfg['max_windows'] or 'all'} windows of each test split. Stored MB: bytes of the weights "
             f"`svdkit.save` writes (10^6 bytes).")
    return proto + "\n\n" + "\n".join(lines) + "\n"


def _zeroshot_table(runs: list[dict]) -> list[str]:
    """Accuracy (length-normalised in brackets) per task for the rows that were evaluated zero-shot."""
    rows = [r for r in runs if r.get("zeroshot")]
    if not rows:
        return []
    tasks = list(dict.fromkeys(t for r in rows for t in r["zeroshot"]))

    def cell(res: dict | None) -> str:
        if not res or res.get("acc") is None:
            return ""
        return f"{res['acc']:.3f}" + (f" ({res['acc_norm']:.3f})" if res.get("acc_norm") is not None else "")

    lines = ["", "| method | ratio | " + " | ".join(f"{t} acc (acc_norm)" for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']:g} | " + " | ".join(cell(r["zeroshot"].get(t)) for t in tasks)
                     + " |")
    return lines


def plot(results: dict, path: Path) -> None:
    """Perplexity (log scale) against ratio, one panel per data set, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, runs = results["config"], results["runs"]
    fig, axes = plt.subplots(1, len(cfg["eval"]), figsize=(5 * len(cfg["eval"]), 4), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in runs if not _is_dense(r["method"])))
    dense = next((r for r in runs if r["method"] == "dense"), None)
    # One colour and marker per method, so more than ten methods stay distinguishable.
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    style = {m: {"color": cmap(i % cmap.N), "marker": "osD^v<>ph*"[i % 10]} for i, m in enumerate(methods)}
    for ax, d in zip(axes[0], cfg["eval"], strict=True):
        for m in methods:
            pts = sorted((r["ratio"], r["ppl"][d]) for r in runs if r["method"] == m and math.isfinite(r["ppl"][d]))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **style[m])
        if dense:
            ax.axhline(dense["ppl"][d], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("ratio (share of decoder-linear parameters removed)")
        ax.set_ylabel(f"{d} perplexity")
        ax.set_title(f"{cfg['model']}: {d}")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    # Outside the panels: a long legend would hide the curves.
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _validate(cfg: SweepConfig) -> None:
    """Every (method, ratio) pair parses before any work starts."""
    for spec in cfg.methods:
        for ratio in cfg.ratios:
            method = parse_method(spec, ratio=ratio)
            if method.finetune_config is not None and world().active:
                raise ConfigError(f"{spec} fine-tunes the whole model in one process: sweep it without --nproc")
    if cfg.zeroshot:
        from .evaluation.zeroshot import check_tasks

        check_tasks(cfg.zeroshot)  # unknown tasks or a missing lm-eval fail now, not after the first compression
        if cfg.zeroshot_limit is not None and cfg.zeroshot_limit < 1:
            raise ConfigError(f"zeroshot_limit must be a positive number of items (got {cfg.zeroshot_limit})")


class _Sweep:
    """One sweep's state: the dense model, the calibration and test tokens, the runs so far (results.json is
    rewritten after each one) and the scratch folder that holds one compressed model at a time."""

    def __init__(self, cfg: SweepConfig, progress: bool) -> None:
        self.cfg, self.progress, self.w = cfg, progress, world()
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.quants = [parse_quant(q) for q in cfg.quantize]
        self.previous = _previous_runs(cfg, self.out / "results.json")
        self.device = resolve_device(cfg.device or "cpu")
        self.sm = open_model(cfg.model, cfg.dtype)
        self.tok = self.sm.tokenizer
        self.calib, self.train = calibration_and_training(cfg.calib, self.tok, cfg.nsamples, cfg.train_nsamples,
                                                          seqlen=cfg.seqlen, seed=cfg.seed)
        self.texts = {d: tokenize(self.tok, load_text(d, "test")) for d in cfg.eval}
        cache_path = cache_dir() / "stats" / stats_key(Blocks(self.sm, self.device), self.calib) if cfg.cache else None
        self.cache = StatsCache(cache_path) if cfg.cache else None
        self.done = {(r["method"], r["ratio"]) for r in self.previous}
        if self.previous:
            log.info("resuming %s: %d finished runs kept", self.out / "results.json", len(self.previous))
        self.results = {"config": asdict(cfg), "runs": list(self.previous),
                        "stats_cache": str(cache_path) if cache_path else None}
        # The config lists method specs and ratios: leave out dense rows and quantized copies (`spec+gptq-4`).
        compressed = [r for r in self.previous
                      if not _is_dense(r["method"]) and "quantize_seconds" not in (r.get("extra") or {})]
        self.results["config"]["methods"] = list(dict.fromkeys([r["method"] for r in compressed] + cfg.methods))
        self.results["config"]["ratios"] = sorted({r["ratio"] for r in compressed} | set(cfg.ratios))
        self.common = {"device": self.device, "activations": cfg.activations, "progress": False}
        self.info = {"data": cfg.calib, "seed": cfg.seed}

    def evaluate(self, model) -> tuple[dict, int]:
        """Perplexity per corpus, and the count of non-finite windows."""
        cfg = self.cfg
        res = evaluate_corpora(model, self.tok, cfg.eval, seqlen=cfg.eval_seqlen, max_windows=cfg.max_windows,
                               batch_size=cfg.batch_size, texts=self.texts, **self.common)
        return {d: r["ppl"] for d, r in res.items()}, sum(r["nonfinite_windows"] for r in res.values())

    def zeroshot(self, source: str | Path) -> dict:
        """`{"zeroshot": accuracy per task, "zeroshot_seconds"}` of the model in `source` (a folder or the dense
        model's name), loaded whole on rank 0 (lm-eval runs in one process), for every rank; `{}` when not asked."""
        if not self.cfg.zeroshot:
            return {}
        row = None
        if self.w.main:
            from .evaluation.zeroshot import zero_shot

            model, _ = load_model(str(source), dtype=self.cfg.dtype, device=self.device)
            res = zero_shot(model, self.tok, self.cfg.zeroshot, limit=self.cfg.zeroshot_limit, batch_size=8)
            keys = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples")
            row = {"zeroshot": {t: {k: r.get(k) for k in keys} for t, r in res["tasks"].items()},
                   "zeroshot_seconds": res["seconds"]}
        return self.w.broadcast_object(row, 0)

    def add(self, row: dict) -> None:
        self.results["runs"].append(row)
        _write_json(self.out / "results.json", self.results)

    def quantized_rows(self, source: str | Path, label: str, ratio: float, base: dict, scratch: Path) -> None:
        """Quantize `source` (a folder, or the dense model's name) with every requested config, one row each;
        each run opens it anew, since quantizing changes the opened skeleton."""
        for q in self.quants:
            name = f"{label}+{q.name}"
            if (name, ratio) in self.done:
                continue
            t0 = time.perf_counter()
            target = scratch / q.name
            qrep = quantize_to(source, target, q, self.calib, dtype=self.cfg.dtype, calibration_info=self.info,
                               **self.common)
            seconds = time.perf_counter() - t0
            ppl, bad = self.evaluate(open_streamed(target))
            self.add({**base, "method": name, "ppl": ppl, "bytes": qrep.bytes_after["total"],
                      "seconds": base["seconds"] + seconds, "nonfinite_windows": bad,
                      "extra": {**base.get("extra", {}), "quantize_seconds": seconds}, **self.zeroshot(target)})
            log.info("%s @ %g: %s (%d bytes)", name, ratio, {d: fmt_ppl(p) for d, p in ppl.items()},
                     qrep.bytes_after["total"])
            self.w.barrier()  # every rank is done reading it
            if self.w.main:
                shutil.rmtree(target, ignore_errors=True)

    def dense_row(self, scratch: Path) -> None:
        base = next((r for r in self.previous if r["method"] == "dense"), None)
        if base is None:
            ppl, bad = self.evaluate(self.sm)
            base = {"method": "dense", "ratio": 0.0, "ppl": ppl,
                    "params_total": count_parameters(self.sm.model)["total"],
                    "bytes": stored_bytes(self.sm.model)["total"], "linear_removed": 0.0, "seconds": 0.0,
                    "nonfinite_windows": bad}
            base.update(self.zeroshot(self.cfg.model))
            self.results["runs"].append(base)
        self.quantized_rows(self.cfg.model, "dense", 0.0, base, scratch)

    def method_row(self, spec: str, ratio: float, scratch: Path) -> None:
        """Compress a fresh dense model into the scratch folder, evaluate it from disk, quantize it if asked."""
        method = parse_method(spec, ratio=ratio)
        folder = scratch / "model"
        fresh = open_model(self.cfg.model, self.cfg.dtype)  # compression changes the skeleton: start from a dense one
        t0 = time.perf_counter()
        report, _ = compress_to(fresh, folder, method, self.calib, overwrite=True, stats_cache=self.cache,
                                train=self.train, calibration_info=self.info, **self.common)
        seconds = time.perf_counter() - t0
        base = next((r for r in self.previous if (r["method"], r["ratio"]) == (spec, ratio)), None)
        if base is None:
            ppl, bad = self.evaluate(open_streamed(folder))
            base = {"method": spec, "ratio": ratio, "ppl": ppl, "params_total": report.params_after["total"],
                    "bytes": stored_bytes(fresh.model)["total"], "linear_removed": report.linear_ratio,
                    "seconds": seconds, "nonfinite_windows": bad,
                    "extra": {k: v for k, v in report.extra.items() if k != "ratios"}}
            base.update(self.zeroshot(folder))
            self.add(base)
            log.info("%s @ %g: %s (%.0f s)", spec, ratio, {d: fmt_ppl(p) for d, p in ppl.items()}, seconds)
        self.quantized_rows(folder, spec, ratio, base, scratch)
        self.w.barrier()
        if self.w.main:
            shutil.rmtree(folder, ignore_errors=True)

    def pairs(self) -> list[tuple[str, float]]:
        """The (method, ratio) pairs with a row still to compute."""
        labels = [q.name for q in self.quants]
        return [(spec, ratio) for spec in self.cfg.methods for ratio in self.cfg.ratios
                if any((name, ratio) not in self.done for name in [spec] + [f"{spec}+{q}" for q in labels])]


def run_sweep(cfg: SweepConfig, progress: bool = True) -> dict:
    """Run every pair, writing results.json after each one (an interrupted sweep keeps what it did). Every model
    is compressed block by block into a scratch folder beside the results and evaluated block by block on
    `cfg.device` from there, so neither step holds the whole model."""
    _validate(cfg)
    sweep = _Sweep(cfg, progress)
    w, out = sweep.w, sweep.out
    own = Scratch("work", out) if w.main else None  # the models of the sweep, one at a time
    scratch = Path(w.broadcast_object(str(own.path) if own else None, 0))
    try:
        if cfg.dense:
            sweep.dense_row(scratch)
        bar = progress_bar(sweep.pairs(), desc="sweep", unit="run", disable=not progress)
        for spec, ratio in bar:
            bar.set_description(f"sweep: {spec} @ {ratio:g}")
            sweep.method_row(spec, ratio, scratch)
    finally:
        if own is not None:
            own.cleanup()
    _write_json(out / "results.json", sweep.results)
    if w.main:
        (out / "results.md").write_text(markdown_table(sweep.results), encoding="utf-8")
        plot(sweep.results, out / "perplexity.png")
    return sweep.results
