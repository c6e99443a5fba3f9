"""A sweep on a tiny random model: JSON, table and plot are produced and agree; the cache is reused."""

import json
import math

import pytest
import torch
from conftest import tiny_model

from svdkit.quant import quantized_matrix_bytes
from svdkit.report import fmt_ppl
from svdkit.stats_cache import StatsCache
from svdkit.sweep import SweepConfig, SweepError, run_sweep


def test_sweep_writes_consistent_json_table_and_plot(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = SweepConfig(model=str(folder), methods=["svd", "svdllm", "adasvd:tau=0;adacr=false"], ratios=[0.2, 0.5],
                      calib="ptb", nsamples=4, seqlen=32, eval=["ptb"], eval_seqlen=32, max_windows=3,
                      out=str(tmp_path / "out"))
    results = run_sweep(cfg, progress=False)
    out = tmp_path / "out"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["runs"] == json.loads(json.dumps(results["runs"]))
    assert [(r["method"], r["ratio"]) for r in on_disk["runs"]] == [("dense", 0.0)] + [
        (m, r) for m in cfg.methods for r in cfg.ratios]
    table = (out / "results.md").read_text()
    for run in on_disk["runs"]:
        row = next(line for line in table.splitlines() if line.startswith(f"| {run['method']} |"))
        assert fmt_ppl(run["ppl"]["ptb"]) in row
    assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # whitening with adaComp and adaCR off is plain SVD-LLM: same numbers
    by = {(r["method"], r["ratio"]): r["ppl"]["ptb"] for r in on_disk["runs"]}
    assert by[("adasvd:tau=0;adacr=false", 0.5)] == pytest.approx(by[("svdllm", 0.5)], rel=1e-6)
    assert by[("svdllm", 0.5)] != pytest.approx(by[("svd", 0.5)], rel=1e-3)
    # the one-shot statistics were cached on disk and a second sweep reuses them
    cache_file = results["stats_cache"]
    assert StatsCache(cache_file).complete(2)

    def no_forward(*args, **kwargs):
        raise AssertionError("the statistics pass ran although the cache was complete")

    monkeypatch.setattr("svdkit.engine.block_statistics", no_forward)
    again = run_sweep(SweepConfig(**{**cfg.__dict__, "methods": ["svdllm"], "out": str(tmp_path / "out2")}),
                      progress=False)
    assert again["runs"][1]["ppl"]["ptb"] == pytest.approx(by[("svdllm", 0.2)], rel=1e-6)


def test_sweep_resume_runs_only_missing_pairs_and_refuses_other_protocols(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = SweepConfig(model=str(folder), methods=["svdllm"], ratios=[0.3], calib="ptb", nsamples=2, seqlen=32,
                      eval=["ptb"], eval_seqlen=32, max_windows=2, out=str(tmp_path / "out"), dense=False)
    first = run_sweep(cfg, progress=False)
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(cfg, progress=False)  # an existing results.json is never replaced silently

    import svdkit.sweep as sweep_mod

    calls = []
    real = sweep_mod.compress_to
    monkeypatch.setattr(sweep_mod, "compress_to", lambda model, out, method, *a, **k: calls.append(method.name)
                        or real(model, out, method, *a, **k))
    more = SweepConfig(**{**cfg.__dict__, "methods": ["svdllm", "svd"], "resume": True})
    resumed = run_sweep(more, progress=False)
    assert calls == ["svd"]
    assert resumed["runs"][0] == json.loads(json.dumps(first["runs"][0]))
    assert [(r["method"], r["ratio"]) for r in resumed["runs"]] == [("svdllm", 0.3), ("svd", 0.3)]
    assert "| svd |" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(SweepError, match="seed"):
        run_sweep(SweepConfig(**{**more.__dict__, "seed": 1}), progress=False)
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["runs"]) == 2


def test_sweep_quantized_rows_store_the_bytes_of_the_formula(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    model = tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = SweepConfig(model=str(folder), methods=["svdllm"], ratios=[0.3], calib="ptb", nsamples=4, seqlen=32,
                      eval=["ptb"], eval_seqlen=32, max_windows=2, out=str(tmp_path / "out"),
                      quantize=["rtn:bits=4", "gptq:bits=3,group_size=32"])
    results = run_sweep(cfg, progress=False)
    by = {r["method"]: r for r in results["runs"]}
    assert list(by) == ["dense", "dense+rtn-4", "dense+gptq-3-g32", "svdllm", "svdllm+rtn-4", "svdllm+gptq-3-g32"]
    # dense + RTN-4: every decoder linear's fp32 weight replaced by packed codes + fp16 scales and zeros
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert not any(m.bias is not None for m in linears)
    expected = by["dense"]["bytes"] - sum(4 * m.weight.numel() for m in linears) + sum(
        quantized_matrix_bytes(m.out_features, m.in_features, 4, 128) for m in linears)
    assert by["dense+rtn-4"]["bytes"] == expected
    assert by["svdllm+gptq-3-g32"]["bytes"] < by["svdllm+rtn-4"]["bytes"] < by["svdllm"]["bytes"] < by["dense"]["bytes"]
    for name in ("svdllm+rtn-4", "svdllm+gptq-3-g32"):
        assert by[name]["params_total"] == by["svdllm"]["params_total"]
        assert math.isfinite(by[name]["ppl"]["ptb"]) and by[name]["ppl"]["ptb"] != by["svdllm"]["ppl"]["ptb"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "stored MB" in table and f"| {by['svdllm+rtn-4']['bytes'] / 1e6:.1f} |" in table
    again = run_sweep(SweepConfig(**{**cfg.__dict__, "resume": True}), progress=False)  # nothing left to run
    assert again["runs"] == json.loads(json.dumps(results["runs"]))
    assert again["config"]["methods"] == ["svdllm"] and again["config"]["ratios"] == [0.3]


def test_sweep_of_kfac_and_a_finetuned_method_runs_one_gradient_pass(tmp_path, tokenizer, monkeypatch):
    """kfac runs its gradient pass once for every ratio (the output gradients live in the statistics cache);
    svdllm-ft is svdllm plus its fine-tuning."""
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    calls = []
    from svdkit import output_grams

    real = output_grams.block_output_gradients
    monkeypatch.setattr(output_grams, "block_output_gradients", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = SweepConfig(model=str(folder), methods=["kfac:alloc=global;grad_samples=2", "svdllm-ft:ft_steps=2"],
                      ratios=[0.3, 0.5], calib="ptb", nsamples=4, seqlen=32, eval=["ptb"], eval_seqlen=32,
                      max_windows=2, out=str(tmp_path / "out"), dense=False)
    results = run_sweep(cfg, progress=False)
    assert len(calls) == 1
    runs = {(r["method"], r["ratio"]): r for r in results["runs"]}
    assert all(math.isfinite(r["ppl"]["ptb"]) for r in runs.values())
    assert runs[("kfac:alloc=global;grad_samples=2", 0.3)]["extra"]["global_kept"] <= runs[
        ("kfac:alloc=global;grad_samples=2", 0.3)]["extra"]["global_budget"]
    ft = runs[("svdllm-ft:ft_steps=2", 0.5)]
    assert ft["seconds"] >= ft["extra"]["finetune"]["seconds"] > 0


def test_sweep_zeroshot_rows_equal_lm_eval_on_the_saved_models(tmp_path, tokenizer, monkeypatch):
    """`zeroshot` evaluates each row's own model: the dense checkpoint, the compressed folder and its quantized
    copy give what `zero_shot` gives on those models loaded by hand; unknown tasks fail before any compression."""
    pytest.importorskip("lm_eval")
    from svdkit.evaluation.zeroshot import ZeroShotError, zero_shot
    from svdkit.methods import parse_method
    from svdkit.models import load_model
    from svdkit.pipeline import compress_to, quantize_to
    from svdkit.quant import parse_quant

    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = SweepConfig(model=str(folder), methods=["svd"], ratios=[0.6], calib="ptb", nsamples=2, seqlen=32,
                      eval=["ptb"], eval_seqlen=32, max_windows=2, out=str(tmp_path / "out"),
                      quantize=["rtn:bits=2"], zeroshot=["svdkit_ptb_cloze"], zeroshot_limit=24)
    import svdkit.evaluation.zeroshot as zeroshot_mod

    seen = []  # the weights of each model the sweep evaluated
    monkeypatch.setattr(zeroshot_mod, "zero_shot", lambda model, *a, **k: seen.append(
        {n: t.clone() for n, t in model.state_dict().items()}) or zero_shot(model, *a, **k))
    runs = {r["method"]: r for r in run_sweep(cfg, progress=False)["runs"]}
    monkeypatch.setattr(zeroshot_mod, "zero_shot", zero_shot)

    def by_hand(path) -> tuple[dict, dict]:
        model, _ = load_model(str(path))
        res = zero_shot(model, tokenizer, ["svdkit_ptb_cloze"], limit=24, batch_size=8)
        return res["tasks"]["svdkit_ptb_cloze"], model.state_dict()

    compressed, quantized = tmp_path / "svd", tmp_path / "svd-rtn"
    compress_to(str(folder), compressed, parse_method("svd", ratio=0.6), None)
    quantize_to(compressed, quantized, parse_quant("rtn:bits=2"), None)
    assert list(runs) == ["dense", "dense+rtn-2", "svd", "svd+rtn-2"] and len(seen) == 4
    for i, (name, path) in enumerate([("dense", folder), ("svd", compressed), ("svd+rtn-2", quantized)]):
        (want, state), got = by_hand(path), runs[name]["zeroshot"]["svdkit_ptb_cloze"]
        evaluated = seen[[0, 2, 3][i]]
        assert evaluated.keys() == state.keys(), name
        assert all(torch.equal(evaluated[k], state[k]) for k in state), name
        assert got["samples"] == 24 and runs[name]["zeroshot_seconds"] > 0
        assert (got["acc"], got["acc_norm"]) == (want["acc"], want["acc_norm"]), name
    table = (tmp_path / "out" / "results.md").read_text()
    assert f"| svd | 0.6 | {runs['svd']['zeroshot']['svdkit_ptb_cloze']['acc']:.3f} (" in table

    import svdkit.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "compress_to", lambda *a, **k: pytest.fail("compressed before checking tasks"))
    with pytest.raises(ZeroShotError, match="no_such_task"):
        run_sweep(SweepConfig(**{**cfg.__dict__, "zeroshot": ["no_such_task"], "out": str(tmp_path / "o2")}),
                  progress=False)
