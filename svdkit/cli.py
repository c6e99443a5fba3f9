"""The `svdkit` command line: parses and checks the arguments, then calls the Python API and prints tables.

Arguments are parsed and checked before anything heavy is imported, so `--help` and argument errors answer
at once. Every `SvdkitError` (bad input the user can fix) becomes one line on stderr and exit status 2; any
other exception is a bug and keeps its traceback (`-v` adds debug logging).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ConfigError, OutputError, SvdkitError

log = logging.getLogger("svdkit")

DEFAULT_METHOD = "ada-kfac"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _nonempty_csv(what: str):
    def parse(value: str) -> list[str]:
        items = _csv(value)
        if not items:
            raise argparse.ArgumentTypeError(f"{what} is empty: give at least one")
        return items

    return parse


def _size(value: str) -> int:
    """A size in bytes from `500MB`, `2GB` or a plain number of bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?)?\s*", value, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 500MB or 2GB, got {value!r}")
    unit = (m.group(2) or "B").upper()[:1]
    n = int(float(m.group(1)) * {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30}[unit])
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value!r}")
    return n


def _int_at_least(low: int):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n

    return parse


def _threads(value: str) -> str | int:
    return value if value == "auto" else _int_at_least(1)(value)


def _ratio(value: str) -> float:
    try:
        r = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0.0 <= r < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1) (fraction of parameters removed), got {r}")
    return r


def _ratios(value: str) -> list[float]:
    return [_ratio(v) for v in _nonempty_csv("--ratios")(value)]


MAX_SHARD = 2 * 2**30  # io.MAX_SHARD_BYTES, without importing torch before parsing
DTYPES = ["auto", "float32", "bfloat16", "float16"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded name, local folder or hub id")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="storage dtype of the weights; auto keeps the checkpoint's (default)")
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1, ...")
    p.add_argument("--activations", default="auto", choices=["auto", "device", "host"],
                   help="where calibration and evaluation activations live (auto: the host when they would take "
                        "more than a quarter of the device's free memory)")
    p.add_argument("--threads", type=_threads, default="auto",
                   help="CPU threads: a number, or auto (default): the machine's cores, shared equally by the "
                        "processes of one torchrun; waiting threads sleep, so jobs sharing a machine share its cores")


def _add_calib_args(p: argparse.ArgumentParser, calib_note: str = "") -> None:
    p.add_argument("--calib", default="wiki", help=f"calibration corpus (train split){calib_note}")
    p.add_argument("--nsamples", type=_int_at_least(1), default=64, help="calibration windows")
    p.add_argument("--seqlen", type=_int_at_least(2), default=512, help="calibration window length")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampler")


def _add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=_int_at_least(1), default=1,
                   help="run as this many processes on this machine (starts torchrun for you: gloo on CPU, NCCL with "
                        "one GPU each on cuda); see the README for several machines")


