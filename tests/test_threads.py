"""CPU threads: the OpenMP wait policy set before torch loads, the thread count, and what the lines say."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from model.training import threads


def test_wait_policy_is_set_before_torch_loads_and_never_over_the_users():
    env = {}
    assert threads.set_wait_policy(env, modules={}) is True and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    assert threads.set_wait_policy(env, modules={"torch": object()}) is False and env == {}  # too late
    for key, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "1000"), ("KMP_BLOCKTIME", "0")):
        env = {key: value}
        assert threads.set_wait_policy(env, modules={}) is False and env == {key: value}


def test_child_env_divides_threads_and_keeps_a_users_wait_setting():
    env = threads.child_env(1, {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert threads.child_env(2, {"GOMP_SPINCOUNT": "0"})["GOMP_SPINCOUNT"] == "0"
    assert "OMP_WAIT_POLICY" not in threads.child_env(2, {"GOMP_SPINCOUNT": "0"})


def test_cpu_threads_sets_the_count_and_puts_it_back():
    before = torch.get_num_threads()
    with threads.cpu_threads(1) as n:
        assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with threads.cpu_threads(0) as n:  # 0: torch's default, unchanged
        assert n == before
    with pytest.raises(ValueError, match="threads"):
        threads.set_threads(-1)
    assert threads.describe(1).startswith("1 CPU thread, ") and threads.describe(2).startswith("2 CPU threads, ")


def test_in_this_process_torch_came_first_and_the_line_says_so(monkeypatch):
    for key in threads.USER_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setitem(threads._state, "set", False)
    assert "torch was loaded before" in threads.wait_policy()
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert threads.wait_policy() == "OpenMP wait set by the environment (GOMP_SPINCOUNT=0)"


@pytest.mark.parametrize("program, args", [("train", None), ("sample", ["--ckpt", "missing.pt"]),
                                           ("flops", ["--paper", "nope"]), ("scaling", ["--budgets", "x"])])
def test_each_program_sets_the_policy_before_torch_loads(program, args):
    """In a fresh process: train.py on import (it imports torch at the top), the others in main(), which a
    bad argument ends early; torch must not be loaded before the policy is set."""
    code = (f"import sys, os; sys.argv = ['{program}.py']; import {program}; "
            f"early = 'torch' in sys.modules and os.environ.get('OMP_WAIT_POLICY') is None; "
            f"code = {program}.main({args!r}) if {args!r} is not None else 0; "
            f"print(os.environ.get('OMP_WAIT_POLICY'), early, code)")
    env = {k: v for k, v in os.environ.items() if k not in threads.USER_KEYS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    policy, torch_first, code = out.stdout.split()
    assert policy == "PASSIVE" and torch_first == "False" and code in ("0", "2")
