"""CPU kernels for training, behind one setting: GPT(config, cpu_kernels=True).

With cpu_kernels=True the model computes the same function with two CPU-specific changes:
- attention takes the manual path (q kᵀ, masked softmax, att v) instead of SDPA: on the CPU, SDPA has no
  fused kernel for attention dropout (it falls back to its math path, with torch's serial dropout mask and
  extra masking passes), and with bf16 matmul inputs (float32 matmul precision "medium") its flash kernel's
  small block matmuls go through oneDNN's bf16 path, far slower than one batched matmul;
- dropout masks come from numpy's PCG64 in bulk (`Dropout` below) instead of torch's CPU generator, which
  draws one element at a time.
train.py turns them on for eager CPU runs that use either (see `use_cpu_kernels`). The gains, measured, are in
docs/performance.md.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


def use_cpu_kernels(device_type: str, dropout: float, matmul_precision: str, compile: bool) -> bool:
    """Whether a training run on `device_type` gains from cpu_kernels=True: eager CPU runs with dropout or
    with bf16 matmul inputs (matmul_precision "medium"). Compiled models keep torch's kernels: Inductor
    fuses its own dropout masks, and numpy would break the graph."""
    return device_type == "cpu" and not compile and (dropout > 0.0 or matmul_precision == "medium")


class Dropout(nn.Module):
    """nn.Dropout with its keep mask drawn by numpy's PCG64 in bulk (about 2 ns per element against torch's
    11 ns on the CPU), seeded by one draw from torch's default generator, so torch.manual_seed and the RNG
    state saved in checkpoints still fix every mask. Same distribution: keep x / (1 - p) where u >= p, u
    uniform on [0, 1) at float32's 24-bit resolution (torch.rand's). Off the CPU, and while torch.compile
    traces (numpy would break the graph), it is F.dropout.
    """

    CHUNK = 1 << 20  # uniforms per numpy call: a reused buffer of at most 4 MB, not one as large as x

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._u = None  # the reused float32 buffer for the uniforms (not state: refilled every call)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        rng = np.random.Generator(np.random.PCG64(seed))
        n = x.numel()
        if self._u is None or self._u.size < min(n, self.CHUNK):  # grows to the largest chunk seen
            self._u = np.empty(min(n, self.CHUNK), dtype=np.float32)
        u = torch.from_numpy(self._u)  # shares memory with the numpy buffer
        keep = torch.empty(n, dtype=torch.bool)  # (n,): all that backward keeps
        for start in range(0, n, self.CHUNK):
            m = min(self.CHUNK, n - start)
            rng.random(out=self._u[:m], dtype=np.float32)
            torch.ge(u[:m], self.p, out=keep[start:start + m])
        # where's backward needs only the mask, so the scaling can run in place on its output
        return torch.where(keep.view(x.shape), x, 0.0).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"
