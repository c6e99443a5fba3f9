"""The `svdkit` command line: parses (`svdkit.cli_args`) and checks the arguments, then calls the Python API and
prints tables.

Arguments are parsed and checked before anything heavy is imported, so `--help` and argument errors answer
at once. Every `SvdkitError` (bad input the user can fix) becomes one line on stderr and exit status 2; any
other exception is a bug and keeps its traceback (`-v` adds debug logging).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .cli_args import DEFAULT_METHOD, MAX_SHARD, build_parser  # noqa: F401 - the command line's own names
from .errors import ConfigError, OutputError, SvdkitError

log = logging.getLogger("svdkit")

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


def _compress_options(args: argparse.Namespace, method):
    """`--quantize`'s config (None without), refusing the combinations `compress` cannot run."""
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
    if data_free and args.train_nsamples:
        raise ConfigError("--calib none: --train-nsamples needs a corpus to draw training windows from")
    if data_free and qconfig is not None and qconfig.needs_data:
        raise ConfigError(f"--calib none: {qconfig.name} needs calibration data (use rtn or a corpus)")
    return qconfig


def cmd_compress(args: argparse.Namespace) -> int:
    method = _method(args)
    qconfig = _compress_options(args, method)
    data_free = args.calib == "none"
    _check_corpora([*([] if data_free else [args.calib]), *args.data])
    _check_out(args.out, args.overwrite)
    device = _device(args.device, distributed=True)

    from ._fs import Scratch
    from .data import calibration_and_training
    from .dist import world
    from .io import REPORT, open_streamed
    from .models import open_model
    from .pipeline import compress_to
    from .speed import RankRules

    model = open_model(args.model, args.dtype)
    if not data_free or args.data:
        _need_tokenizer(model, args.model, "calibration" if not data_free else "evaluation")
    calib, train = (None, None) if data_free else calibration_and_training(
        args.calib, model.tokenizer, args.nsamples, args.train_nsamples, seqlen=args.seqlen, seed=args.seed)
    info = {"data": args.calib, "seed": args.seed, "model": args.model, "train_windows": args.train_nsamples}
    w = world()
    temporary = Scratch("out", args.scratch) if not args.out and w.main else None  # evaluated, not kept
    out = args.out or w.broadcast_object(str(temporary.path) if temporary else None, 0)
    try:
        report, qreport = compress_to(model, out, method, calib, quantize=qconfig, dense=args.dense, format=args.format,
                                      overwrite=args.overwrite or not args.out, device=device,
                                      batch_size=args.calib_batch_size, activations=args.activations,
                                      calibration_info=info, max_shard_bytes=args.max_shard_size,
                                      rank_rules=RankRules(args.round_ranks, args.dense_if_slower, device.type),
                                      scratch=args.scratch or (None if args.out else tempfile.gettempdir()),
                                      train=train)
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
                      train_nsamples=args.train_nsamples,
                      eval_seqlen=args.eval_seqlen, max_windows=args.max_windows or None, out=args.out,
                      cache=not args.no_cache, dense=not args.no_dense, device=str(device), dtype=args.dtype,
                      activations=args.activations, resume=args.resume, overwrite=args.overwrite,
                      quantize=args.quantize, batch_size=args.batch_size, zeroshot=args.zeroshot,
                      zeroshot_limit=args.zeroshot_limit or None)
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

    commands = {"eval": cmd_eval, "compress": cmd_compress, "sweep": cmd_sweep, "eval-zeroshot": cmd_eval_zeroshot,
                "generate": cmd_generate}
    try:
        with using_threads(args.threads):
            return commands[args.command](args)
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
