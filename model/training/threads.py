"""CPU threads: how many torch uses, and how its OpenMP threads wait between parallel regions.

torch runs its CPU kernels on OpenMP threads, one per core by default, and every parallel region ends when
its slowest thread ends. Between regions libgomp's idle threads spin (busy-wait, up to 300,000 iterations)
before they sleep. On an idle machine that spin is part of why two threads are fast; with another program on
a core, the spinning threads take the time slices that program, and the straggling thread every region waits
for, need: a step with two threads can take many times one thread's. Sleeping at once
(OMP_WAIT_POLICY=PASSIVE) avoids the collapse but can cost time on an idle machine, and one thread beats two
sleeping ones beside a busy core (docs/performance.md, `bench/threads.py`). No fixed setting is best in both
states, so the programs look at the machine before they choose:

- before torch loads (OpenMP reads its wait policy once), the load other programs put on this process's CPUs
  over POLICY_WINDOW_S seconds: /proc/stat's busy time less this process's own CPU time. Under half a CPU:
  idle threads spin (OpenMP's default); more: they sleep (OMP_WAIT_POLICY=PASSIVE);
- the thread count, from the same reading over the time torch took to load (at least WINDOW_S): one per core
  (torch's default) less the CPUs other programs keep busy, at least one;
- while training, the same reading every GOVERN_S seconds moves the count when two readings in a row call
  for another one (ThreadGovernor), and the run says so in one line.

`--threads=N` (or OMP_NUM_THREADS) pins the count and an OpenMP wait setting of the user's own is left as it
is. Results depend on the thread count in their last bits: a pinned count repeats a run bit for bit, resumed
or not. Without /proc/stat (macOS, Windows) the load is unknown: torch's count, with threads that sleep.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

WAIT_ENV = "OMP_WAIT_POLICY"
COUNT_ENV = "OMP_NUM_THREADS"  # a count set in the environment is pinned, like --threads
USER_KEYS = (WAIT_ENV, "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # a user's own OpenMP wait setting wins
PROC_STAT = "/proc/stat"
POLICY_WINDOW_S = 0.05  # the reading before torch loads: a wrong guess near the threshold costs little
WINDOW_S = 0.2  # the reading behind the count, usually the time torch took to load
GOVERN_S = 2.0  # the readings while training
IDLE_BELOW = 0.5  # CPUs used by other programs under which the machine counts as idle
# whether set_wait_policy chose the policy; the last load sample; why the count is what it is
_state = {"set": False, "sample": None, "why": "", "ceiling": None}


# ---- the load other programs put on this process's CPUs

def allowed_cpus() -> set[int]:
    """The CPUs this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def busy_seconds(stat_text: str, cpus: set[int], tick: int) -> float:
    """CPU-seconds /proc/stat counts as busy (user, nice, system, irq, softirq, steal) on the given CPUs."""
    total = 0
    for line in stat_text.splitlines():
        name, *fields = line.split()
        if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in cpus:
            counts = [int(f) for f in fields[:8]] + [0] * (8 - len(fields[:8]))  # old kernels list fewer
            user, nice, system, _idle, _iowait, irq, softirq, steal = counts
            total += user + nice + system + irq + softirq + steal
    return total / tick


def read_sample(path: str = PROC_STAT) -> tuple[float, float, float] | None:
    """(wall clock, busy CPU-seconds of this process's CPUs, this process's own CPU-seconds, every thread);
    None where the system has no /proc/stat."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    return time.monotonic(), busy_seconds(text, allowed_cpus(), os.sysconf("SC_CLK_TCK")), time.process_time()


def others_load(a: tuple, b: tuple) -> float:
    """CPUs that other programs kept busy between two samples (their busy time less this process's)."""
    wall = b[0] - a[0]
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / wall) if wall > 0 else 0.0


def current_load(sample=read_sample, sleep=time.sleep, window: float = WINDOW_S) -> float | None:
    """Other programs' load since the last sample when that is `window` to 10 s old, else over a fresh
    `window`; None when unknown."""
    last, now = _state["sample"], sample()
    if now is None:
        return None
    if last is None or not window <= now[0] - last[0] <= 10:
        last = now
        sleep(window)
        now = sample()
    _state["sample"] = now
    return others_load(last, now)


def fitting_threads(ceiling: int, cpus: int, others: float) -> int:
    """One thread per CPU less the CPUs other programs keep busy (from half a CPU up), within [1, ceiling]."""
    return max(1, min(ceiling, math.floor(cpus - others + 0.5)))


# ---- the choices

