"""The `svdkit` command line: parses arguments into the Python API's calls and prints tables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

log = logging.getLogger("svdkit")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded name, local folder or hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _add_eval_args(p: argparse.ArgumentParser, default_data: str | None) -> None:
    p.add_argument(
        "--data" if default_data else "--eval",
        dest="data",
        default=default_data,
        help="comma-separated corpora to evaluate: ptb, wiki, wikitext2, c4, ptb-hf",
    )
    p.add_argument("--seqlen", type=int, default=512, help="evaluation window length in tokens")
    p.add_argument("--max-windows", type=int, default=40, help="evaluate at most this many windows (0: all)")
    p.add_argument("--batch-size", type=int, default=4)


def _print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right" if h != header[0] else "left")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console().print(table)


def _fmt_ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1e5 else f"{x:.3g}"


def evaluate_datasets(model, tok, data: list[str], seqlen: int, max_windows: int | None, batch_size: int) -> dict:
    """Perplexity on each corpus's test split, as a JSON-ready dict keyed by corpus name."""
    from .data import load_text
    from .evaluation import perplexity

    out = {}
    for name in data:
        res = perplexity(
            model, tok, load_text(name, "test"), seqlen=seqlen, max_windows=max_windows or None, batch_size=batch_size
        )
        out[name] = res.to_dict()
    return out


def _check_corpora(names: list[str]) -> list[str]:
    """Fail before any model is loaded when a corpus name is unknown."""
    from .data import CORPORA, DataError

    for name in names:
        if name not in CORPORA:
            raise DataError(f"unknown data set {name!r}: expected one of {', '.join(CORPORA)}")
    return names


def _report_eval(results: dict, title: str) -> bool:
    rows = [
        (name, r["windows"], r["tokens"], _fmt_ppl(r["ppl"]), r["nonfinite_windows"]) for name, r in results.items()
    ]
    _print_table(title, ["data", "windows", "tokens", "ppl", "non-finite"], rows)
    return all(r["nonfinite_windows"] == 0 for r in results.values())


