"""MFU peaks (model/flops/peaks.py): GPU table lookup, the hardware CPU peak, the cached calibration, Peak."""
import json
import math

import pytest
import torch

from model.flops.peaks import GPU_PEAKS, device_peak, gpu_peak, peak_by_key, resolve_peak


@pytest.mark.parametrize("name,key,tflops", [
    ("NVIDIA H100 80GB HBM3", "h100", 989.4),
    ("NVIDIA H100 PCIe", "h100-pcie", 756),
    ("NVIDIA H100 NVL", "h100-nvl", 835),
    ("NVIDIA H200", "h200", 989.4),
    ("NVIDIA A100-SXM4-80GB", "a100", 312),
    ("NVIDIA A100 80GB PCIe", "a100", 312),
    ("NVIDIA A10", "a10", 125),
    ("NVIDIA A10G", "a10g", 70),
    ("NVIDIA L4", "l4", 121),
    ("NVIDIA L40S", "l40s", 362.05),
    ("NVIDIA GeForce RTX 3090", "rtx3090", 71),
    ("NVIDIA GeForce RTX 4090", "rtx4090", 165.2),
    ("Tesla V100-SXM2-16GB", "v100", 125),
    ("Tesla V100-PCIE-32GB", "v100-pcie", 112),
    ("Tesla T4", "t4", 65),
])
def test_gpu_names_match_their_dense_peak(name, key, tflops):
    entry = gpu_peak(name)
    assert entry.key == key and entry.flops == pytest.approx(tflops * 1e12)
    assert peak_by_key(key) is entry


def test_unknown_gpu_asks_for_peak_flops():
    with pytest.raises(ValueError, match="--peak_flops"):
        gpu_peak("NVIDIA GH200 480GB")
    with pytest.raises(ValueError, match="tpu"):
        peak_by_key("tpu")


def test_table_keys_unique_and_dense_peaks_plausible():
    keys = [e.key for e in GPU_PEAKS]
    assert len(keys) == len(set(keys))
    assert all(10e12 < e.flops < 5e15 for e in GPU_PEAKS)


def test_override_wins_and_bad_override_is_an_error():
    assert device_peak(torch.device("cuda:3"), 2e14).flops == 2e14  # no CUDA needed when the peak is given
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            device_peak("cpu", bad)
    with pytest.raises(ValueError, match="mps"):
        device_peak("mps")


def test_planner_peak_is_given_or_the_named_device():
    assert resolve_peak(None, 3e12) == (3e12, "given (--peak-flops)")
    assert resolve_peak("a100", None)[0] == pytest.approx(312e12)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="--peak-flops"):
            resolve_peak("a100", bad)


@pytest.mark.gpu
def test_peak_of_this_gpu():
    try:
        p = device_peak(torch.device("cuda"))
    except ValueError as e:  # a GPU missing from the table must say how to proceed
        assert "--peak_flops" in str(e)
    else:
        assert p.flops > 1e13 and torch.cuda.get_device_name() in p.source


# ----------------------------------------------------------------------------------------------------
# Peak, the hardware CPU peak, the cached calibration

from model.flops import peaks  # noqa: E402
from model.flops.peaks import Peak, calibrated_cpu_peak, hardware_cpu_peak  # noqa: E402

XEON = {"vendor_id": "GenuineIntel", "cpu family": "6", "cpu MHz": "2000.000",
        "flags": "fpu sse2 avx avx2 fma avx512f amx_bf16 amx_tile"}


def test_peak_mfu_never_above_one_and_raises_with_a_message():
    p = Peak(100e9, "test")
    assert p.mfu(50e9) == 0.5 and p.messages == []
    assert p.mfu(150e9) == 1.0
    assert p.flops == 150e9 and "raised" in p.source and "test" in p.source
    assert len(p.messages) == 1 and "exceeds the peak 100.0 GFLOP/s" in p.messages[0]
    assert p.mfu(75e9) == 0.5  # against the raised peak from now on
    for bad in (-1.0, math.nan, math.inf, "1"):
        with pytest.raises(ValueError):
            p.mfu(bad)
    for bad in (0.0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError):
            Peak(bad, "x")
    assert Peak(1e9, "x").scaled(4).flops == 4e9
    q = Peak(1e9, "x")
    assert q.raise_to(1e9) is False and q.messages == [] and q.raise_to(2e9) is True and q.flops == 2e9


