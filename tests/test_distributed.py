"""Two gloo processes under torchrun give the one-process model (failures: test_rank_failures.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from svdkit import output_grams
from svdkit.cli import main
from svdkit.dist import assign
from svdkit.io import tensor_index


def torchrun(args: list[str], nproc: int = 2, script: str | None = None, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N` on the svdkit CLI (or on `script`), one thread per process."""
    target = [script] if script else ["-m", "svdkit"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", *target, *args], capture_output=True, text=True, env=env,
                          timeout=600)


def products(folder):
    """Every low-rank matrix as the product W_u W_v (sign-free), plus the other tensors, from a saved folder."""
    index = tensor_index(folder)
    t = index.read(index.names())
    out = {k: v for k, v in t.items() if not k.endswith((".u.weight", ".v.weight"))}
    for k in t:
        if k.endswith(".u.weight"):
            base = k[: -len(".u.weight")]
            out[base] = t[k].double() @ t[base + ".v.weight"].double()
    return out


def test_two_processes_give_the_one_process_model(tiny_folder, tmp_path):
    args = ["compress", "--model", str(tiny_folder), "--method", "svdllm", "--ratio", "0.3", "--calib", "ptb",
            "--nsamples", "6", "--seqlen", "32", "--calib-batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    run = torchrun([*args, "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = products(tmp_path / "one"), products(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5 * float(one[k].abs().max()), msg=k)
    rep1, rep2 = (json.loads((tmp_path / d / "svdkit_report.json").read_text()) for d in ("one", "two"))
    assert [m["rank"] for m in rep1["matrices"]] == [m["rank"] for m in rep2["matrices"]]
    assert rep1["calibration"]["windows"] == rep2["calibration"]["windows"] == 6


def test_two_process_sweep_of_adasvd_and_ressvd_matches_one_process(tiny_folder, tmp_path, monkeypatch):
    """AdaSVD (two activation streams, adaCR's block similarity) and ResSVD (the PLC search), compressed and
    evaluated by two processes through the --nproc shortcut: the same choices, perplexities and cloze
    accuracies."""
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    args = ["sweep", "--model", str(tiny_folder), "--methods", "adasvd,ressvd", "--ratios", "0.3", "--calib", "ptb",
            "--nsamples", "6", "--seqlen", "32", "--eval", "ptb", "--eval-seqlen", "32", "--max-windows", "5",
            "--no-cache", "--zeroshot", "svdkit_ptb_cloze", "--zeroshot-limit", "8"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["runs"] for d in ("one", "two"))
    assert [(r["method"], r["ratio"]) for r in one] == [(r["method"], r["ratio"]) for r in two]
    for a, b in zip(one, two, strict=True):
        assert b["ppl"]["ptb"] == pytest.approx(a["ppl"]["ptb"], rel=1e-4), a["method"]
        assert b["params_total"] == a["params_total"]
        # rank 0 evaluated zero-shot while the other waited; the same model to float tolerance, 8 items
        acc_a, acc_b = a["zeroshot"]["svdkit_ptb_cloze"], b["zeroshot"]["svdkit_ptb_cloze"]
        assert acc_a["samples"] == acc_b["samples"] == 8 and acc_b["acc"] == pytest.approx(acc_a["acc"], abs=0.13)
    by = {r["method"]: r for r in two}
    assert by["ressvd"]["extra"]["plc_k"] == {r["method"]: r for r in one}["ressvd"]["extra"]["plc_k"]
    assert by["adasvd"]["extra"]["block_ratios"] == pytest.approx(
        {r["method"]: r for r in one}["adasvd"]["extra"]["block_ratios"], rel=1e-6)


@pytest.mark.parametrize("stored", ["gradients", "grams"])
def test_two_processes_give_the_one_process_kfac_model_with_global_ranks(stored, tiny_folder, tmp_path, monkeypatch):
    """K-FAC's output-gradient pass (windows shared, Grams all-reduced) and the global allocation built on it,
    the pass storing gradients (what a tiny model's few tokens choose) or each rank's Grams; the two processes
    park every block's statistics on disk (`SVDKIT_PARK_BYTES=0`), each in its own folder."""
    args = ["compress", "--model", str(tiny_folder), "--method", "kfac:alloc=global,tau=1,grad_samples=4",
            "--ratio", "0.3", "--calib", "ptb", "--nsamples", "6", "--seqlen", "32", "--calib-batch-size", "2"]
    driver = tmp_path / "driver.py"
    driver.write_text("import sys\nfrom svdkit import output_grams\nfrom svdkit.cli import main\n"
                      f"output_grams.stores_grams = lambda *a: {stored == 'grams'}\nsys.exit(main(sys.argv[1:]))\n")
    monkeypatch.setattr(output_grams, "stores_grams", lambda *a: stored == "grams")
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    scratch = tmp_path / "scratch"
    run = torchrun([*args, "--out", str(tmp_path / "two"), "--scratch", str(scratch)], script=str(driver),
                   env={"SVDKIT_PARK_BYTES": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert not scratch.exists() or list(scratch.iterdir()) == []
    rep1, rep2 = (json.loads((tmp_path / d / "svdkit_report.json").read_text()) for d in ("one", "two"))
    assert [m["rank"] for m in rep1["matrices"]] == [m["rank"] for m in rep2["matrices"]]
    assert len({m["rank"] for m in rep1["matrices"]}) > 1
    one, two = products(tmp_path / "one"), products(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-4 * float(one[k].abs().max()), msg=k)


def test_assign_balances_the_work_greedily():
    costs = [9, 7, 6, 5, 4, 2, 1]
    owner = assign(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(2)]
    assert sorted(loads) == [17, 17] and owner == assign(costs, 2)  # balanced and deterministic
    assert assign(costs, 1) == [0] * 7
