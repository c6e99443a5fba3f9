"""Scratch disk of the default method: under the folder asked for, bounded by the activations (not the Grams),
removed after success, after an error, and by the next run after a kill; several ranks store one process's worth
between them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from svdkit import output_grams
from svdkit.cli import main
from svdkit.methods.kfac import KFAC

ARGS = ["compress", "--method", "ada-kfac:grad_samples=4", "--ratio", "0.3", "--calib", "ptb", "--nsamples", "6",
        "--seqlen", "32", "--calib-batch-size", "2"]


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _ours(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".svdkit."))


def test_scratch_goes_where_asked_stays_bounded_and_goes_after_success_and_error(tiny_folder, tmp_path,
                                                                                  monkeypatch):
    scratch, peaks = tmp_path / "scratch", []
    put = output_grams.GradientStore.put

    def spy(self, i, grads):
        put(self, i, grads)
        assert self.path.parent == scratch  # this process's store, under --scratch
        peaks.append(_bytes(scratch))

    monkeypatch.setattr(output_grams.GradientStore, "put", spy)
    assert main([*ARGS, "--model", str(tiny_folder), "--scratch", str(scratch), "--out", str(tmp_path / "a")]) == 0
    assert _ours(scratch) == []
    # tokens x width per block in float32 (spilled inputs, then gradients): never the Grams' 8 m^2 per linear
    hidden, blocks, tokens = 64, 2, 4 * 32
    assert 0 < max(peaks) <= (blocks + 1) * tokens * hidden * 4 + 4096  # + safetensors headers
    grams = 8 * blocks * (3 * 64**2 + 160**2 * 2 + 2 * 32**2)  # q, o, down; gate, up; k, v (GQA)
    assert max(peaks) < grams / 10

    def broken(self, w, stats, rank):
        raise ArithmeticError("injected")

    monkeypatch.setattr(KFAC, "factorize", broken)
    with pytest.raises(ArithmeticError):
        main([*ARGS, "--model", str(tiny_folder), "--scratch", str(scratch), "--out", str(tmp_path / "b")])
    assert _ours(scratch) == [] and not (tmp_path / "b").exists()


def test_the_next_run_removes_what_a_killed_run_left(tiny_folder, tmp_path):
    """A run killed during its gradient pass leaves its scratch (PID and host in the name); the next run in the
    same place removes it, whatever it held, and leaves nothing of its own."""
    scratch = tmp_path / "scratch"
    code = ("import os, sys, signal\n"
            "from svdkit import gradients\n"
            "real = gradients.block_backward\n"
            "def killed(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "gradients.block_backward = killed\n"
            "from svdkit.cli import main\n"
            "main(sys.argv[1:])\n")
    run = subprocess.run([sys.executable, "-c", code, *ARGS, "--model", str(tiny_folder), "--scratch", str(scratch),
                          "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert run.returncode == -9
    left = _ours(scratch)
    assert left and _bytes(scratch) > 0  # the spilled inputs of the pass it never finished
    assert main([*ARGS, "--model", str(tiny_folder), "--scratch", str(scratch), "--out", str(tmp_path / "b")]) == 0
    assert _ours(scratch) == []


def test_two_ranks_store_one_process_s_worth_between_them(tiny_folder, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import json, os, sys\n"
        "from pathlib import Path\n"
        "from svdkit import output_grams\n"
        "real = output_grams.OutputGrams.__init__\n"
        "def measured(self, *a, **k):\n"
        "    real(self, *a, **k)\n"
        "    size = sum(f.stat().st_size for f in Path(self.store.path).rglob('*.safetensors'))\n"
        "    Path(os.environ['REPORT'] + os.environ.get('RANK', '0')).write_text(json.dumps(size))\n"
        "output_grams.OutputGrams.__init__ = measured\n"
        "from svdkit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "REPORT": str(tmp_path / "size")}
    common = [*ARGS, "--model", str(tiny_folder), "--scratch", str(tmp_path / "scratch")]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(driver), *common, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    shares = [json.loads((tmp_path / f"size{r}").read_text()) for r in (0, 1)]
    # one process would store blocks x windows x tokens x hidden float32 numbers (4 windows of 32 tokens): each
    # rank stores its two windows' share, headers aside, and no copy of the other's
    alone = 2 * 4 * 32 * 64 * 4
    assert all(alone // 2 <= s <= alone // 2 + 2 * 1024 for s in shares), shares
    assert _ours(tmp_path / "scratch") == []
