"""Threads on a shared machine: waiting OpenMP threads sleep, the cores are shared among a machine's torchrun
processes, and the command line gives the process its own setting back."""

import os
import subprocess
import sys

import torch

from svdkit import cli
from svdkit.threads import auto_threads


def test_auto_threads_share_the_cores_among_a_machine_s_torchrun_processes():
    assert auto_threads(cores=16, local_procs=1) == 16
    assert auto_threads(cores=16, local_procs=4) == 4
    assert auto_threads(cores=2, local_procs=4) == 1  # never zero


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