def _relaunch(argv: Sequence[str], nproc: int) -> int:
    """Run the same command under torchrun with `nproc` processes on this machine; returns its exit status."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "svdkit", *rest]
    log.info("starting %d processes: %s", nproc, " ".join(cmd))
    return subprocess.run(cmd).returncode


def _add_eval_args(p: argparse.ArgumentParser, flag: str, default: str | None) -> None:
    p.add_argument(flag, dest="data", default=default, type=_nonempty_csv(flag) if default else _csv,
                   help="comma-separated corpora to evaluate: ptb, wiki, wikitext2, c4, ptb-hf")
    p.add_argument("--eval-seqlen" if flag == "--eval" else "--seqlen", dest="eval_seqlen", type=_int_at_least(2),
                   default=512, help="evaluation window length in tokens")
    p.add_argument("--max-windows", type=_int_at_least(0), default=40, help="evaluate at most this many windows "
                   "(0: all)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="evaluation batch size")


def _print(*args) -> None:
    """Print on the main rank only (every rank runs the same command under torchrun)."""
    if _main_rank():
        print(*args)


def _print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    if not _main_rank():
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right" if h != header[0] else "left")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console().print(table)


# --------------------------------------------------------------------------------------------- checks
def _check_corpora(names: list[str]) -> list[str]:
    """Fail before any model is loaded when a corpus name is unknown."""
    from .data import CORPORA, DataError

    for name in names:
        if name not in CORPORA:
            raise DataError(f"unknown data set {name!r}: expected one of {', '.join(CORPORA)}")
    return names


def _check_out(path: str | None, overwrite: bool) -> None:
    """Refuse an output location that exists (without --overwrite), is a file, or cannot be written: now, not
    after the work."""
    if not path:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"--out {path} is an existing file, not a folder")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"--out {path} already exists and is not empty (pass --overwrite)")
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"--out {path}: {parent} is not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".svdkit-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise OutputError(f"--out {path}: cannot create folders in {parent} ({e.strerror or e})") from None


def _check_json(path: str | None) -> None:
    """Refuse a --json file that could not be written, before the work whose results it would hold."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"--json {path} is a folder, not a file")
    parent = target.absolute().parent
    if not parent.is_dir():
        raise OutputError(f"--json {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise OutputError(f"--json {path}: not writable")


def _need_tokenizer(model, name: str, what: str) -> None:
    """Refuse a model folder without a tokenizer before `what` (evaluation, calibration) needs one."""
    if model.tokenizer is None:
        from .io import LoadError

        raise LoadError(f"{name} has no tokenizer (tokenizer.json, tokenizer_config.json): {what} needs one")


def _device(name: str, distributed: bool = False):
    """The compute device, checked before anything is loaded; under torchrun (`distributed`) this also joins
    the process group and gives this rank its GPU. Commands that run in one process refuse a larger world."""
    from .dist import init_world, launched
    from .models import resolve_device

    device = resolve_device(name)
    if not launched():
        return device
    if not distributed:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ConfigError("this command runs in one process: start it without torchrun (or with one process)")
        return device
    world, device = init_world(device)
    if not world.main:
        logging.getLogger().setLevel(logging.WARNING)
    return device


def _main_rank() -> bool:
    from .dist import world

    return world().main


# --------------------------------------------------------------------------------------------- commands
def _report_eval(results: dict, title: str) -> bool:
    from .report import fmt_ppl

    rows = [(name, r["windows"], r["tokens"], fmt_ppl(r["ppl"]), r["nonfinite_windows"])
            for name, r in results.items()]
    _print_table(title, ["data", "windows", "tokens", "ppl", "non-finite"], rows)
    return all(r["nonfinite_windows"] == 0 for r in results.values())


def _evaluate(model, tok, args: argparse.Namespace, device) -> dict:
    from .evaluation import evaluate_corpora

    return evaluate_corpora(model, tok, args.data, seqlen=args.eval_seqlen, max_windows=args.max_windows or None,
                            batch_size=args.batch_size, device=device, activations=args.activations)


def cmd_eval(args: argparse.Namespace) -> int:
    _check_corpora(args.data)
    _check_json(args.json)
    device = _device(args.device, distributed=True)
    from .layout import count_parameters
    from .models import open_model

    model = open_model(args.model, args.dtype)
    _need_tokenizer(model, args.model, "evaluation")
    params = count_parameters(model.model)
    results = _evaluate(model, model.tokenizer, args, device)
    ok = _report_eval(results, f"{args.model}: perplexity (seqlen {args.eval_seqlen})")
    _print(f"parameters: {params['total']:,} total, {params['block_linears']:,} in decoder-block linears")
    if args.json and _main_rank():
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "parameters": params, "perplexity": results}, f, indent=2)
    if not ok:
        log.error("some windows produced non-finite logits; the perplexities above exclude them")
        return 1
    return 0


def _method(args: argparse.Namespace):
    from .methods import parse_method

    spec = args.method + (("," if ":" in args.method else ":") + ",".join(args.param) if args.param else "")
    return parse_method(spec, ratio=args.ratio)


