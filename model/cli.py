"""Helpers shared by the command-line scripts (train.py, sample.py, flops.py, data/prepare.py, bench/)."""
from __future__ import annotations

import sys
from typing import Callable

import torch

YEAR_S = 365.25 * 86400


def human(x: float, unit: str = "FLOPs") -> str:
    """3.144e+23 FLOPs: three decimals in scientific notation, as the papers quote compute."""
    return f"{x:.3e} {unit}"


def duration(seconds: float) -> str:
    """Seconds as the largest unit that keeps the figure readable: s, min, h, days, years."""
    for limit, size, name in ((120, 1, "s"), (7200, 60, "min"), (172800, 3600, "h"), (2 * YEAR_S, 86400, "days")):
        if seconds < limit:
            return f"{seconds / size:.1f} {name}"
    return f"{seconds / YEAR_S:.1f} years"


def resolve_device(name: str, flag: str = "device") -> torch.device:
    """"auto" (cuda when available), "cpu", "cuda" or "cuda:N" -> a torch.device; ValueError naming `flag`
    for anything else, or for cuda on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} {name!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name!r} but CUDA is not available; use cpu")
    return device


def report_errors(prog: str, body: Callable[[], int], errors: tuple[type, ...] = (ValueError, FileNotFoundError)) -> int:
    """Run a CLI's body and return its exit code; a bad input (one of `errors`) becomes one line on stderr,
    `prog: error: ...`, and exit code 2 instead of a traceback."""
    try:
        return body()
    except errors as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
