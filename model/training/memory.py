"""Memory a config needs, estimated before anything is allocated.

A size that cannot fit (a vocabulary of 5e9, a batch of 1e7, a 1e9-token context) is refused with one line
naming the figures, instead of a swap storm, an allocator traceback or the OOM killer. The estimates are
lower bounds: what the tensors themselves take, nothing for the allocator's slack or the framework, so a
refusal is certain and a config that passes can still be tight.

    parameters    the model's weights (counted exactly: model/flops/formulas.py's params_total, the closed form
                  a test checks against GPT.num_params)
    gradients     one per parameter
    AdamW moments two per parameter (exp_avg, exp_avg_sq)
    activations   what backward keeps per layer: 16 values per token (Korthikanti et al. 2022, "Reducing
                  Activation Recomputation in Large Transformer Models", 34·s·b·h bytes at 2 bytes a value,
                  less the dropout masks), plus the (B, T, V) logits and their gradient
    KV cache      keys and values of every layer for every row and position, twice for beam search (it
                  reorders into a spare pair)
    tokens        the (rows, T + n) int64 buffer of sampled sequences
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import GPTConfig
from ..flops.formulas import params_total

FLOAT32 = 4
INT64 = 8
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


class InsufficientMemoryError(ValueError):
    """A config needs more memory than the machine has."""


def weights_bytes(cfg: GPTConfig, itemsize: int = FLOAT32) -> dict[str, int]:
    return {"parameters": params_total(cfg) * itemsize}


def training_bytes(cfg: GPTConfig, batch_size: int, itemsize: int = FLOAT32) -> dict[str, int]:
    """Lower bound of one training step's memory, per process: weights, gradients, AdamW moments and the
    activations of a (batch_size, block_size) micro-batch."""
    weights = weights_bytes(cfg)["parameters"]
    tokens = batch_size * cfg.block_size
    return {"parameters": weights, "gradients": weights, "AdamW moments": 2 * weights,
            "activations": itemsize * tokens * (16 * cfg.n_layer * cfg.n_embd + 2 * cfg.vocab_size)}


def sampling_bytes(cfg: GPTConfig, rows: int, total_len: int, *, use_cache: bool = True,
                   beams: bool = False, itemsize: int = FLOAT32) -> dict[str, int]:
    """Lower bound of generating `rows` sequences (num_samples x num_beams) of total_len tokens."""
    window = min(cfg.block_size, total_len)
    cache = 2 * cfg.n_layer * rows * window * cfg.n_embd * itemsize if use_cache else 0
    return {"parameters": weights_bytes(cfg, itemsize)["parameters"], "KV cache": cache * (2 if beams else 1),
            "tokens": rows * total_len * INT64, "logits": rows * cfg.vocab_size * itemsize}


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
