"""AVX-512 kernels for CPU decoding, behind one setting: kernels="avx512".

A decoding step multiplies a few rows (one per sequence, one per beam) by every weight matrix, so its speed is
how fast the weights stream from memory; for a small model it is how many ops the step dispatches. Two entry
points (cpu_decode.cpp):
- `linear`: the product of up to 4 rows with one weight matrix, each weight row streamed once for all the rows,
  fp32 accumulation, a prefetch ahead. torch's CPU kernels read the weights well below the bandwidth in bf16
  and for several rows (bench/gemv.py). Results equal F.linear's up to the order of the sums (and, in bf16,
  one rounding of the output).
- `step`: a whole decoding step of up to 4 rows at one new position (embedding, every block with its cache
  write and attention, the head) in one call, the products through the same kernel. In place of about 15
  torch ops per layer. Activations stay in fp32; in bf16 only the inputs of the products and the cached
  keys and values are rounded to bf16.

The C++ is built with torch.utils.cpp_extension on first use (once, under a minute); the library is kept under
torch's extensions folder (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and loads in a fraction of
a second afterwards. It needs an x86-64 CPU with AVX-512 (AVX512-BF16 for bfloat16), a C++ compiler and ninja.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
NAME = "flopgpt_cpu_decode"
MAX_ROWS = 4  # rows one pass over the weights serves; decode.py sends larger inputs to torch's GEMM


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def unavailable(dtype: torch.dtype) -> str | None:
    """Why the kernel cannot run for `dtype` on this machine, or None when it can."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"it computes float32 and bfloat16, not {str(dtype).removeprefix('torch.')}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs an x86-64 CPU, this one is {platform.machine()}"
    needed = {"avx512f", "avx512bw"} | ({"avx512_bf16"} if dtype == torch.bfloat16 else set())
    missing = sorted(needed - cpu_flags())
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if _library.cache_info().currsize:  # built and loaded: no compiler needed, and each call stays cheap
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"it is built on first use and no C++ compiler ({compiler}) is on PATH"
    from torch.utils.cpp_extension import is_ninja_available
    if not is_ninja_available():
        return "it is built on first use with ninja, which is not installed (pip install ninja)"
    return None


def check(dtype: torch.dtype, device: torch.device) -> None:
    """ValueError naming the reason when kernels="avx512" cannot run for `dtype` on `device`."""
    reason = "it runs on the CPU only" if torch.device(device).type != "cpu" else unavailable(dtype)
    if reason:
        raise ValueError(f"kernels='avx512' cannot run here: {reason}; use kernels='torch'")


FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp"]  # bf16 code runs only where checked


@functools.cache
def _library():
    from torch.utils.cpp_extension import get_default_build_root, load
    code = SOURCE.read_bytes()
    # one folder per source, flags and torch version, the source copied in: every checkout of the same code
    # shares one build, and another version never rebuilds over it (ninja rebuilds when a path changes)
    tag = hashlib.sha256(b"\0".join([code, " ".join(FLAGS).encode(), torch.__version__.encode()])).hexdigest()
    build = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / f"{NAME}_{tag[:12]}"
    source = build / SOURCE.name
    if not any(build.glob(f"{NAME}*.so")):
        print(f"building the AVX-512 decoding kernels (once, under a minute) in {build}", file=sys.stderr)
    try:
        build.mkdir(parents=True, exist_ok=True)
        if not source.exists() or source.read_bytes() != code:
            source.write_bytes(code)
        return load(NAME, [str(source)], extra_cflags=FLAGS, build_directory=str(build))
    except (RuntimeError, OSError, ImportError) as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"kernels='avx512': building {SOURCE.name} failed ({last}); use kernels='torch'") from e


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (R, in) · w (out, in)ᵀ + b -> (R, out), one dtype (float32 or bfloat16), contiguous tensors."""
    return _library().linear(x, w, b)


def step(idx: torch.Tensor, pos: int, params: list, k: torch.Tensor, v: torch.Tensor, n_head: int,
         tanh_gelu: bool, eps: float = 1e-5) -> torch.Tensor:
    """One decoding step of idx (R,) int64, R <= MAX_ROWS, at position pos -> logits (R, V) float32; writes
    the keys and values of pos into the caches k, v (n_layer, R, n_head, max_len, head_dim). params: the
    parameter list of cpu_decode.cpp's step, in the caches' dtype (Decoder builds it)."""
    return _library().step(idx, pos, params, k, v, n_head, tanh_gelu, eps)
