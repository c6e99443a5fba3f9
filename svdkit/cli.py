"""The `svdkit` command line: parses arguments into the Python API's calls and prints tables."""

from __future__ import annotations

import argparse
import json
import logging
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


def _report_eval(results: dict, title: str) -> bool:
    rows = [
        (name, r["windows"], r["tokens"], _fmt_ppl(r["ppl"]), r["nonfinite_windows"]) for name, r in results.items()
    ]
    _print_table(title, ["data", "windows", "tokens", "ppl", "non-finite"], rows)
    return all(r["nonfinite_windows"] == 0 for r in results.values())


def cmd_eval(args: argparse.Namespace) -> int:
    from . import load_model
    from .models import count_parameters

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    params = count_parameters(model)
    results = evaluate_datasets(model, tok, _csv(args.data), args.seqlen, args.max_windows, args.batch_size)
    ok = _report_eval(results, f"{args.model}: perplexity (seqlen {args.seqlen})")
    print(f"parameters: {params['total']:,} total, {params['block_linears']:,} in decoder-block linears")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "parameters": params, "perplexity": results}, f, indent=2)
    if not ok:
        log.error("some windows produced non-finite logits; the perplexities above exclude them")
        return 1
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
    except (DataError, ModelError, FileExistsError, FileNotFoundError) as e:
        print(f"svdkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