def cmd_compress(args: argparse.Namespace) -> int:
    method = _method(args)
    qconfig = None
    if args.quantize:
        from .quant import parse_quant

        qconfig = parse_quant(args.quantize)
    if args.ratio == 0 and qconfig is None:
        raise ConfigError("--ratio 0 removes nothing: give a ratio in (0, 1), or --quantize for dense quantization")
    if qconfig is not None and args.format == "transformers":
        raise ConfigError("--format transformers does not hold quantized layers: use --format svdkit (or auto)")
    data_free = args.calib == "none"
    if data_free and (method.needs_data or method.allocation.needs_data or method.refine_config is not None):
        raise ConfigError(f"--calib none: {method.name} needs calibration data (only svd is data-free)")
    if data_free and qconfig is not None and qconfig.needs_data:
        raise ConfigError(f"--calib none: {qconfig.name} needs calibration data (use rtn or a corpus)")
    _check_corpora([*([] if data_free else [args.calib]), *args.data])
    _check_out(args.out, args.overwrite)
    device = _device(args.device, distributed=True)

    from ._fs import Scratch
    from .data import calibration
    from .dist import world
    from .io import REPORT, open_streamed
    from .models import open_model
    from .pipeline import compress_to
    from .speed import RankRules

    model = open_model(args.model, args.dtype)
    if not data_free or args.data:
        _need_tokenizer(model, args.model, "calibration" if not data_free else "evaluation")
    calib = None if data_free else calibration(args.calib, model.tokenizer, n=args.nsamples, seqlen=args.seqlen,
                                               seed=args.seed)
    info = {"data": args.calib, "seed": args.seed, "model": args.model}
    w = world()
    temporary = Scratch("out", args.scratch) if not args.out and w.main else None  # evaluated, not kept
    out = args.out or w.broadcast_object(str(temporary.path) if temporary else None, 0)
    try:
        report, qreport = compress_to(model, out, method, calib, quantize=qconfig, dense=args.dense, format=args.format,
                                      overwrite=args.overwrite or not args.out, device=device,
                                      batch_size=args.calib_batch_size, activations=args.activations,
                                      calibration_info=info, max_shard_bytes=args.max_shard_size,
                                      rank_rules=RankRules(args.round_ranks, args.dense_if_slower, device.type),
                                      scratch=args.scratch or (None if args.out else tempfile.gettempdir()))
        _print_compression(args, method, report, qreport)
        if args.out:
            _print(f"saved to {args.out}")
        ok = True
        if args.data:
            compressed = open_streamed(out)
            results = _evaluate(compressed, compressed.tokenizer, args, device)
            ok = _report_eval(results, f"{method.name} {args.ratio}: perplexity (seqlen {args.eval_seqlen})")
            report.perplexity = results
            if args.out and w.main:
                report.save_json(Path(args.out) / REPORT)
        w.barrier()  # every rank is done reading the folder (never after a failure: the others may be elsewhere)
        return 0 if ok else 1
    finally:
        if temporary is not None:
            temporary.cleanup()


