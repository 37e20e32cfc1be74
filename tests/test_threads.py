"""CPU threads: the OpenMP wait policy set before torch loads, the thread count, and what the lines say."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from model.training import threads


STAT = """cpu  900 0 300 5000 10 0 0 0 0 0
cpu0 400 0 100 2500 5 20 10 5 0 0
cpu1 500 0 200 2500 5 0 0 0 0 0
intr 12345
"""


def test_busy_time_counts_this_processs_cpus_and_skips_idle_and_iowait():
    # cpu0: user 400 + system 100 + irq 20 + softirq 10 + steal 5 = 535 ticks; cpu1: 700 ticks
    assert threads.busy_seconds(STAT, {0}, 100) == 5.35
    assert threads.busy_seconds(STAT, {0, 1}, 100) == 12.35
    assert threads.busy_seconds(STAT, {1}, 50) == 14.0  # the "cpu" total line never counts
    assert threads.busy_seconds("cpu0 400 0 100 2500\n", {0}, 100) == 5.0  # an old kernel's four fields


def test_other_programs_load_is_the_busy_time_less_this_processs_own():
    # 2 s of wall clock; the CPUs were busy 3.5 s, 1.5 s of it this process's: others kept 1 CPU busy
    assert threads.others_load((10.0, 100.0, 5.0), (12.0, 103.5, 6.5)) == 1.0
    assert threads.others_load((10.0, 100.0, 5.0), (12.0, 101.0, 6.5)) == 0.0  # never negative
    assert threads.others_load((10.0, 100.0, 5.0), (10.0, 101.0, 5.0)) == 0.0  # no time passed


@pytest.mark.parametrize("ceiling, cpus, others, want", [
    (2, 2, 0.0, 2), (2, 2, 0.4, 2), (2, 2, 0.6, 1), (2, 2, 0.67, 1), (2, 2, 1.0, 1), (2, 2, 2.0, 1),
    (4, 8, 1.0, 4), (8, 8, 3.2, 5), (8, 8, 9.0, 1)])
def test_the_count_is_one_per_cpu_less_the_busy_ones(ceiling, cpus, others, want):
    assert threads.fitting_threads(ceiling, cpus, others) == want


def test_wait_policy_spins_when_idle_sleeps_when_busy_and_never_overrides_the_user():
    for load, passive in ((0.1, False), (0.7, True), (None, True)):  # None: the load is unknown
        env = {}
        assert threads.set_wait_policy(env, modules={}, load=lambda v=load: v) is passive
        assert env == ({"OMP_WAIT_POLICY": "PASSIVE"} if passive else {})
    env = {}
    assert threads.set_wait_policy(env, modules={"torch": object()}, load=lambda: 1.0) is False and env == {}
    for key, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "1000"), ("KMP_BLOCKTIME", "0")):
        env = {key: value}
        assert threads.set_wait_policy(env, modules={}, load=lambda: 1.0) is False and env == {key: value}


def test_the_load_is_read_over_a_window_or_since_a_recent_sample(monkeypatch):
    samples = iter([(0.0, 10.0, 1.0), (0.2, 10.3, 1.1)])  # 0.2 s: 0.3 CPU-s busy, 0.1 of it ours
    slept = []
    monkeypatch.setitem(threads._state, "sample", None)
    load = threads.current_load(sample=lambda: next(samples), sleep=slept.append)
    assert slept == [threads.WINDOW_S] and load == pytest.approx(1.0)
    # a second reading 3 s later uses the 3 s since the last sample, without waiting
    assert threads.current_load(sample=lambda: (3.2, 11.0, 1.4), sleep=slept.append) == pytest.approx(0.4 / 3)
    assert slept == [threads.WINDOW_S]
    assert threads.current_load(sample=lambda: None) is None  # no /proc/stat


def test_an_automatic_count_follows_the_load_and_a_pinned_one_does_not(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "allowed_cpus", lambda: {0, 1})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert threads.set_threads(0, load=lambda: 1.0) == 1  # one CPU busy elsewhere
        assert threads.describe().startswith("1 CPU thread (other programs use 1.0 of 2 CPUs), ")
        assert threads.governor() is not None
        torch.set_num_threads(2)
        assert threads.set_threads(0, load=lambda: 0.0) == 2
        assert threads.set_threads(0, load=lambda: None) == 2 and "load is unknown" in threads.describe()
        assert threads.governor() is None
        assert threads.set_threads(1, load=lambda: 0.0) == 1 and threads.governor() is None
        assert threads.describe().startswith("1 CPU thread (--threads), ")
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.set_threads(0, load=lambda: 2.0) == 2 and threads.governor() is None
    finally:
        torch.set_num_threads(before)


def test_the_governor_switches_after_two_readings_agree_and_says_so(monkeypatch):
    monkeypatch.setattr(threads, "allowed_cpus", lambda: {0, 1})
    clock = [0.0]
    busy = [0.0]  # other programs' CPU-seconds so far; this process's own stays 0
    sample = lambda: (clock[0], busy[0], 0.0)  # noqa: E731
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gov = threads.ThreadGovernor(2, sample=sample, clock=lambda: clock[0])

        def after(seconds, others):  # another `seconds` of a step with `others` CPUs busy elsewhere
            clock[0] += seconds
            busy[0] += seconds * others
            return gov.check()

        assert after(1.0, 1.0) is None  # within the period: nothing read
        assert after(1.5, 1.0) is None and torch.get_num_threads() == 2  # one reading calls for 1: wait
        line = after(2.0, 0.7)  # a second one agrees: switch (a competitor gets 0.7 CPU beside 2 threads)
        assert line == "2 -> 1 CPU threads (other programs use 0.7 of 2 CPUs)" and torch.get_num_threads() == 1
        assert after(2.0, 0.0) is None and after(2.0, 1.0) is None  # a reading that does not repeat: none
        assert torch.get_num_threads() == 1
        assert after(2.0, 0.1) is None and after(2.0, 0.0).startswith("1 -> 2 CPU threads")
        assert threads.ThreadGovernor(2, sample=lambda: None).check() is None  # no /proc/stat: no governing
    finally:
        torch.set_num_threads(before)


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
    with threads.cpu_threads(0) as n:  # 0 with OMP_NUM_THREADS set (conftest): that count, unchanged
        assert n == before
    with pytest.raises(ValueError, match="threads"):
        threads.set_threads(-1)
    assert threads.describe(1, "").startswith("1 CPU thread, ")
    assert threads.describe(2, "").startswith("2 CPU threads, ")


def test_the_line_names_the_wait_in_use(monkeypatch):
    for key in threads.USER_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setitem(threads._state, "set", False)
    assert threads.wait_policy() == "idle threads spin (OpenMP's default)"
    monkeypatch.setitem(threads._state, "set", True)
    assert threads.wait_policy() == "idle threads sleep (OMP_WAIT_POLICY=PASSIVE)"
    monkeypatch.setitem(threads._state, "set", False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert threads.wait_policy() == "OpenMP wait set by the environment (GOMP_SPINCOUNT=0)"


@pytest.mark.parametrize("program, args", [("train", None), ("sample", ["--ckpt", "missing.pt"]),
                                           ("flops", ["--paper", "nope"]), ("scaling", ["--budgets", "x"])])
def test_each_program_sets_the_policy_before_torch_loads(program, args):
    """In a fresh process, with another program's load simulated: train.py on import (it imports torch at
    the top), the others in main(), which a bad argument ends early; torch must not be loaded before the
    policy is set."""
    code = (f"import sys, os; sys.argv = ['{program}.py']; import model.training.threads as t; "
            f"t.current_load = lambda **kw: 1.0; import {program}; "
            f"early = 'torch' in sys.modules and os.environ.get('OMP_WAIT_POLICY') is None; "
            f"code = {program}.main({args!r}) if {args!r} is not None else 0; "
            f"print(os.environ.get('OMP_WAIT_POLICY'), early, code)")
    env = {k: v for k, v in os.environ.items() if k not in threads.USER_KEYS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    policy, torch_first, code = out.stdout.split()
    assert policy == "PASSIVE" and torch_first == "False" and code in ("0", "2")
