"""Peak FLOP/s for MFU: dense bf16 tensor-core peaks of common GPUs, and a calibrated CPU fp32 peak.

MFU (model FLOPs utilization, PaLM App. B) = achieved model FLOPs per second / peak FLOP/s. The GPU peaks
are the vendors' dense figures (datasheets list "with sparsity" figures, marked *, that are 2x these).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import check


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
    raise ValueError(f"unknown GPU {name!r}: no peak FLOP/s in model/flops/peaks.py; pass --peak_flops=<FLOP/s> "
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


# ----------------------------------------------------------------------------------------------------
# A peak that holds: the hardware's own figure where it can be known, a cached calibration otherwise, raised
# (and said so) whenever a measured rate proves it low, so MFU never exceeds 1.

@dataclass
class Peak:
    """Peak FLOP/s and where it came from. `mfu(rate)` raises the peak to any measured rate above it (a rate
    the machine reached proves the peak low) and records a message, so the MFU it returns stays in [0, 1]."""
    flops: float  # the peak rate, in `unit`s (FLOP/s; for a bandwidth peak, bytes/s)
    source: str
    messages: list[str] = field(default_factory=list)
    unit: str = "FLOP/s"

    def __post_init__(self):
        if isinstance(self.flops, bool) or not (isinstance(self.flops, (int, float)) and math.isfinite(self.flops)
                                                and self.flops > 0):
            raise ValueError(f"peak must be a positive finite {self.unit}, got {self.flops!r}")

    @property
    def rate(self) -> float:
        return self.flops

    def mfu(self, flops_per_s: float) -> float:
        """flops_per_s / peak in [0, 1]; a rate above the peak first becomes the peak. For a bandwidth peak
        (unit B/s) this is MBU: minimum bytes per second / bandwidth."""
        self.raise_to(flops_per_s)
        return flops_per_s / self.flops

    utilization = mfu

    def _show(self, x: float) -> str:
        return f"{x / 1e9:,.1f} G{self.unit}"

    def raise_to(self, flops_per_s: float) -> bool:
        """Make a measured rate above the peak the peak, with a message saying so; True if it was raised."""
        if isinstance(flops_per_s, bool) or not (isinstance(flops_per_s, (int, float)) and
                                                 math.isfinite(flops_per_s) and flops_per_s >= 0):
            raise ValueError(f"measured rate must be a finite number >= 0, got {flops_per_s!r}")
        if flops_per_s <= self.flops:
            return False
        old, old_source = self.flops, self.source
        self.flops = float(flops_per_s)
        self.source = f"raised to a measured {self._show(flops_per_s)} (was {self._show(old)}: {old_source})"
        self.messages.append(f"measured {self._show(flops_per_s)} exceeds the peak {self._show(old)} "
                             f"({old_source}); the peak is raised to the measured rate")
        return True

    def scaled(self, k: int) -> Peak:
        """The peak of k such devices (data-parallel ranks)."""
        return self if k == 1 else Peak(self.flops * k, f"{k} x {self.source}", unit=self.unit)

    def describe(self) -> str:
        return f"{self._show(self.flops)} ({self.source})"


# fp32 FLOPs per cycle per core of the widest FMA unit named in the flags: lanes x 2 FLOPs x 2 FMA pipes.
# Zen 4 (AMD family 25) runs 512-bit ops on 256-bit pipes: half the AVX-512 figure.
_FP32_PER_CYCLE = (("avx512f", 64, "AVX-512 FMA, 2 pipes x 16 fp32 lanes"),
                   ("fma", 32, "AVX2 FMA, 2 pipes x 8 fp32 lanes"),
                   ("avx", 16, "AVX, 8-lane add + 8-lane multiply"),
                   ("sse2", 8, "SSE2, 4-lane add + 4-lane multiply"))
# Under matmul precision "medium" oneDNN feeds bf16 to these units (fp32 accumulate).
_BF16_PER_CYCLE = (("amx_bf16", 1024, "AMX bf16 tiles"),
                   ("avx512_bf16", 128, "AVX512-BF16 dot products, 2 pipes x 32 bf16 pairs"))


def read_cpuinfo(path: str = "/proc/cpuinfo") -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where there is none: not Linux)."""
    try:
        text = open(path).read()
    except OSError:
        return {}
    info = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


CPU_SYSFS = Path("/sys/devices/system/cpu")