def _print_compression(args, method, report, qreport) -> None:
    b, a = report.params_before, report.params_after
    rows = [
        ("parameters (total)", f"{b['total']:,}", f"{a['total']:,}", f"{100 * (1 - a['total'] / b['total']):.1f}%"),
        ("decoder-block linears", f"{b['block_linears']:,}", f"{a['block_linears']:,}",
         f"{100 * report.linear_ratio:.1f}%"),
    ]
    _print_table(f"{args.model}: {method.name} at ratio {args.ratio} ({report.seconds:.0f} s)",
                 ["", "before", "after", "removed"], rows)
    factorize = sum(m.seconds for m in report.matrices)
    tuned, refined = report.extra.get("finetune"), report.extra.get("refine")
    tuning = tuned["seconds"] if tuned else 0.0
    refining = refined["seconds"] if refined else 0.0
    _print(f"time: {report.seconds:.1f} s in all, {factorize:.1f} s factorizing (summed over ranks), "
           f"{report.seconds - factorize - tuning - refining:.1f} s in forward passes, statistics and allocation"
           + (f", {refining:.1f} s refining blocks ({refined['config']['steps']} steps each)" if refined else "")
           + (f", {tuning:.1f} s fine-tuning ({tuned['config']['steps']} steps x {len(tuned['phases'])} phases)"
              if tuned else ""))
    rules = report.extra.get("rank_rules")
    if rules and rules["multiple"] > 1:
        _print(f"ranks rounded to multiples of {rules['multiple']} within the same parameter budget")
    slow = len(rules["kept_dense"]) if rules else 0
    kept = [m for m in report.matrices if m.rank is None]
    if kept:
        _print(f"kept dense: {len(kept)} matrices (ratio 0"
               + (f"; {slow} because a factor pair would decode slower, see the report)" if slow else ")"))
    if qreport is not None:
        qb, qa = qreport.bytes_before, qreport.bytes_after
        _print_table(f"{args.quantize}: {len(qreport.matrices)} matrices quantized ({qreport.seconds:.0f} s)",
                     ["stored bytes", "before", "after"],
                     [("total", f"{qb['total']:,}", f"{qa['total']:,}"),
                      ("decoder-block linears", f"{qb['block_linears']:,}", f"{qa['block_linears']:,}")])


def cmd_sweep(args: argparse.Namespace) -> int:
    from .methods import parse_method
    from .quant import parse_quant

    _check_corpora([args.calib, *args.data])
    for spec in args.methods:
        for ratio in args.ratios:
            parse_method(spec, ratio=ratio)  # every pair valid before any work
    for q in args.quantize:
        parse_quant(q)
    _check_out(args.out, overwrite=True)  # an existing results.json is checked by the sweep (--resume/--overwrite)
    device = _device(args.device, distributed=True)
    from .sweep import SweepConfig, markdown_table, run_sweep

    cfg = SweepConfig(model=args.model, methods=args.methods, ratios=args.ratios, calib=args.calib,
                      nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, eval=args.data,
                      eval_seqlen=args.eval_seqlen, max_windows=args.max_windows or None, out=args.out,
                      cache=not args.no_cache, dense=not args.no_dense, device=str(device), dtype=args.dtype,
                      activations=args.activations, resume=args.resume, overwrite=args.overwrite,
                      quantize=args.quantize, batch_size=args.batch_size)
    results = run_sweep(cfg)
    _print(markdown_table(results))
    _print(f"wrote {args.out}/results.json, results.md and perplexity.png")
    return 0 if all(r["nonfinite_windows"] == 0 for r in results["runs"]) else 1


def _fmt_acc(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    _check_json(args.json)
    device = _device(args.device)
    from .evaluation.zeroshot import zero_shot
    from .models import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=device)
    res = zero_shot(model, tok, args.tasks, limit=args.limit or None, batch_size=args.batch_size,
                    include_path=args.include_path, offline=True if args.offline else None)
    rows = [(name, r["samples"], _fmt_acc(r.get("acc"), r.get("acc_stderr")),
             _fmt_acc(r.get("acc_norm"), r.get("acc_norm_stderr"))) for name, r in res["tasks"].items()]
    if len(rows) > 1 and res["average_acc"] is not None:
        rows.append(("average", "", f"{res['average_acc']:.3f}", ""))
    _print_table(f"{args.model}: zero-shot accuracy ({res['seconds']:.0f} s)", ["task", "items", "acc", "acc_norm"],
                 rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "zeroshot": res}, f, indent=2)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    device = _device(args.device)
    from .generation import generate_text
    from .kvcache import cache_bytes_per_token
    from .models import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=device, device_map=args.device_map,
                            offload_folder=args.offload_folder)
    if tok is None:
        raise ConfigError(f"{args.model} has no tokenizer to encode the prompt")
    text = generate_text(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, kv_cache=args.kv_cache)
    print(args.prompt + text)
    log.info("KV cache: %d bytes per token (%s)", cache_bytes_per_token(model, args.kv_cache), args.kv_cache)
    return 0


