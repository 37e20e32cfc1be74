"""Peak FLOP/s for MFU: dense bf16 tensor-core peaks of common GPUs, and a calibrated CPU fp32 peak.

MFU (model FLOPs utilization, PaLM App. B) = achieved model FLOPs per second / peak FLOP/s. The GPU peaks
are the vendors' dense figures (datasheets list "with sparsity" figures, marked *, that are 2x these).
"""
from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuPeak:
    key: str  # short name for the planner's --device
    pattern: str  # regex matched against torch.cuda.get_device_name()
    flops: float  # dense bf16 (V100, T4: fp16) tensor-core FLOP/s
    note: str


# First match wins, so variants come before the family name (H100 NVL before H100, L40S before L4).
GPU_PEAKS: tuple[GpuPeak, ...] = (
    # NVIDIA H100 datasheet: BF16 Tensor Core 1,979 (SXM) / 1,671 (NVL) / 1,513 (PCIe) TFLOPS*, sparse
    GpuPeak("h100-nvl", r"\bH100 NVL\b", 835e12, "H100 NVL, dense bf16"),
    GpuPeak("h100-pcie", r"\bH100 PCIe\b", 756e12, "H100 PCIe, dense bf16"),
    GpuPeak("h100", r"\bH100\b", 989.4e12, "H100 SXM, dense bf16"),
    # NVIDIA H200 datasheet: BF16 Tensor Core 1,979 (SXM) / 1,671 (NVL) TFLOPS*, sparse
    GpuPeak("h200-nvl", r"\bH200 NVL\b", 835e12, "H200 NVL, dense bf16"),
    GpuPeak("h200", r"\bH200\b", 989.4e12, "H200 SXM, dense bf16"),
    # NVIDIA HGX B200 spec: FP16/BF16 4.5 PFLOPS* per GPU, sparse
    GpuPeak("b200", r"\bB200\b", 2250e12, "B200, dense bf16"),
    # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624* sparse), SXM and PCIe alike
    GpuPeak("a100", r"\bA100\b", 312e12, "A100, dense bf16"),
    # A10G (AWS g5): 70 TFLOPS bf16 dense (Baseten, "NVIDIA A10 vs A10G for ML model inference");
    # NVIDIA A10 datasheet: BF16 Tensor Core 125 TFLOPS (250* sparse)
    GpuPeak("a10g", r"\bA10G\b", 70e12, "A10G, dense bf16"),
    GpuPeak("a10", r"\bA10\b", 125e12, "A10, dense bf16"),
    # NVIDIA datasheets: L40S BF16 Tensor Core 362.05 (733* sparse), L40 181.05 (362.1*), L4 242* sparse
    GpuPeak("l40s", r"\bL40S\b", 362.05e12, "L40S, dense bf16"),
    GpuPeak("l40", r"\bL40\b", 181.05e12, "L40, dense bf16"),
    GpuPeak("l4", r"\bL4\b", 121e12, "L4, dense bf16"),
    # NVIDIA Ampere GA102 whitepaper (RTX 3090): BF16 tensor, FP32 accumulate 71 TFLOPS (142* sparse);
    # NVIDIA Ada whitepaper (RTX 4090): BF16 tensor, FP32 accumulate 165.2 TFLOPS (330.4* sparse)
    GpuPeak("rtx3090", r"\bRTX 3090\b", 71e12, "GeForce RTX 3090, dense bf16 (fp32 accumulate)"),
    GpuPeak("rtx4090", r"\bRTX 4090\b", 165.2e12, "GeForce RTX 4090, dense bf16 (fp32 accumulate)"),
    # NVIDIA V100 datasheet: Tensor performance 125 (SXM2) / 112 (PCIe) TFLOPS, fp16 (no bf16 on Volta)
    GpuPeak("v100-pcie", r"\bV100-PCIE", 112e12, "V100 PCIe, fp16 tensor"),
    GpuPeak("v100", r"\bV100\b", 125e12, "V100 SXM2, fp16 tensor"),
    # NVIDIA T4 datasheet: Mixed precision (FP16/FP32) 65 TFLOPS (no bf16 on Turing)
    GpuPeak("t4", r"\bT4\b", 65e12, "T4, fp16 tensor"),
)