def cpufreq_max_hz(root: Path = CPU_SYSFS) -> float | None:
    """The highest cpuinfo_max_freq (kHz) over the CPUs' cpufreq folders, in Hz; None where the kernel exposes
    no cpufreq (most VMs). lscpu's "CPU max MHz" is read from these same files."""
    best = 0.0
    for path in root.glob("cpu[0-9]*/cpufreq/cpuinfo_max_freq"):
        try:
            best = max(best, int(path.read_text()) * 1e3)
        except (OSError, ValueError):
            continue
    return best or None


def lscpu_max_hz(text: str) -> float | None:
    """ "CPU max MHz" from lscpu's output, in Hz (None where lscpu shows none)."""
    match = re.search(r"^\s*CPU max MHz:\s*([0-9.]+)", text, flags=re.MULTILINE)
    return float(match.group(1)) * 1e6 if match and float(match.group(1)) > 0 else None


# x86-64 machine code of `int64 f(int64 n)`: n times 64 dependent register-register adds (1 cycle latency on
# every x86-64 core; the loop counter runs beside the chain), so time / (64 n) is one clock cycle.
_ADDS = 64
_CHAIN = (bytes.fromhex("f30f1efa 4889f9 31c0 4889fa")  # endbr64; mov rcx, rdi; xor eax, eax; mov rdx, rdi
          + bytes.fromhex("4801d0") * _ADDS + bytes.fromhex("48ffc9")  # add rax, rdx (x 64); dec rcx
          + bytes.fromhex("0f85") + (-(3 * _ADDS + 3 + 6)).to_bytes(4, "little", signed=True)  # jnz back
          + bytes.fromhex("c3"))  # ret


def _add_chain():
    """The chain above as a ctypes function (Linux x86-64 only; mapped writable, then made executable), or
    None where that is refused or the machine is not x86-64."""
    import ctypes
    import platform
    import sys
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        addr = libc.mmap(None, 4096, 3, 0x22, -1, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        ctypes.memmove(addr, _CHAIN, len(_CHAIN))
        if libc.mprotect(addr, 4096, 5) != 0:  # PROT_READ|PROT_EXEC
            return None
        return ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(addr)
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def measured_clock_hz(loops: int = 20_000, repeats: int = 30) -> float | None:
    """The core clock, measured: the shortest of `repeats` timed runs of loops x 64 dependent adds (about
    1 ms each), in Hz. The shortest run is the one no other program interrupted. None off Linux x86-64."""
    chain = _add_chain()
    if chain is None:
        return None
    chain(1000)  # warm-up: page in the code, let the core leave any idle state
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        chain(loops)
        best = min(best, time.perf_counter() - start)
    return loops * _ADDS / best


def remembered_clock_hz(hz: float | None, path: Path | None = None) -> float | None:
    """The highest clock measured on this CPU model so far (cached in cache_path()), `hz` included: a clock
    measured while other cores of the host are busy reads lower, and the peak must hold in every state."""
    if not hz:
        return hz
    path = path or cache_path()
    cache = _read_cache(path)
    key = f"clock | {read_cpuinfo().get('model name', 'unknown CPU')}"
    entry = cache.get(key)
    best = entry.get("hz") if isinstance(entry, dict) and isinstance(entry.get("hz"), (int, float)) else 0.0
    if hz > best:
        cache[key] = {"hz": hz, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        _write_cache(path, cache)
    return max(hz, best)


def max_clock_hz(info: dict | None = None, sysfs: Path = CPU_SYSFS, lscpu: str | None = None,
                 measure=None) -> tuple[float, str] | None:
    """(the highest clock of this CPU in Hz, its source): cpufreq's cpuinfo_max_freq, else lscpu's "CPU max
    MHz", else the clock measured by a dependent-add loop (measured_clock_hz; `measure` replaces it in tests)
    or /proc/cpuinfo's "cpu MHz", whichever is higher (a VM's "cpu MHz" is the nominal clock, below its
    boost). None when none is known."""
    hz = cpufreq_max_hz(sysfs)
    if hz:
        return hz, f"cpufreq cpuinfo_max_freq, {sysfs}"
    hz = lscpu_max_hz(_lscpu_text() if lscpu is None else lscpu)
    if hz:
        return hz, "lscpu CPU max MHz"
    info = read_cpuinfo() if info is None else info
    found = []
    measured = measure() if measure else remembered_clock_hz(measured_clock_hz())
    if measured:
        found.append((measured, "measured: a timed loop of dependent adds, max clock not exposed"))
    try:
        found.append((float(info["cpu MHz"]) * 1e6, "/proc/cpuinfo cpu MHz, max clock not exposed"))
    except (KeyError, ValueError):
        pass
    return max(found) if found else None


def _lscpu_text() -> str:
    import subprocess
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                              env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def hardware_cpu_peak(info: dict | None = None, cores: int | None = None, precision: str = "highest",
                      clock: tuple[float, str] | None = None) -> Peak | None:
    """cores x max clock x FLOPs/cycle of the widest vector FMA unit the flags name (two full-width pipes
    assumed, as on Intel Xeon Gold/Platinum and AMD Zen 5): a bound no run on those cores can pass. The clock
    and its source: max_clock_hz. None when the flags or the clock are unknown (not Linux x86)."""
    info = read_cpuinfo() if info is None else info
    flags = set(info.get("flags", "").split())
    clock = clock or max_clock_hz(info)
    table = list(_FP32_PER_CYCLE)
    if precision == "medium":
        table = list(_BF16_PER_CYCLE) + table
    unit = next(((f, per, what) for f, per, what in table if f in flags), None)
    if unit is None or clock is None:
        return None
    flag, per_cycle, what = unit
    if flag.startswith("avx512") and info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25":
        per_cycle, what = per_cycle // 2, what + ", double-pumped on Zen 4"
    cores = cores or _cores_used()
    plural = "s" if cores != 1 else ""
    return Peak(cores * clock[0] * per_cycle, f"CPU hardware: {cores} core{plural} x {clock[0] / 1e9:.3f} GHz "
                                              f"({clock[1]}) x {per_cycle} FLOPs/cycle ({what})")


def _cores_used() -> int:
    import torch
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), available))


