"""MFU peaks (model/peaks.py): GPU table lookup, CPU calibration, mfu()."""
import math

import pytest
import torch

from model.flops.peaks import GPU_PEAKS, _cpu_peak, gpu_peak, mfu, peak_by_key, peak_flops


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
    assert peak_flops("cpu", 1.5e12) == (1.5e12, "given (--peak_flops)")
    assert peak_flops(torch.device("cuda:3"), 2e14)[0] == 2e14  # no CUDA needed when the peak is given
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            peak_flops("cpu", bad)
    with pytest.raises(ValueError, match="mps"):
        peak_flops("mps")


def test_cpu_peak_is_calibrated_once_per_process():
    flops, desc = peak_flops("cpu")
    assert 1e8 < flops < 1e14 and "calibrated" in desc
    assert peak_flops(torch.device("cpu")) == (flops, desc)  # cached: same measurement
    assert _cpu_peak.cache_info().hits >= 1


def test_mfu():
    assert mfu(1e12, 2.0, 1e12) == 0.5
    assert mfu(0, 1.0, 1e12) == 0.0
    for args in ((1e12, 0.0, 1e12), (1e12, 1.0, 0.0), (1e12, math.inf, 1e12), (-1.0, 1.0, 1e12)):
        with pytest.raises(ValueError):
            mfu(*args)


@pytest.mark.gpu
def test_peak_of_this_gpu():
    try:
        value, desc = peak_flops(torch.device("cuda"))
    except ValueError as e:  # a GPU missing from the table must say how to proceed
        assert "--peak_flops" in str(e)
    else:
        assert value > 1e13 and torch.cuda.get_device_name() in desc
