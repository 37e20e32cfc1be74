"""Process-wide settings for training: glibc's allocator on the CPU, and the precision of float32 matmuls.

The allocator: a training step allocates and frees the same large activations every step. glibc serves every
block above its mmap threshold (32 MB at most) with a fresh mmap and unmaps it on free, so each step pays the
kernel's page faults and page zeroing again for every large tensor. At nanoGPT's shakespeare_char shape,
(64, 6, 256, 256) attention weights are 100 MB each. What the setting buys, measured, is in
docs/performance.md. The CUDA caching allocator keeps freed GPU memory for reuse for the same reason.

The matmul precision: TrainConfig.matmul_precision, resolved and described here, set by train.py for a run;
and the autocast dtype of a run (resolve_dtype).
"""
from __future__ import annotations

import ctypes
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of freed memory at the top of the heap before returning it


def cpu_process_settings() -> bool:
    """Serve large allocations from the heap and keep freed memory for the next step (glibc only).

    Trade-off: the process's resident memory stays at its peak instead of shrinking between steps, and the
    peak grows a little (recipe (b), 3 steps: 5,266 -> 5,506 MB, heap fragmentation). Returns
    True if applied; False where the C library is not glibc (macOS, musl: nothing changes there).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt: not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # musl's mallopt is a stub that returns 0: report it as not applied
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def resolve_matmul_precision(name: str, device_type: str) -> str:
    """TrainConfig.matmul_precision -> a torch.set_float32_matmul_precision value. "auto" is "high" on CUDA
    (TF32, as nanoGPT sets it) and "highest" on the CPU, where full fp32 keeps runs identical across CPUs."""
    from ..config import MATMUL_PRECISIONS
    if name not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {name!r}")
    if name == "auto":
        return "high" if device_type == "cuda" else "highest"
    return name


@contextmanager
def matmul_precision(name: str, device_type: str):
    """Float32 matmuls at `name` (resolved as above) inside the block. torch keeps the setting process-wide,
    so the caller's is put back on the way out, exceptions included."""
    import torch
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(resolve_matmul_precision(name, device_type))
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def cpu_bf16_matmul_unit() -> str | None:
    """What serves fp32 matmuls under "medium" on this CPU: "AMX", "AVX512-BF16", "emulated" (torch sends them
    to oneDNN wherever its bf16 device check passes, AVX-512 without bf16 units included: likely slower than
    fp32), or None (no oneDNN bf16: "medium" changes nothing)."""
    import torch
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    return "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else "emulated"


def describe_matmul_precision(precision: str, device_type: str) -> str:
    """One phrase for the start-up line: what `precision` does to float32 matmuls on this device."""
    if precision == "highest":
        return "fp32 matmuls in full fp32"
    if device_type == "cuda":
        return f"fp32 matmuls at precision {precision!r} ({'TF32' if precision == 'high' else 'bf16 or TF32'})"
    if precision == "medium":
        unit = cpu_bf16_matmul_unit()
        if unit is None:
            return "fp32 matmuls in full fp32 (matmul_precision='medium' has no effect: no oneDNN bf16 on this CPU)"
        unit = "no bf16 unit: emulated, likely slower" if unit == "emulated" else unit
        return f"fp32 matmuls with bf16 inputs and fp32 accumulation (oneDNN, {unit})"
    return "fp32 matmuls at precision 'high' (TF32 only where oneDNN has it for this CPU)"


def resolve_dtype(name: str, device) -> str:
    """TrainConfig.dtype -> the autocast dtype of a run: "auto" is bfloat16 on a CUDA device that supports
    it, else float32; bfloat16 on the CPU is kept (its autocast works, rarely faster)."""
    import torch
    if name == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return name