def gpu_peak(name: str) -> GpuPeak:
    """The table entry for a CUDA device name (torch.cuda.get_device_name()); ValueError if unknown."""
    for entry in GPU_PEAKS:
        if re.search(entry.pattern, name, flags=re.IGNORECASE):
            return entry
    raise ValueError(f"unknown GPU {name!r}: no peak FLOP/s in model/peaks.py; pass --peak_flops=<FLOP/s> "
                     f"(its dense bf16 tensor-core peak)")


def peak_by_key(key: str) -> GpuPeak:
    """The table entry for a short name such as h100 or a100 (the planner's --device)."""
    for entry in GPU_PEAKS:
        if entry.key == key.lower():
            return entry
    names = ", ".join(["cpu"] + [e.key for e in GPU_PEAKS])
    raise ValueError(f"unknown device {key!r}; known: {names}")


def _matmul_seconds(a, b, repeats: int) -> float:
    import torch
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """One CPU fp32 calibration at the current float32 matmul precision, uncached: the best of `repeats` timed
    (n, n) @ (n, n) matmuls after one warm-up (2·n³ FLOPs each; about 0.1-0.5 s in all), in FLOP/s. Other work
    on the machine makes it read low; train.py measures again at evaluations and keeps the highest reading."""
    import torch
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)  # (n, n)
    b = torch.randn(n, n, generator=g)  # (n, n)
    torch.mm(a, b)  # warm-up: thread pool, caches
    return 2 * n ** 3 / _matmul_seconds(a, b, repeats)


def cpu_peak(n: int = 1024, repeats: int = 5) -> tuple[float, str]:
    """measure_cpu_peak, cached for the process (the first call measures), with a description. The matmuls
    run at the current torch.get_float32_matmul_precision(): under "medium" that is the bf16 peak (oneDNN, AMX
    where present) which such a run's matmuls use, calibrated and cached separately."""
    import torch
    return _cpu_peak(torch.get_float32_matmul_precision(), n, repeats)


@functools.lru_cache(maxsize=4)
def _cpu_peak(precision: str, n: int, repeats: int) -> tuple[float, str]:
    import torch
    kind = "fp32" if precision != "medium" else "fp32 matmuls with bf16 inputs (precision 'medium')"
    return measure_cpu_peak(n, repeats), (f"CPU {kind}, calibrated: best of {repeats} {n}x{n} matmuls on "
                                          f"{torch.get_num_threads()} threads")


def peak_flops(device, override: float = 0.0) -> tuple[float, str]:
    """Peak FLOP/s of `device` (torch.device or str) and a description.

    override > 0 wins. CUDA: the dense bf16 table above, matched on the device name (unknown GPU ->
    ValueError asking for --peak_flops). CPU: a short calibrated fp32 matmul measurement, once per process.
    """
    import torch
    if isinstance(override, bool) or not isinstance(override, (int, float)) or not math.isfinite(override) \
            or override < 0:
        raise ValueError(f"peak_flops override must be a finite number >= 0, got {override!r}")
    if override > 0:
        return float(override), "given (--peak_flops)"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        entry = gpu_peak(name)
        return entry.flops, f"{name}: {entry.note}"
    if device.type == "cpu":
        return cpu_peak()
    raise ValueError(f"no peak FLOP/s known for device type {device.type!r}; pass --peak_flops=<FLOP/s>")


def mfu(flops_per_step: float, step_seconds: float, peak: float) -> float:
    """Model FLOPs utilization: (flops_per_step / step_seconds) / peak."""
    if not step_seconds > 0 or not math.isfinite(step_seconds):
        raise ValueError(f"step_seconds must be a positive finite number, got {step_seconds!r}")
    if not peak > 0 or not math.isfinite(peak):
        raise ValueError(f"peak must be a positive finite FLOP/s, got {peak!r}")
    if flops_per_step < 0:
        raise ValueError(f"flops_per_step must be >= 0, got {flops_per_step!r}")
    return flops_per_step / step_seconds / peak