def _command(sub, name: str, func: Callable[[argparse.Namespace], int], help: str,
             description: str | None = None) -> argparse.ArgumentParser:
    """The subcommand `name`, which runs `func(args)`, with the model arguments every command takes."""
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(func=func)
    _add_model_args(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svdkit", description="SVD-based compression of LLMs, and its evaluation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = _command(sub, "eval", cmd_eval, "perplexity of a dense or compressed model",
                 description="Perplexity in non-overlapping windows, as the SVD-LLM papers compute it, block by "
                             "block on --device (the model need not fit in memory or on the device).")
    _add_eval_args(p, "--data", "ptb,wiki")
    p.add_argument("--json", help="also write the results to this JSON file")
    _add_nproc(p)

    p = _command(sub, "compress", cmd_compress, "compress a model and optionally save and evaluate it",
                 description="Layer-wise SVD compression of every decoder-block linear, one block in memory "
                             "at a time, written to --out as it goes.")
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"{DEFAULT_METHOD} (default: the best measured whose memory does not grow with the model), "
                        "ada-kfac-ft, svd, asvd, fwsvd, svdllm, svdllm-update, svdllm-v2, adasvd, ressvd, kfac, "
                        "svdllm-ft, adasvd-ft; options may follow a colon, e.g. adasvd:tau=2,adacr=false "
                        "(docs/methods.md)")
    p.add_argument("--ratio", type=_ratio, default=0.2, help="fraction of each matrix's parameters removed")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. stream=compressed, alpha=0.5, target=original (repeatable)")
    _add_calib_args(p, "; none: no data (plain svd, rtn; no calibration error)")
    p.add_argument("--calib-batch-size", type=_int_at_least(1), default=8)
    p.add_argument("--out", help="save the compressed model to this folder")
    p.add_argument("--dense", action="store_true", help="save factors multiplied back into plain nn.Linear")
    p.add_argument("--format", default="auto", choices=["auto", "svdkit", "transformers"],
                   help="transformers: a folder plain transformers loads (trust_remote_code=True); svdkit: svdkit's "
                        "own (needed for quantized models); auto (default): transformers where possible")
    p.add_argument("--max-shard-size", type=_size, default=MAX_SHARD, metavar="SIZE",
                   help="start a new safetensors shard past this size, e.g. 500MB (default 2GB)")
    p.add_argument("--scratch", metavar="DIR",
                   help="where scratch folders go (spilled activations, K-FAC's output gradients; removed at the end, "
                        "and by the next run if this one is killed); default: beside --out, else the system's "
                        "temporary folder")
    p.add_argument("--quantize", default="", metavar="SPEC",
                   help="then quantize every decoder-block linear (both factors of a low-rank layer) on the same "
                        "calibration data: gptq or rtn, options after a colon, e.g. gptq:bits=3,group_size=64 "
                        "(docs/quantization.md); with --ratio 0 this is dense GPTQ/RTN")
    p.add_argument("--round-ranks", type=_int_at_least(1), default=1, metavar="M",
                   help="round every rank to a multiple of M within the same parameter budget (16 decodes faster "
                        "on CPU; default 1: the ranks the ratio gives)")
    p.add_argument("--dense-if-slower", action="store_true",
                   help="keep dense every matrix whose factor pair would not decode faster at batch 1 (more "
                        "parameters, never slower); the report names them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    _add_eval_args(p, "--eval", "")
    _add_nproc(p)

    p = _command(sub, "sweep", cmd_sweep, "compress and evaluate every method x ratio pair; table, JSON and plot",
                 description="One-shot calibration statistics are computed once and cached on disk.")
    p.add_argument("--methods", default="svd,svdllm,adasvd,ressvd", type=_nonempty_csv("--methods"),
                   help="comma-separated method specs; a spec's options follow a colon, separated by ';' "
                        "(e.g. svdllm,adasvd:tau=0;adacr=false)")
    p.add_argument("--ratios", default="0.2,0.4", type=_ratios)
    _add_calib_args(p)
    _add_eval_args(p, "--eval", "ptb,wiki")
    p.add_argument("--out", default="results")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the statistics cache")
    p.add_argument("--no-dense", action="store_true", help="skip the evaluation of the uncompressed model")
    p.add_argument("--quantize", action="append", default=[], metavar="SPEC",
                   help="also quantize every model of the sweep (dense included) and add a row each, e.g. "
                        "gptq:bits=4 or rtn:bits=4; repeatable")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished pairs of an existing results.json (same protocol) and run the rest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results.json")
    _add_nproc(p)

    p = _command(sub, "eval-zeroshot", cmd_eval_zeroshot, "zero-shot accuracy (lm-eval) of a dense or compressed model",
                 description="Zero-shot multiple-choice accuracy through lm-eval on the model as loaded "
                             "(docs/zeroshot.md).")
    p.add_argument("--tasks", default="svdkit_ptb_cloze", type=_nonempty_csv("--tasks"),
                   help="comma-separated lm-eval tasks: svdkit_ptb_cloze, svdkit_wiki_cloze (offline), hub tasks "
                        "such as arc_easy,piqa,hellaswag (need network), or tasks from --include-path")
    p.add_argument("--limit", type=_int_at_least(0), default=0,
                   help="evaluate only the first N items of each task (0: all)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8)
    p.add_argument("--include-path", action="append", help="folder of lm-eval task YAML files (repeatable)")
    p.add_argument("--offline", action="store_true", help="never contact the Hugging Face hub (cached data only)")
    p.add_argument("--json", help="also write the results to this JSON file")

    p = _command(sub, "generate", cmd_generate, "continue a prompt with a dense or compressed model",
                 description="Greedy generation; --kv-cache low-rank caches the k/v latents (SVD-LLM).")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=50)
    p.add_argument("--kv-cache", default="normal", choices=["normal", "low-rank", "low-rank-values"],
                   help="low-rank: cache k/v latents (smallest); low-rank-values: full keys, value latents (faster)")
    p.add_argument("--device-map", default=None,
                   help="spread a model larger than the device: auto (GPUs, then CPU, then --offload-folder)")
    p.add_argument("--offload-folder", default=None, help="where --device-map puts the weights that fit nowhere else")
    return parser


def _error_line(message: str) -> None:
    """Write one error line in a single write, so lines from several ranks never interleave."""
    line = message.replace("\n", " ") + "\n"
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), line.encode())
    except (AttributeError, OSError, ValueError):  # stderr replaced (e.g. captured in tests)
        sys.stderr.write(line)