def cache_path() -> Path:
    """$XDG_CACHE_HOME/flopgpt/cpu_peak.json, else ~/.cache/flopgpt/cpu_peak.json."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "flopgpt" / "cpu_peak.json"


def _calibration_key(precision: str) -> str:
    import torch
    model = read_cpuinfo().get("model name", "unknown CPU")
    return f"{model} | {_cores_used()} threads | torch {torch.__version__} | matmul precision {precision}"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1, allow_nan=False))
    except OSError:  # a read-only home still gets a peak, only uncached
        pass


def calibrated_cpu_peak(recalibrate: bool = False, trials: int = 5, measure: bool = True) -> Peak | None:
    """The best of `trials` short calibrations (measure_cpu_peak, a pause between them so one busy moment
    cannot set the figure), cached per CPU model, thread count, torch version and matmul precision in
    cache_path(). recalibrate=True measures again and replaces the cached figure; measure=False only reads
    the cache (None when it holds nothing for this machine)."""
    import torch
    return _cached_best(_calibration_key(torch.get_float32_matmul_precision()), "flops",
                        lambda: measure_cpu_peak(repeats=3), "CPU calibrated", "FLOP/s", recalibrate, trials, measure)


def _cached_best(key: str, field: str, measure_once, label: str, unit: str, recalibrate: bool, trials: int,
                 measure: bool) -> Peak | None:
    """The figure cached in cache_path() under `key`, or (missing, or recalibrate) the best of `trials`
    measure_once() calls with pauses between them, so one busy moment cannot set it, cached there; measure=False
    only reads the cache (None when it holds nothing for this machine)."""
    path = cache_path()
    cache = _read_cache(path)
    entry = cache.get(key)
    if isinstance(entry, dict) and isinstance(entry.get(field), (int, float)) and entry[field] > 0 \
            and not recalibrate:
        return Peak(float(entry[field]), f"{label} {entry.get('when', '')}: best of {entry.get('trials')} trials, "
                                         f"cached in {path}", unit=unit)
    if not measure:
        return None
    best = 0.0
    for i in range(trials):
        if i:
            time.sleep(0.05)
        best = max(best, measure_once())
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cache[key] = {field: best, "trials": trials, "when": when}
    _write_cache(path, cache)
    return Peak(best, f"{label} {when}: best of {trials} trials, cached in {path}", unit=unit)


def device_peak(device, override: float = 0.0, recalibrate: bool = False) -> Peak:
    """The Peak for MFU on `device`. override > 0 wins. CUDA: the dense bf16 table (vendor datasheets).
    CPU: the hardware figure (hardware_cpu_peak), raised to a cached calibration above it; where the
    hardware cannot be read, the cached calibration (measured once per machine and torch version)."""
    import torch
    check("peak_flops override", override, float, 0)
    if override > 0:
        return Peak(float(override), "given (peak_flops)")
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        entry = gpu_peak(name)
        return Peak(entry.flops, f"{name}: {entry.note}, vendor datasheet")
    if device.type != "cpu":
        raise ValueError(f"no peak FLOP/s known for device type {device.type!r}; pass --peak_flops=<FLOP/s>")
    hardware = hardware_cpu_peak(precision=torch.get_float32_matmul_precision())
    calibrated = calibrated_cpu_peak(recalibrate, measure=hardware is None or recalibrate)
    if hardware is None:
        return calibrated
    if calibrated is not None:
        hardware.raise_to(calibrated.flops)  # a calibration above the hardware figure proves it low
    return hardware


# ----------------------------------------------------------------------------------------------------
# Memory bandwidth, the second roof: vendor datasheets for GPUs (HBM/GDDR), a STREAM-style measurement for
# the CPU. MBU (model bandwidth utilization) = minimum bytes per second / this bandwidth, in [0, 1].

# (regex on torch.cuda.get_device_name(), bytes/s, note); first match wins, so variants come first.
GPU_BANDWIDTHS: tuple[tuple[str, float, str], ...] = (
    # NVIDIA H100 datasheet: GPU memory bandwidth 3.35 TB/s (SXM), 3.9 TB/s (NVL), 2 TB/s (PCIe)
    (r"\bH100 NVL\b", 3.9e12, "H100 NVL HBM3"), (r"\bH100 PCIe\b", 2.0e12, "H100 PCIe HBM2e"),
    (r"\bH100\b", 3.35e12, "H100 SXM HBM3"),
    # NVIDIA H200 datasheet: 4.8 TB/s (SXM and NVL); HGX B200: 8 TB/s per GPU
    (r"\bH200\b", 4.8e12, "H200 HBM3e"), (r"\bB200\b", 8.0e12, "B200 HBM3e"),
    # NVIDIA A100 datasheet: 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB 1,555 GB/s
    (r"\bA100\b.*80GB PCIe", 1.935e12, "A100 80GB PCIe HBM2e"), (r"\bA100\b.*80GB", 2.039e12, "A100 80GB SXM HBM2e"),
    (r"\bA100\b", 1.555e12, "A100 40GB HBM2"),
    # A10 / A10G 600 GB/s; L40S, L40 864 GB/s; L4 300 GB/s (NVIDIA datasheets, GDDR6)
    (r"\bA10G?\b", 600e9, "A10/A10G GDDR6"), (r"\bL40S?\b", 864e9, "L40/L40S GDDR6"), (r"\bL4\b", 300e9, "L4 GDDR6"),
    # GeForce RTX 3090 936 GB/s, RTX 4090 1,008 GB/s (GDDR6X); V100 900 GB/s (HBM2); T4 320 GB/s (GDDR6)
    (r"\bRTX 3090\b", 936e9, "RTX 3090 GDDR6X"), (r"\bRTX 4090\b", 1008e9, "RTX 4090 GDDR6X"),
    (r"\bV100", 900e9, "V100 HBM2"), (r"\bT4\b", 320e9, "T4 GDDR6"),
)


def gpu_bandwidth(name: str) -> tuple[float, str]:
    """(bytes/s, note) for a CUDA device name from the datasheet table; ValueError if unknown."""
    for pattern, bandwidth, note in GPU_BANDWIDTHS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return bandwidth, note
    raise ValueError(f"unknown GPU {name!r}: no memory bandwidth in model/flops/peaks.py; pass "
                     f"--peak-bandwidth=<bytes/s> (its datasheet memory bandwidth)")


def last_level_cache_bytes() -> int:
    """The largest CPU cache sysfs lists (0 where there is none)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            pass
    return max(sizes, default=0)