@pytest.mark.parametrize("info,precision,per_cycle", [
    (XEON, "highest", 64), (XEON, "medium", 1024),
    ({**XEON, "flags": "sse2 avx avx2 fma"}, "highest", 32), ({**XEON, "flags": "sse2 avx"}, "highest", 16),
    ({**XEON, "flags": "sse2 avx avx2 fma avx512f avx512_bf16"}, "medium", 128),
    ({**XEON, "flags": "sse2 avx avx2 fma avx512f"}, "medium", 64),  # no bf16 unit: the fp32 figure
    ({"vendor_id": "AuthenticAMD", "cpu family": "25", "flags": "avx2 fma avx512f"}, "highest", 32),  # Zen 4
    ({"vendor_id": "AuthenticAMD", "cpu family": "26", "flags": "avx2 fma avx512f"}, "highest", 64),  # Zen 5
])
def test_hardware_cpu_peak_is_cores_x_clock_x_flops_per_cycle(info, precision, per_cycle):
    p = hardware_cpu_peak(info, cores=2, precision=precision, clock=(2.5e9, "given"))
    assert p.flops == 2 * 2.5e9 * per_cycle and f"{per_cycle} FLOPs/cycle" in p.source and "2 cores" in p.source


def test_hardware_cpu_peak_unknown_without_flags_or_clock(monkeypatch):
    monkeypatch.setattr(peaks, "max_clock_hz", lambda info: None)
    assert hardware_cpu_peak({}, cores=2) is None
    assert hardware_cpu_peak({"flags": "avx2 fma"}, cores=2) is None  # no clock


# The first processor of /proc/cpuinfo on two KVM guests without cpufreq: an AMD EPYC (the figures of
# docs/benchmarks.md; nominal 2.596 GHz) and a Sapphire Rapids Xeon (AVX-512, AMX; nominal 2.1 GHz).
EPYC_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC 7B12
cpu MHz\t\t: 2596.062
flags\t\t: fpu sse sse2 avx avx2 fma
bogomips\t: 5192.12

processor\t: 1
vendor_id\t: AuthenticAMD
"""
XEON_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
cpu MHz\t\t: 2100.000
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile
bogomips\t: 4200.00
"""
LSCPU_BOOST = "Model name:            AMD EPYC 7B12\nCPU max MHz:           3300.0000\nCPU min MHz:     1500.0000\n"


