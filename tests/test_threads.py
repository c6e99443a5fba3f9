"""Threads on a shared machine: the cores no other process keeps busy, an equal share per torchrun process, and
the command line gives the process its own setting back."""

import os
import subprocess
import sys

import torch

from svdkit import cli
from svdkit.threads import auto_threads, free_cores


def test_auto_threads_take_the_free_cores_or_a_share_under_torchrun():
    assert free_cores(cores=2, busy=0.0) == 2
    assert free_cores(cores=2, busy=2.0) == 1  # another job holds both cores: one thread, never zero
    assert free_cores(cores=16, busy=5.6) == 10
    assert auto_threads(cores=16, busy=0.0, local_procs=4) == 4
    assert auto_threads(cores=2, busy=0.0, local_procs=4) == 1


def test_the_command_line_sets_its_threads_and_gives_the_previous_setting_back(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "cmd_eval", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    assert cli.main(["eval", "--threads", str(other)]) == 0
    assert seen == [other] and torch.get_num_threads() == before
    assert cli.main(["eval", "--threads", "0"]) == 2  # refused by the parser


def test_idle_openmp_threads_sleep_unless_the_environment_chose():
    code = "import os, sys; from svdkit.cli import main; main(['eval', '--help']); print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.strip().splitlines()[-1] == "ACTIVE"