def set_wait_policy(environ=None, modules=None, load=None) -> bool:
    """OMP_WAIT_POLICY=PASSIVE for this process and its children when other programs keep at least half a
    CPU busy or the load is unknown; OpenMP's default (spin, then sleep) on an idle machine. Nothing when
    torch is already loaded (too late: OpenMP has read its settings) or the user set an OpenMP wait setting.
    True if it set PASSIVE."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if "torch" in modules or any(k in environ for k in USER_KEYS):
        return False
    others = load() if load else current_load(window=POLICY_WINDOW_S)
    if others is not None and others < IDLE_BELOW:
        return False
    environ[WAIT_ENV] = "PASSIVE"
    if environ is os.environ:
        _state["set"] = True
    return True


def pinned(threads: int, environ=None) -> bool:
    """Whether the count is the user's (--threads=N, OMP_NUM_THREADS) rather than chosen from the load."""
    return threads > 0 or COUNT_ENV in (os.environ if environ is None else environ)


def set_threads(threads: int, load=None) -> int:
    """torch's CPU thread count: `threads` when > 0; with 0, OMP_NUM_THREADS's when set, else the count that
    fits the load (fitting_threads of torch's default). Returns it."""
    import torch

    from ..config import check
    check("threads", threads, int, 0)
    _state["ceiling"] = None
    if threads:
        torch.set_num_threads(threads)
        _state["why"] = "--threads"
    elif pinned(0):
        _state["why"] = COUNT_ENV
    else:
        ceiling, others = torch.get_num_threads(), (load or current_load)()
        if others is None:
            _state["why"] = "torch's default; the load is unknown"
        else:
            cpus = len(allowed_cpus())
            torch.set_num_threads(fitting_threads(ceiling, cpus, others))
            _state["why"], _state["ceiling"] = f"other programs use {others:.1f} of {cpus} CPUs", ceiling
    return torch.get_num_threads()


@contextmanager
def cpu_threads(threads: int):
    """set_threads(threads) inside the block; torch keeps the count process-wide, so the caller's comes back
    on the way out."""
    import torch
    previous = torch.get_num_threads()
    set_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


class ThreadGovernor:
    """While a run trains with a count chosen from the load: every `period` seconds, the count that fits the
    load now (fitting_threads); when two readings in a row agree on another count, torch switches to it.
    check() returns the line that says so, else None. A count never rises above `ceiling`."""

    def __init__(self, ceiling: int, sample=read_sample, period: float = GOVERN_S, clock=time.monotonic):
        self.ceiling, self.sample, self.period, self.clock = ceiling, sample, period, clock
        self.last, self.pending, self.cpus = sample(), None, len(allowed_cpus())

    def check(self) -> str | None:
        import torch
        if self.last is None or self.clock() - self.last[0] < self.period:
            return None
        now = self.sample()
        others, self.last = others_load(self.last, now), now
        want, current = fitting_threads(self.ceiling, self.cpus, others), torch.get_num_threads()
        if want == current or self.pending != want:
            self.pending = None if want == current else want
            return None
        torch.set_num_threads(want)
        self.pending = None
        return f"{current} -> {want} CPU threads (other programs use {others:.1f} of {self.cpus} CPUs)"


def governor(sample=read_sample) -> ThreadGovernor | None:
    """A ThreadGovernor for the count the last set_threads chose from the load; None when it was pinned or
    the load is unknown."""
    return ThreadGovernor(_state["ceiling"], sample) if _state["ceiling"] else None


# ---- what the lines say

def wait_policy() -> str:
    """What the start-up lines say about the waiting threads."""
    given = {k: os.environ[k] for k in USER_KEYS if k in os.environ}
    if _state["set"]:
        return "idle threads sleep (OMP_WAIT_POLICY=PASSIVE)"
    if given:
        return "OpenMP wait set by the environment (" + ", ".join(f"{k}={v}" for k, v in given.items()) + ")"
    return "idle threads spin (OpenMP's default)"


def describe(threads: int | None = None, why: str | None = None, policy: str | None = None) -> str:
    """One phrase for a start-up line: '1 CPU thread (other programs use 1.0 of 2 CPUs), idle threads sleep
    (OMP_WAIT_POLICY=PASSIVE)'; `why` and `policy` replace the last set_threads's reason and wait_policy()."""
    if threads is None:
        import torch
        threads = torch.get_num_threads()
    why = _state["why"] if why is None else why
    plural = "s" if threads != 1 else ""
    return f"{threads} CPU thread{plural}{f' ({why})' if why else ''}, {policy or wait_policy()}"


def describe_children(threads: int, free: int) -> str:
    """The phrase for child runs started with child_env, `free` CPUs shared among them."""
    given = any(k in os.environ for k in USER_KEYS)
    policy = wait_policy() if given else "idle threads sleep (OMP_WAIT_POLICY=PASSIVE)"
    return describe(threads, f"{free} free CPU{'s' if free != 1 else ''} shared", policy)


def child_env(threads: int, environ=None) -> dict:
    """The environment of a child training process with `threads` CPU threads (pinned) and sleeping idle
    threads: children run beside each other."""
    env = dict(os.environ if environ is None else environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if not any(k in env for k in USER_KEYS):
        env[WAIT_ENV] = "PASSIVE"
    return env
