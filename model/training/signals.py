"""Stopping a run on purpose: SIGINT/SIGTERM set a flag that train.py checks at safe points (between setup
stages, evaluation batches and training steps), and TrainingStopped carries the exit code out."""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager


class TrainingStopped(Exception):
    """Training ended early on purpose (signal) or by a numerical failure; carries the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def exit_code(signal_name: str) -> int:
    return 128 + signal.Signals[signal_name].value  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def stop_before_training(stop_flag: dict) -> None:
    """A signal during setup: stop now; nothing was trained, so there is nothing to save."""
    name = stop_flag.get("signal")
    if name:
        raise TrainingStopped(f"{name} received during setup: stopped before training; nothing to save",
                              exit_code(name))


@contextmanager
def install_signal_handlers(stop_flag: dict, prog: str = "train.py"):
    """The first SIGINT or SIGTERM sets stop_flag["signal"]: the run stops at its next safe point (between
    setup stages, evaluation batches or training steps), saves and exits (train.py's check_stop). A second
    one ends the process at once, by the signal's default action: checkpoints are written atomically, so
    nothing on disk is torn. The previous handlers come back on the way out."""
    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if "signal" in stop_flag:
            os.write(2, f"\n{prog}: second {name}: exiting now\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stop_flag["signal"] = name
        os.write(2, f"\n{prog}: {name} received: stopping at the next safe point (send it again to exit at "
                    f"once)\n".encode())  # os.write: safe even while the handler interrupts a print

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