def stream_array_bytes() -> int:
    """Bytes per STREAM array: twice the last-level cache (so no array, let alone the three, fits in it),
    at least 256 MiB. On this project's 300 MiB-L3 Xeon: 600 MiB each, 1.8 GiB for the triad's three."""
    return max(256 << 20, 2 * last_level_cache_bytes())


def measure_cpu_bandwidth(array_bytes: int | None = None, repeats: int = 3) -> float:
    """One STREAM-style measurement (McCalpin's copy c = a and triad a = b + s·c over float32 arrays far
    larger than the last-level cache, torch's threads), uncached: the best rate of `repeats` of each after a
    warm-up pass, in bytes/s counted as STREAM does (copy 2, triad 3 arrays' bytes per pass)."""
    import torch
    n = (array_bytes or stream_array_bytes()) // 4
    a, b, c = torch.empty(n), torch.ones(n), torch.ones(n)  # (n,) each
    torch.add(b, c, alpha=3.0, out=a)  # warm-up: page faults, thread pool
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        c.copy_(a)
        best = max(best, 2 * 4 * n / (time.perf_counter() - start))
        start = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = max(best, 3 * 4 * n / (time.perf_counter() - start))
    return best


def calibrated_cpu_bandwidth(recalibrate: bool = False, trials: int = 5, measure: bool = True) -> Peak | None:
    """The best of `trials` measure_cpu_bandwidth runs (a pause between them), cached per CPU model, thread
    count and torch version beside the FLOP calibration in cache_path(); recalibrate=True measures again;
    measure=False only reads the cache (None when it holds nothing for this machine)."""
    key = "bandwidth | " + _calibration_key("-").rsplit(" | matmul precision", 1)[0]
    return _cached_best(key, "bytes_per_s", measure_cpu_bandwidth, "CPU STREAM copy/triad, measured", "B/s",
                        recalibrate, trials, measure)


