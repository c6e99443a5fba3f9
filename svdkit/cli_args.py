"""The `svdkit` command line's arguments: the parser of every command, the value types that check an argument as it
is read (one line and exit status 2 for a bad one), and the defaults the commands share. Nothing here imports
torch, so `--help` and argument errors answer at once."""

from __future__ import annotations

import argparse
import re

DEFAULT_METHOD = "ada-kfac-rf"


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
    p.add_argument("--train-nsamples", type=_int_at_least(1), default=None,
                   help="windows that refinement (rf_*) and fine-tuning (ft_*) train on: the calibration windows, "
                        "then more from the same split (default: the calibration windows only)")


def _add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=_int_at_least(1), default=1,
                   help="run as this many processes on this machine (starts torchrun for you: gloo on CPU, NCCL with "
                        "one GPU each on cuda); see the README for several machines")


def _add_eval_args(p: argparse.ArgumentParser, flag: str, default: str | None) -> None:
    p.add_argument(flag, dest="data", default=default, type=_nonempty_csv(flag) if default else _csv,
                   help="comma-separated corpora to evaluate: ptb, wiki, wikitext2, c4, ptb-hf")
    p.add_argument("--eval-seqlen" if flag == "--eval" else "--seqlen", dest="eval_seqlen", type=_int_at_least(2),
                   default=512, help="evaluation window length in tokens")
    p.add_argument("--max-windows", type=_int_at_least(0), default=40, help="evaluate at most this many windows "
                   "(0: all)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="evaluation batch size")


def _command(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """The subcommand `name` (`args.command`), with the model arguments every command takes."""
    p = sub.add_parser(name, help=help, description=description)
    _add_model_args(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svdkit", description="SVD-based compression of LLMs, and its evaluation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = _command(sub, "eval", "perplexity of a dense or compressed model",
                 description="Perplexity in non-overlapping windows, as the SVD-LLM papers compute it, block by "
                             "block on --device (the model need not fit in memory or on the device).")
    _add_eval_args(p, "--data", "ptb,wiki")
    p.add_argument("--json", help="also write the results to this JSON file")
    _add_nproc(p)

    p = _command(sub, "compress", "compress a model and optionally save and evaluate it",
                 description="Layer-wise SVD compression of every decoder-block linear, one block in memory "
                             "at a time, written to --out as it goes.")
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"{DEFAULT_METHOD} (default: the best measured whose memory does not grow with the model), "
                        "ada-kfac, ada-kfac-ft, svd, asvd, fwsvd, svdllm, svdllm-update, svdllm-v2, adasvd, ressvd, "
                        "kfac, svdllm-ft, adasvd-ft; options may follow a colon, e.g. adasvd:tau=2,adacr=false "
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

    p = _command(sub, "sweep", "compress and evaluate every method x ratio pair; table, JSON and plot",
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
    p.add_argument("--zeroshot", default="", type=_csv, metavar="TASKS",
                   help="also run these lm-eval tasks on every model of the sweep (loaded whole in memory), e.g. "
                        "svdkit_ptb_cloze,svdkit_wiki_cloze (offline); accuracies go to the JSON and the table")
    p.add_argument("--zeroshot-limit", type=_int_at_least(0), default=0, metavar="N",
                   help="evaluate only the first N items of each --zeroshot task (0: all)")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished pairs of an existing results.json (same protocol) and run the rest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results.json")
    _add_nproc(p)

    p = _command(sub, "eval-zeroshot", "zero-shot accuracy (lm-eval) of a dense or compressed model",
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

    p = _command(sub, "generate", "continue a prompt with a dense or compressed model",
                 description="Greedy generation; --kv-cache low-rank caches the k/v latents (SVD-LLM).")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=50)
    p.add_argument("--kv-cache", default="normal", choices=["normal", "low-rank", "low-rank-values"],
                   help="low-rank: cache k/v latents (smallest); low-rank-values: full keys, value latents (faster)")
    p.add_argument("--device-map", default=None,
                   help="spread a model larger than the device: auto (GPUs, then CPU, then --offload-folder)")
    p.add_argument("--offload-folder", default=None, help="where --device-map puts the weights that fit nowhere else")
    return parser
