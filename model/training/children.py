"""Child processes that stop with their parent: a sweep's train.py runs (scaling.py), never orphans."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _stop_with_parent(parent: int) -> None:
    """In the child, before exec: the kernel sends SIGTERM when the parent dies (Linux), so train.py saves
    and exits instead of running on as an orphan that holds its out_dir's lock."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(143)


def start_child(cmd: list[str], log, env: dict) -> subprocess.Popen:
    """Popen(cmd) with stdout and stderr to `log`, stopped (SIGTERM) when this process dies, even by
    SIGKILL."""
    parent = os.getpid()
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=lambda: _stop_with_parent(parent))