def device_bandwidth(device, override: float = 0.0, recalibrate: bool = False) -> Peak:
    """The bandwidth Peak (unit B/s) for MBU on `device`. override > 0 wins. CUDA: the datasheet table. CPU:
    the cached STREAM-style measurement (measured once per machine and torch version, ~1-3 s)."""
    import torch
    check("peak_bandwidth override", override, float, 0)
    if override > 0:
        return Peak(float(override), "given (peak_bandwidth)", unit="B/s")
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bandwidth, note = gpu_bandwidth(name)
        return Peak(bandwidth, f"{name}: {note}, vendor datasheet", unit="B/s")
    if device.type != "cpu":
        raise ValueError(f"no memory bandwidth known for device type {device.type!r}; pass --peak-bandwidth")
    return calibrated_cpu_bandwidth(recalibrate)


def bandwidth_by_key(key: str) -> tuple[float, str]:
    """Datasheet bandwidth of a GPU short name (h100, a100, ...: the FLOP table's keys)."""
    entry = peak_by_key(key)
    return gpu_bandwidth(entry.note.split(",")[0])


def step_bandwidth(device, world: int = 1) -> Peak | None:
    """device_bandwidth for `world` such devices, or None where a GPU's bandwidth is unknown (MBU then reads
    None instead of stopping a training run)."""
    try:
        return device_bandwidth(device).scaled(world)
    except ValueError:
        return None


def mbu_text(mbu: float | None, bandwidth: Peak | None) -> str:
    """"MBU 12.3% of 33.6 GB/s (source)", for the final lines of train.py and sample.py."""
    if bandwidth is None or mbu is None:
        return "MBU unknown (no memory bandwidth known for this device)"
    if isinstance(mbu, float) and math.isnan(mbu):
        return "MBU —"
    return f"MBU {mbu:.1%} of {bandwidth.flops / 1e9:,.1f} GB/s ({bandwidth.source})"


def resolve_peak(device: str | None, peak: float | None) -> tuple[float, str]:
    """The planner's peak FLOP/s and its description: a given peak, else the device's (a GPU short name
    from the table, or "cpu": this machine's, calibrated), cpu when neither is given."""
    if peak is not None:
        if not (math.isfinite(peak) and peak > 0):
            raise ValueError(f"--peak-flops must be a positive FLOP/s, got {peak!r}")
        return peak, "given (--peak-flops)"
    name = device or "cpu"
    if name.lower() == "cpu":
        cpu = device_peak("cpu")
        return cpu.flops, cpu.source
    entry = peak_by_key(name)
    return entry.flops, entry.note


def peak_report(device, override: float = 0.0, recalibrate: bool = False) -> dict:
    """flops.py --peak: the peak MFU uses on `device` and its source; on the CPU also the hardware figure and
    the cached calibration beside it (recalibrate: measure it again)."""
    import torch
    result = {"device": str(device)}
    if device.type == "cpu":
        hardware = hardware_cpu_peak(precision=torch.get_float32_matmul_precision())
        calibrated = calibrated_cpu_peak(recalibrate=recalibrate, measure=recalibrate or hardware is None)
        result.update({"hardware_flops": hardware and hardware.flops, "hardware_source": hardware and hardware.source,
                       "calibrated_flops": calibrated and calibrated.flops,
                       "calibrated_source": calibrated and calibrated.source, "cache": str(cache_path())})
    peak = device_peak(device, override)
    bandwidth = device_bandwidth(device, recalibrate=recalibrate)
    result.update({"peak_flops": peak.flops, "peak_source": peak.source, "peak_messages": peak.messages,
                   "bandwidth": bandwidth.flops, "bandwidth_source": bandwidth.source})
    return result