def _cpuinfo(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return peaks.read_cpuinfo(str(path))


def test_max_clock_prefers_cpufreq_then_lscpu_then_the_measured_clock(tmp_path):
    info = _cpuinfo(tmp_path, EPYC_CPUINFO)
    assert info["model name"] == "AMD EPYC 7B12" and info["cpu MHz"] == "2596.062"
    sysfs = tmp_path / "cpu"
    for cpu, khz in (("cpu0", "3000000\n"), ("cpu1", "3350000\n")):
        (sysfs / cpu / "cpufreq").mkdir(parents=True)
        (sysfs / cpu / "cpufreq" / "cpuinfo_max_freq").write_text(khz)
    hz, source = peaks.max_clock_hz(info, sysfs=sysfs, lscpu=LSCPU_BOOST, measure=lambda: 9e9)
    assert hz == 3.35e9 and "cpufreq cpuinfo_max_freq" in source  # the highest CPU's
    no_sysfs = tmp_path / "none"
    hz, source = peaks.max_clock_hz(info, sysfs=no_sysfs, lscpu=LSCPU_BOOST, measure=lambda: 9e9)
    assert hz == 3.3e9 and source == "lscpu CPU max MHz"
    hz, source = peaks.max_clock_hz(info, sysfs=no_sysfs, lscpu="CPU(s): 2\n", measure=lambda: 3.1e9)
    assert hz == 3.1e9 and source.startswith("measured")
    # a measurement slowed by other programs below the nominal clock: the nominal clock, named
    hz, source = peaks.max_clock_hz(info, sysfs=no_sysfs, lscpu="", measure=lambda: 1.2e9)
    assert hz == 2596.062e6 and source.startswith("/proc/cpuinfo cpu MHz")
    assert peaks.max_clock_hz({}, sysfs=no_sysfs, lscpu="", measure=lambda: None) is None


def test_hardware_peak_of_the_sample_cpus_names_its_clock(tmp_path):
    no_sysfs = tmp_path / "none"
    epyc = _cpuinfo(tmp_path, EPYC_CPUINFO)
    clock = peaks.max_clock_hz(epyc, sysfs=no_sysfs, lscpu="", measure=lambda: 3.3e9)
    p = hardware_cpu_peak(epyc, cores=2, clock=clock)
    assert p.flops == 2 * 3.3e9 * 32 and "3.300 GHz (measured" in p.source and "AVX2 FMA" in p.source
    xeon = _cpuinfo(tmp_path, XEON_CPUINFO)
    clock = peaks.max_clock_hz(xeon, sysfs=no_sysfs, lscpu="", measure=lambda: None)  # no measurement here
    p = hardware_cpu_peak(xeon, cores=2, clock=clock)
    assert p.flops == 2 * 2.1e9 * 64 and "/proc/cpuinfo cpu MHz, max clock not exposed" in p.source
    assert hardware_cpu_peak(xeon, cores=1, precision="medium", clock=clock).flops == 2.1e9 * 1024


def test_lscpu_max_mhz_parsing():
    assert peaks.lscpu_max_hz(LSCPU_BOOST) == 3.3e9
    assert peaks.lscpu_max_hz("CPU MHz: 2100.000\n") is None  # the current clock is not the max
    assert peaks.lscpu_max_hz("CPU max MHz: 0\n") is None


def test_measured_clock_is_a_plausible_clock():
    hz = peaks.measured_clock_hz()
    if hz is None:
        pytest.skip("the dependent-add loop runs on Linux x86-64 only")
    # 0.5-7 GHz; other programs can only slow the loop (the best of 30 runs is kept), never speed it up
    assert 0.5e9 < hz < 7e9


def test_the_measured_clock_is_the_highest_this_cpu_has_shown(tmp_path):
    path = tmp_path / "cpu_peak.json"
    assert peaks.remembered_clock_hz(2.6e9, path) == 2.6e9
    assert peaks.remembered_clock_hz(2.4e9, path) == 2.6e9  # measured beside busy cores: the max stays
    assert peaks.remembered_clock_hz(2.8e9, path) == 2.8e9
    assert next(iter(json.loads(path.read_text()).values()))["hz"] == 2.8e9
    assert peaks.remembered_clock_hz(None, path) is None


def test_calibration_is_best_of_trials_cached_per_machine_and_recalibrated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    readings = iter([1e9, 3e9, 2e9, 5e9, 4e9, 9e9])
    monkeypatch.setattr(peaks, "measure_cpu_peak", lambda n=1024, repeats=5: next(readings))
    monkeypatch.setattr(peaks.time, "sleep", lambda s: None)
    first = calibrated_cpu_peak(trials=3)
    assert first.flops == 3e9 and "best of 3 trials" in first.source
    assert (tmp_path / "flopgpt" / "cpu_peak.json").is_file()
    assert calibrated_cpu_peak(trials=3).flops == 3e9  # cached: nothing measured
    assert calibrated_cpu_peak(recalibrate=True, trials=2).flops == 5e9  # 5e9, 4e9: measured again, replaced
    assert calibrated_cpu_peak().flops == 5e9
    (tmp_path / "flopgpt" / "cpu_peak.json").write_text("{not json")
    assert calibrated_cpu_peak(measure=False) is None  # a corrupt cache is ignored


def test_device_peak_cpu_takes_a_calibration_above_the_hardware_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peaks, "hardware_cpu_peak", lambda precision="highest": Peak(1e9, "hw"))
    monkeypatch.setattr(peaks, "measure_cpu_peak", lambda n=1024, repeats=5: 2e9)
    monkeypatch.setattr(peaks.time, "sleep", lambda s: None)
    assert device_peak("cpu").flops == 1e9  # no calibration cached: the hardware figure, nothing measured
    p = device_peak("cpu", recalibrate=True)
    assert p.flops == 2e9 and "raised" in p.source and p.messages
    monkeypatch.setattr(peaks, "hardware_cpu_peak", lambda precision="highest": None)
    assert device_peak("cpu").flops == 2e9  # unknown hardware: the cached calibration
    assert device_peak("cpu", 5e12).source == "given (peak_flops)"
    with pytest.raises(ValueError):
        device_peak("cpu", -1.0)


def test_cli_peak_names_its_source_and_recalibrates(tmp_path, monkeypatch, capsys):
    import json
    import flops as cli
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peaks, "measure_cpu_peak", lambda n=1024, repeats=5: 7e9)
    monkeypatch.setattr(peaks.time, "sleep", lambda s: None)
    assert cli.main(["--peak", "--recalibrate", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibrated_flops"] == 7e9 and out["peak_flops"] >= 7e9 and out["peak_source"]
    assert out["cache"] == str(tmp_path / "flopgpt" / "cpu_peak.json")
    assert cli.main(["--recalibrate"]) == 2