def _os_error(e: OSError) -> str:
    """An operating-system error as one line: what failed, and on which file."""
    where = f": {e.filename}" if e.filename else ""
    return f"{type(e).__name__}: {e.strerror or e}{where}" if e.strerror else f"{type(e).__name__}: {e}"


def main(argv: Sequence[str] | None = None) -> int:
    from .threads import prepare

    prepare()  # before torch loads its OpenMP runtime: waiting threads sleep (a shared machine stays usable)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a one-line argument error (2)
        return int(e.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "nproc", 1) > 1 and "RANK" not in os.environ:
        return _relaunch(sys.argv[1:] if argv is None else argv, args.nproc)
    from .dist import RankFailed, record_failure, shutdown
    from .threads import using_threads

    try:
        with using_threads(args.threads):
            return args.func(args)
    except (SvdkitError, OSError) as e:  # bad input, or the machine (a full disk, a missing permission)
        log.debug("the error's traceback", exc_info=True)
        message = str(e) if isinstance(e, SvdkitError) else _os_error(e)
        if not isinstance(e, RankFailed):
            record_failure(message)  # for the ranks waiting in a collective this rank will never enter
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None
        _error_line(f"svdkit: error: {f'[rank {rank}] ' if rank is not None else ''}{message}")
        return 2
    except Exception as e:  # a bug: its traceback follows, and the other ranks are told which rank stopped
        record_failure(f"{type(e).__name__}: {e} (see that rank's traceback)")
        raise
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
