"""Process-wide settings for training on the CPU.

One setting so far, for glibc's allocator. A training step allocates and frees the same large activations
every step. glibc serves every block above its mmap threshold (32 MB at most) with a fresh mmap and
unmaps it on free, so each step pays the kernel's page faults and page zeroing again for every large tensor.
At nanoGPT's shakespeare_char shape, (64, 6, 256, 256) attention weights are 100 MB each. Measured in
BENCHMARKS.md: 12% of that recipe's CPU time went to the kernel, and this setting takes about 17% off its step.
The CUDA caching allocator keeps freed GPU memory for reuse for the same reason.
"""
from __future__ import annotations

import ctypes

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
