"""The command line on a tiny local model: compress -> save -> eval, and clear errors."""

import json

import pytest
import torch

from svdkit.cli import main


def test_compress_save_and_eval_roundtrip(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compress", "--model", str(tiny_folder), "--method", "svdllm", "--ratio", "0.4", "--calib", "ptb",
                 "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--eval", "ptb", "--eval-seqlen", "32",
                 "--max-windows", "2"])
    assert code == 0
    report = json.loads((out / "svdkit_report.json").read_text())
    assert report["method"] == "svdllm" and report["perplexity"]["ptb"]["windows"] == 2
    js = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--data", "ptb", "--seqlen", "32", "--max-windows", "2",
                 "--json", str(js)]) == 0
    again = json.loads(js.read_text())["perplexity"]["ptb"]
    assert again["ppl"] == pytest.approx(report["perplexity"]["ptb"]["ppl"], rel=1e-6)
    assert "decoder-block linears" in capsys.readouterr().out


def test_a_fine_tuned_method_reports_its_time_and_saves_a_transformers_folder(tiny_folder, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["compress", "--model", str(tiny_folder), "--method", "svdllm-ft:ft_steps=2", "--ratio", "0.4",
                 "--calib", "ptb", "--nsamples", "4", "--seqlen", "32", "--out", str(out)]) == 0
    report = json.loads((out / "svdkit_report.json").read_text())
    assert [p["phase"] for p in report["extra"]["finetune"]["phases"]] == ["u", "v"]
    assert json.loads((out / "config.json").read_text())["model_type"].startswith("svdkit_")  # the default format
    assert "s fine-tuning (2 steps x 2 phases)" in capsys.readouterr().out
    assert main(["eval", "--model", str(out), "--data", "ptb", "--seqlen", "32", "--max-windows", "1"]) == 0


def test_data_free_svd_compresses_saves_and_reloads(tiny_folder, tmp_path):
    out = tmp_path / "svd"
    assert main(["compress", "--model", str(tiny_folder), "--method", "svd", "--ratio", "0.4", "--calib", "none",
                 "--out", str(out)]) == 0
    report = json.loads((out / "svdkit_report.json").read_text())
    assert report["method"] == "svd" and report["calibration"] == {}
    assert main(["eval", "--model", str(out), "--data", "ptb", "--seqlen", "32", "--max-windows", "1"]) == 0


@pytest.mark.parametrize("ratio, slow", [(0.4, False), (0.15, True)])
def test_rank_rules_from_the_command_line(tiny_folder, tmp_path, capsys, ratio, slow):
    out = tmp_path / "rounded"
    assert main(["compress", "--model", str(tiny_folder), "--method", "svd", "--ratio", str(ratio), "--calib", "none",
                 "--round-ranks", "8", "--dense-if-slower", "--out", str(out)]) == 0
    report = json.loads((out / "svdkit_report.json").read_text())
    rules, ranks = report["extra"]["rank_rules"], [m["rank"] for m in report["matrices"]]
    assert rules["multiple"] == 8 and rules["dense_if_slower"]
    printed = capsys.readouterr().out
    if slow:  # every planned pair holds ~85 % of its matrix: all kept dense, and said so
        assert len(rules["kept_dense"]) == len(ranks) == 14 and set(ranks) == {None}
        assert "; 14 because a factor pair would decode slower" in printed
    else:
        assert rules["kept_dense"] == [] and all(r % 8 == 0 for r in ranks)
        assert "ranks rounded to multiples of 8" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "TINY", "--data", "nope"], "unknown data set 'nope'"),
        (["eval", "--model", "TINY", "--seqlen", "100000"], "longer than the model's maximum context"),
        (["compress", "--model", "TINY", "--method", "svdzip"], "unknown method 'svdzip'"),
        (["compress", "--model", "TINY", "--ratio", "1.5"], "ratio must be in [0, 1)"),
        (["compress", "--model", "TINY", "--param", "alpha=1"], "unknown option 'alpha' for ada-kfac-rf"),
        (["compress", "--model", "TINY", "--calib", "none"], "--calib none: ada-kfac-rf needs calibration data"),
        (["compress", "--model", "TINY", "--method", "svd", "--calib", "none", "--quantize", "gptq"],
         "--calib none: gptq"),
        (["compress", "--model", "TINY", "--method", "svd", "--calib", "none", "--train-nsamples", "8"],
         "--calib none: --train-nsamples"),
        (["compress", "--model", "TINY", "--method", "svd:rf_steps=2", "--calib", "ptb", "--nsamples", "8",
          "--train-nsamples", "4"],
         "must include the 8 calibration windows"),
    ],
)
def test_bad_input_gives_one_line_error(tiny_folder, capsys, argv, message):
    argv = [str(tiny_folder) if a == "TINY" else a for a in argv]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("svdkit") and "error:" in err[0] and message in err[0]


