"""Perplexity against stored bytes for SVD compression, weight quantization, and both (SmolLM2-135M).

    python benchmarks/quant.py --out runs/quant                                   # every default row
    python benchmarks/quant.py --out runs/quant --rows dense+gptq-4,svdllm-0.4+gptq-4 --max-windows 20

A row is `BASE[+QUANT]`: BASE is `dense` or `METHOD-RATIO` (any svdkit method, e.g. `svdllm-0.4`,
`adasvd-0.4`), QUANT is `rtn-BITS` or `gptq-BITS`, optionally followed by `-gGROUP` and, for GPTQ, `-ao` or
`-noao` (act-order on / off; default `QuantConfig`'s, on), e.g. `gptq-3-g64`, `gptq-4-noao`. Rows with
the same BASE in a row share one compression. Calibration (compression and GPTQ alike) is
`svdkit.calibration('wiki', tok, n, seqlen, seed)`; perplexity is `svdkit.perplexity` on each corpus's
test split. Bytes are what `svdkit.save` stores (`svdkit.quant.stored_bytes`): the total, and the part in
the decoder-block linears with its bits per original weight. Writes `quant.json` (after every row, so an
interrupted run keeps what it finished) and `quant.md` under `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import time
from pathlib import Path

import torch

import svdkit
from svdkit.methods import parse_method
from svdkit.models import count_parameters
from svdkit.quant import QuantConfig, quantize_model, set_dequant_cache, stored_bytes

log = logging.getLogger("benchmarks.quant")

DEFAULT_ROWS = ("dense,dense+rtn-4,dense+gptq-4,dense+gptq-3,svdllm-0.4,svdllm-0.4+gptq-4,adasvd-0.4+gptq-4")


def parse_row(row: str) -> tuple[str, str | None]:
    """`BASE[+QUANT]` -> (base, quant or None)."""
    base, _, quant = row.partition("+")
    return base.strip(), (quant.strip() or None)


def quant_config(spec: str, group_size: int) -> QuantConfig:
    """`rtn-4`, `gptq-3`, `gptq-4-g64`, `gptq-4-noao` -> QuantConfig."""
    parts = spec.split("-")
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"bad quantization {spec!r}: expected rtn-BITS or gptq-BITS[-gGROUP][-ao|-noao]")
    kwargs: dict = {"method": parts[0], "bits": int(parts[1]), "group_size": group_size}
    for part in parts[2:]:
        if part in ("ao", "noao"):
            kwargs["act_order"] = part == "ao"
        elif part.startswith("g") and part[1:].isdigit():
            kwargs["group_size"] = int(part[1:])
        else:
            raise ValueError(f"bad part {part!r} in {spec!r}: expected -gGROUP, -ao or -noao")
    return QuantConfig(**kwargs)


def build_base(base: str, calib: torch.Tensor, args: argparse.Namespace) -> tuple[object, dict]:
    """A fresh SmolLM2 model, compressed by `METHOD-RATIO` unless `base` is `dense`; with timing info."""
    model, _ = svdkit.load_model(args.model)
    info: dict = {"base": base}
    if base != "dense":
        method_name, _, ratio = base.rpartition("-")
        method = parse_method(method_name, ratio=float(ratio))
        t0 = time.perf_counter()
        report = svdkit.compress(model, method, calib, batch_size=args.calib_batch_size, progress=args.progress,
                                 calibration_info={"data": args.calib, "seed": args.seed})
        info.update(compress_seconds=time.perf_counter() - t0, params_after=report.params_after,
                    linear_ratio_removed=report.linear_ratio)
    return model, info


def evaluate(model, tok, texts: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    """Perplexity on every corpus (token ids prepared once)."""
    out = {}
    for name, ids in texts.items():
        res = svdkit.perplexity(model, tok, ids, seqlen=args.eval_seqlen, max_windows=args.max_windows or None,
                                batch_size=args.batch_size, progress=args.progress)
        out[name] = res.to_dict()
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    """The results table: perplexity per corpus, stored bytes, bits per block-linear weight."""
    data = meta["data"]
    lines = [
        f"SmolLM2-135M, calibration {meta['calib']} n={meta['nsamples']} seqlen={meta['seqlen']} seed={meta['seed']}; "
        f"perplexity seqlen {meta['eval_seqlen']}, max_windows {meta['max_windows']}; bytes as stored by svdkit.save "
        f"(embeddings, norms and lm_head stay float32).",
        "",
        "| row | " + " | ".join(f"{d} ppl" for d in data) + " | total MB | block linears MB | bits / weight "
        "(block linears) | fallbacks | seconds |",
        "|---|" + "---:|" * (len(data) + 5),
    ]
    for r in rows:
        ppl = " | ".join(f"{r['perplexity'][d]['ppl']:.2f}" for d in data)
        secs = r.get("compress_seconds", 0.0) + r.get("quantize_seconds", 0.0)
        b = r["bytes"]
        lines.append(f"| {r['row']} | {ppl} | {b['total'] / 1e6:.1f} | {b['block_linears'] / 1e6:.1f} "
                     f"| {r['bits_per_weight']:.3f} | {r.get('fallbacks', 0)} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated BASE[+QUANT] rows")
    p.add_argument("--calib", default="wiki")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--data", default="ptb,wiki")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40, help="windows per corpus (0: all)")
    p.add_argument("--batch-size", type=int, default=4, help="evaluation batch size")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machines are shared)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = [d.strip() for d in args.data.split(",") if d.strip()]
    meta = {k: getattr(args, k) for k in ("calib", "nsamples", "seqlen", "seed", "group_size",
                                          "eval_seqlen", "max_windows", "threads")}
    meta.update(data=data, torch=torch.__version__, machine=platform.machine(), processor=platform.processor())
    specs = [parse_row(r) for r in args.rows.split(",") if r.strip()]
    for _, q in specs:
        if q is not None:
            quant_config(q, args.group_size)  # fail on a bad spec before any work
    dense_model, tok = svdkit.load_model(args.model)
    dense_linear_params = count_parameters(dense_model)["block_linears"]  # bits per weight are per original weight
    del dense_model
    calib = svdkit.calibration(args.calib, tok, n=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    from svdkit.evaluation.perplexity import tokenize

    texts = {d: tokenize(tok, svdkit.load_text(d, "test")) for d in data}
    rows: list[dict] = []
    cached: tuple[str, object, dict] | None = None
    for i, (base, q) in enumerate(specs):
        name = base + (f"+{q}" if q else "")
        log.info("row %s", name)
        if cached is None or cached[0] != base:
            cached = None  # free the previous base before building the next
            model, info = build_base(base, calib, args)
            cached = (base, model, info)
        more = any(b == base for b, _ in specs[i + 1 :])
        model = copy.deepcopy(cached[1]) if more else cached[1]
        row = {"row": name, **cached[2], "params": count_parameters(model)}
        if q is not None:
            cfg = quant_config(q, args.group_size)
            rep = quantize_model(model, cfg, calib, progress=args.progress, batch_size=args.calib_batch_size,
                                 calibration_info={"data": args.calib, "seed": args.seed})
            set_dequant_cache(model, True)  # same numbers, one dequantization per layer instead of per call
            row.update(quant=rep.config, quantize_seconds=rep.seconds,
                       fallbacks=sum(m.method == "rtn-fallback" for m in rep.matrices),
                       mean_rel_error=sum(m.rel_error or 0.0 for m in rep.matrices) / len(rep.matrices))
        if not more:
            cached = None
        row["bytes"] = stored_bytes(model)
        row["dense_block_linear_params"] = dense_linear_params
        row["bits_per_weight"] = 8 * row["bytes"]["block_linears"] / dense_linear_params
        t0 = time.perf_counter()
        row["perplexity"] = evaluate(model, tok, texts, args)
        row["eval_seconds"] = time.perf_counter() - t0
        log.info("%s: %s, %.1f MB stored", name, {d: round(r["ppl"], 2) for d, r in row["perplexity"].items()},
                 row["bytes"]["total"] / 1e6)
        rows.append(row)
        del model
        (out / "quant.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (out / "quant.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
