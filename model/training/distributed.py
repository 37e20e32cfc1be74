"""Data parallel bookkeeping for torchrun: this process's rank, the process group, and the two collectives
train.py needs (a mean of a float, an any of a flag). A single process is rank 0 of 1 and needs no group."""
from __future__ import annotations

import gc
import os

import torch
import torch.distributed as torch_dist


class Distributed:
    """Rank bookkeeping for torchrun; a single process is rank 0 of 1."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.master = self.rank == 0

    def setup(self, device):
        if not self.enabled:
            return device
        if device.type == "cuda":
            device = torch.device(f"cuda:{self.local_rank}")
            torch.cuda.set_device(device)
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return device

    def mean(self, value: float, device) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch_dist.all_reduce(t)
        return t.item() / self.world

    def any(self, flag: bool, device) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=device)  # nccl reduces only CUDA tensors
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    def teardown(self):
        """Destroy the process group. Call it after dropping the DDP wrapper: its reducer holds the gloo group,
        and if the reducer's deallocation (GIL held) is what frees the group, the group's destructor joins a
        worker thread that waits for the GIL to free a tensor: a deadlock at exit, seen in about 1 of 4
        two-rank CPU runs. Here the group is shut down by destroy_process_group instead."""
        if self.enabled:
            gc.collect()  # the wrapper sits in reference cycles (module hooks)
            if torch_dist.is_initialized():
                torch_dist.destroy_process_group()