def test_every_command_has_help(capsys):
    for cmd in ("eval", "compress", "sweep", "eval-zeroshot", "generate"):
        assert main([cmd, "--help"]) == 0
    assert "--method" in capsys.readouterr().out


def test_generate_with_both_caches_writes_the_same_text(tiny_folder, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compress", "--model", str(tiny_folder), "--ratio", "0.5", "--calib", "ptb", "--nsamples", "2",
                 "--seqlen", "32", "--out", str(out)]) == 0
    assert json.loads((out / "svdkit_report.json").read_text())["method"] == "ada-kfac-rf"  # the default method
    capsys.readouterr()
    texts = []
    for cache in ("normal", "low-rank"):
        assert main(["generate", "--model", str(out), "--prompt", "the market", "--max-new-tokens", "8",
                     "--kv-cache", cache]) == 0
        texts.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert texts[0] == texts[1] and texts[0].startswith("the market")


def test_compress_quantize_save_and_eval_roundtrip(tiny_folder, tmp_path):
    out = tmp_path / "q"
    code = main(["compress", "--model", str(tiny_folder), "--method", "svdllm", "--ratio", "0.4", "--calib", "ptb",
                 "--nsamples", "4", "--seqlen", "32", "--quantize", "gptq:bits=3,group_size=32", "--out", str(out),
                 "--eval", "ptb", "--eval-seqlen", "32", "--max-windows", "2"])
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())["svdkit"]
    assert cfg["ranks"] and all(q["bits"] == 3 for q in cfg["quant"].values())
    report = json.loads((out / "svdkit_report.json").read_text())
    js = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--data", "ptb", "--seqlen", "32", "--max-windows", "2",
                 "--json", str(js)]) == 0
    assert json.loads(js.read_text())["perplexity"]["ptb"]["ppl"] == pytest.approx(
        report["perplexity"]["ptb"]["ppl"], rel=1e-6)
    assert main(["compress", "--model", str(tiny_folder), "--quantize", "awq"]) == 2


def test_max_shard_size_splits_the_output_and_loads_the_same_model(tiny_folder, tmp_path):
    from svdkit import cli, io

    assert cli.MAX_SHARD == io.MAX_SHARD_BYTES
    args = ["compress", "--model", str(tiny_folder), "--ratio", "0.4", "--calib", "ptb", "--nsamples", "2",
            "--seqlen", "32", "--format", "svdkit"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "many"), "--max-shard-size", "100KB"]) == 0
    assert (tmp_path / "one" / "svdkit.safetensors").exists()
    shards = sorted((tmp_path / "many").glob("svdkit-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "many" / "svdkit.safetensors.index.json").exists()
    one, many = io.tensor_index(tmp_path / "one"), io.tensor_index(tmp_path / "many")
    a, b = one.read(one.names()), many.read(many.names())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", ["0", "-5MB", "lots"])
def test_max_shard_size_refuses_nonsense(value, capsys):
    assert main(["compress", "--max-shard-size", value]) == 2
    assert "--max-shard-size" in capsys.readouterr().err