def cmd_eval(args: argparse.Namespace) -> int:
    from . import load_model
    from .models import count_parameters

    data = _check_corpora(_csv(args.data))
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    params = count_parameters(model)
    results = evaluate_datasets(model, tok, data, args.seqlen, args.max_windows, args.batch_size)
    ok = _report_eval(results, f"{args.model}: perplexity (seqlen {args.seqlen})")
    print(f"parameters: {params['total']:,} total, {params['block_linears']:,} in decoder-block linears")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "parameters": params, "perplexity": results}, f, indent=2)
    if not ok:
        log.error("some windows produced non-finite logits; the perplexities above exclude them")
        return 1
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from . import calibration, compress, load_model, save
    from .methods import parse_method

    spec = args.method + (("," if ":" in args.method else ":") + ",".join(args.param) if args.param else "")
    method = parse_method(spec, ratio=args.ratio)
    qconfig = None
    if args.quantize:
        from .quant import parse_quant

        qconfig = parse_quant(args.quantize)  # a bad spec fails before the model is loaded
    data_free = args.calib == "none"
    if data_free and method.needs_data:
        raise ValueError(f"--calib none: {method.name} needs calibration data (only svd is data-free)")
    if data_free and qconfig is not None and qconfig.needs_data:
        raise ValueError(f"--calib none: {qconfig.name} needs calibration data (use rtn or a corpus)")
    _check_corpora([*([] if data_free else [args.calib]), *_csv(args.eval)])
    if args.out and os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists and is not empty (pass --overwrite)")
    model, tok = load_model(args.model, dtype=args.dtype, device="cpu")
    calib = None if data_free else calibration(args.calib, tok, n=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    info = {"data": args.calib, "seed": args.seed, "model": args.model}
    report = compress(model, method, calib, device=args.device, batch_size=args.calib_batch_size, calibration_info=info)
    b, a = report.params_before, report.params_after
    rows = [
        ("parameters (total)", f"{b['total']:,}", f"{a['total']:,}", f"{100 * (1 - a['total'] / b['total']):.1f}%"),
        (
            "decoder-block linears",
            f"{b['block_linears']:,}",
            f"{a['block_linears']:,}",
            f"{100 * report.linear_ratio:.1f}%",
        ),
    ]
    _print_table(
        f"{args.model}: {method.name} at ratio {args.ratio} ({report.seconds:.0f} s)",
        ["", "before", "after", "removed"],
        rows,
    )
    factorize = sum(m.seconds for m in report.matrices)
    print(f"time: {report.seconds:.1f} s in all, {factorize:.1f} s factorizing, "
          f"{report.seconds - factorize:.1f} s in forward passes, statistics and allocation")
    dense_kept = [f"{m.block}.{m.name}" for m in report.matrices if m.rank is None]
    if dense_kept:
        print(f"kept dense (no memory saving at this ratio): {len(dense_kept)} matrices")
    qreport = None
    if qconfig is not None:
        from .quant import quantize_model, set_dequant_cache

        qreport = quantize_model(model, qconfig, calib, device=args.device, batch_size=args.calib_batch_size,
                                 calibration_info=info)
        set_dequant_cache(model, True)  # the evaluation below: same numbers, one dequantization per layer
        qb, qa = qreport.bytes_before, qreport.bytes_after
        _print_table(f"{qconfig.name}: {len(qreport.matrices)} matrices quantized ({qreport.seconds:.0f} s)",
                     ["stored bytes", "before", "after"],
                     [("total", f"{qb['total']:,}", f"{qa['total']:,}"),
                      ("decoder-block linears", f"{qb['block_linears']:,}", f"{qa['block_linears']:,}")])
    if args.out:
        save(model, args.out, tokenizer=tok, report=report, dense=args.dense, overwrite=args.overwrite,
             quant_report=qreport)
        print(f"saved to {args.out}")
    ok = True
    if args.eval:
        results = evaluate_datasets(model, tok, _csv(args.eval), args.eval_seqlen, args.max_windows, args.batch_size)
        ok = _report_eval(results, f"{method.name} {args.ratio}: perplexity (seqlen {args.eval_seqlen})")
        report.perplexity = results
        if args.out:
            report.save_json(os.path.join(args.out, "svdkit_report.json"))
    return 0 if ok else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import SweepConfig, markdown_table, run_sweep

    _check_corpora([args.calib, *_csv(args.eval)])
    cfg = SweepConfig(model=args.model, methods=_csv(args.methods), ratios=[float(r) for r in _csv(args.ratios)],
                      calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                      eval=_csv(args.eval), eval_seqlen=args.eval_seqlen, max_windows=args.max_windows or None,
                      out=args.out, cache=not args.no_cache, dense=not args.no_dense,
                      device=None if args.device == "cpu" else args.device, resume=args.resume,
                      overwrite=args.overwrite, quantize=args.quantize)
    results = run_sweep(cfg)
    print(markdown_table(results))
    print(f"wrote {args.out}/results.json, results.md and perplexity.png")
    return 0 if all(r["nonfinite_windows"] == 0 for r in results["runs"]) else 1


def _fmt_acc(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    from . import load_model
    from .evaluation.zeroshot import zero_shot

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    res = zero_shot(model, tok, _csv(args.tasks), limit=args.limit or None, batch_size=args.batch_size,
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
    from . import load_model
    from .generation import generate_text
    from .kvcache import cache_bytes_per_token

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer to encode the prompt")
    text = generate_text(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, kv_cache=args.kv_cache)
    print(args.prompt + text)
    log.info("KV cache: %d bytes per token (%s)", cache_bytes_per_token(model, args.kv_cache), args.kv_cache)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdkit", description="SVD-based compression of LLMs, and its evaluation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "eval",
        help="perplexity of a dense or compressed model",
        description="Perplexity in non-overlapping windows, as the SVD-LLM papers compute it.",
    )
    _add_model_args(p)
    _add_eval_args(p, default_data="ptb,wiki")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "compress",
        help="compress a model and optionally save and evaluate it",
        description="Layer-wise SVD compression of every decoder-block linear.",
    )
    _add_model_args(p)
    p.add_argument("--method", default="svdllm",
                   help="svd, asvd, fwsvd, svdllm, svdllm-update, svdllm-v2, adasvd, ressvd; options may follow "
                        "a colon, e.g. adasvd:tau=2,adacr=false")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of each matrix's parameters removed")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. propagation=sequential, alpha=0.5, target=original (repeatable)",
    )
    p.add_argument("--calib", default="wiki",
                   help="calibration corpus (train split); none: no data (plain svd, rtn; no calibration error)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-batch-size", type=int, default=8)
    p.add_argument("--out", help="save the compressed model to this folder")
    p.add_argument("--dense", action="store_true", help="save factors multiplied back into plain nn.Linear")
    p.add_argument("--quantize", default="", metavar="SPEC",
                   help="then quantize every decoder-block linear (both factors of a low-rank layer) on the same "
                        "calibration data: gptq or rtn, options after a colon, e.g. gptq:bits=3,group_size=64 "
                        "(docs/quantization.md); with --ratio 0 this is dense GPTQ/RTN")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--eval", default="", help="comma-separated corpora to evaluate after compression")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4, help="evaluation batch size")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("sweep", help="compress and evaluate every method x ratio pair; table, JSON and plot",
                       description="One-shot calibration statistics are computed once and cached on disk.")
    _add_model_args(p)
    p.add_argument("--methods", default="svd,svdllm,adasvd,ressvd",
                   help="comma-separated method specs; a spec's options follow a colon, separated by ';' "
                        "(e.g. svdllm,adasvd:tau=0;adacr=false)")
    p.add_argument("--ratios", default="0.2,0.4")
    p.add_argument("--calib", default="wiki")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="ptb,wiki")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40, help="windows per data set (0: all)")
    p.add_argument("--out", default="results")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the statistics cache")
    p.add_argument("--no-dense", action="store_true", help="skip the evaluation of the uncompressed model")
    p.add_argument("--quantize", action="append", default=[], metavar="SPEC",
                   help="also quantize every model of the sweep (dense included) and add a row each, e.g. "
                        "gptq:bits=4 or rtn:bits=4; repeatable")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished pairs of an existing results.json (same protocol) and run the rest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results.json")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("eval-zeroshot", help="zero-shot accuracy (lm-eval) of a dense or compressed model",
                       description="Zero-shot multiple-choice accuracy through lm-eval on the model as loaded "
                                   "(docs/zeroshot.md).")
    _add_model_args(p)
    p.add_argument("--tasks", default="svdkit_ptb_cloze",
                   help="comma-separated lm-eval tasks: svdkit_ptb_cloze, svdkit_wiki_cloze (offline), hub tasks "
                        "such as arc_easy,piqa,hellaswag (need network), or tasks from --include-path")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N items of each task (0: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--include-path", action="append", help="folder of lm-eval task YAML files (repeatable)")
    p.add_argument("--offline", action="store_true", help="never contact the Hugging Face hub (cached data only)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval_zeroshot)

    p = sub.add_parser("generate", help="continue a prompt with a dense or compressed model",
                       description="Greedy generation; --kv-cache low-rank caches the k/v latents (SVD-LLM).")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--kv-cache", default="normal", choices=["normal", "low-rank"])
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from .data import DataError
    from .models import ModelError

    try:
        return args.func(args)
    except (DataError, ModelError, ValueError, ArithmeticError, FileExistsError, FileNotFoundError) as e:
        print(f"svdkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
