"""CPU threads: how many torch uses, and how its OpenMP threads wait between parallel regions.

torch runs its CPU kernels on OpenMP threads, one per core by default, and every parallel region ends when
its slowest thread ends. Between regions, libgomp's idle threads spin (busy-wait, up to 300,000 iterations)
before they sleep. On a machine where another program keeps a core busy, the spinning thread burns the time
slice that the other program, or the straggling thread every region waits for, needed: steps of the default
run took several times longer with two threads than with one. With OMP_WAIT_POLICY=PASSIVE a waiting thread
sleeps at once; measured on idle and busy machines in docs/performance.md (`bench/threads.py`). OpenMP
reads the policy once, when torch loads it, so the programs call set_wait_policy() before they import torch.

The thread count stays fixed for a run: results depend (in the last bits) on the number of threads, and a
resumed run must compute what an uninterrupted one does.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

WAIT_ENV = "OMP_WAIT_POLICY"
USER_KEYS = (WAIT_ENV, "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # a user's own OpenMP wait setting wins
_state = {"set": False}  # whether set_wait_policy chose the policy for this process


def set_wait_policy(environ=None, modules=None) -> bool:
    """OMP_WAIT_POLICY=PASSIVE for this process and its children, unless torch is already loaded (too late:
    OpenMP has read its settings) or the user set an OpenMP wait setting. True if it set it."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if "torch" in modules or any(k in environ for k in USER_KEYS):
        return False
    environ[WAIT_ENV] = "PASSIVE"
    if environ is os.environ:
        _state["set"] = True
    return True


def set_threads(threads: int) -> int:
    """torch's CPU thread count: `threads` when > 0, else torch's default (one per core). Returns it."""
    import torch

    from ..config import check
    check("threads", threads, int, 0)
    if threads:
        torch.set_num_threads(threads)
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


def wait_policy() -> str:
    """What the start-up lines say about the waiting threads."""
    given = {k: os.environ[k] for k in USER_KEYS if k in os.environ}
    if _state["set"]:
        return "idle threads sleep (OMP_WAIT_POLICY=PASSIVE)"
    if given:
        return "OpenMP wait set by the environment (" + ", ".join(f"{k}={v}" for k, v in given.items()) + ")"
    return "OpenMP's default wait (torch was loaded before OMP_WAIT_POLICY could be set)"


def describe(threads: int | None = None) -> str:
    """One phrase for a start-up line: '2 CPU threads, idle threads sleep (OMP_WAIT_POLICY=PASSIVE)'."""
    if threads is None:
        import torch
        threads = torch.get_num_threads()
    return f"{threads} CPU thread{'s' if threads != 1 else ''}, {wait_policy()}"


def child_env(threads: int, environ=None) -> dict:
    """The environment of a child training process with `threads` CPU threads and the wait policy above."""
    env = dict(os.environ if environ is None else environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if not any(k in env for k in USER_KEYS):
        env[WAIT_ENV] = "PASSIVE"
    return env
