"""The memory a model's weights need, and the machine's memory, checked before anything is allocated.

A size that cannot fit is refused with one line naming the figures (InsufficientMemoryError), instead of a
swap storm, an allocator traceback or the OOM killer. Here for loading weights (GPT.from_pretrained);
model/training/memory.py adds what training and sampling need on top.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import GPTConfig, param_count

FLOAT32 = 4
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


class InsufficientMemoryError(ValueError):
    """A config needs more memory than the machine has."""


def weights_bytes(cfg: GPTConfig, itemsize: int = FLOAT32) -> dict[str, int]:
    return {"parameters": param_count(cfg) * itemsize}


def machine_memory(device: str | torch.device = "cpu") -> tuple[int, str]:
    """(bytes, where the figure comes from): the GPU's total memory, else the smaller of the machine's RAM
    and the cgroup (container) limit."""
    device = torch.device(device)
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return total, f"{torch.cuda.get_device_name(device)} total memory"
    best = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    for path in CGROUP_LIMITS:
        try:
            limit = int(path.read_text().strip())
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
        if limit < best[0]:
            best = limit, f"container limit ({path})"
    return best


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(parts: dict[str, int], what: str, device: str | torch.device = "cpu") -> int:
    """Raise InsufficientMemoryError naming every figure when the parts add up to more than the machine's
    memory; returns the total."""
    total = sum(parts.values())
    have, source = machine_memory(device)
    if total > have:
        detail = ", ".join(f"{name} {gib(n)}" for name, n in parts.items() if n >= 2**30 / 20)  # >= 0.05 GiB
        raise InsufficientMemoryError(f"{what} needs at least {gib(total)} ({detail}), more than the "
                                      f"{gib(have)} of {source} on this machine")
    return total
