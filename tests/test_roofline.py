"""Roofline arithmetic by hand, MBU never above 1, and the flops.py --roofline / bytes CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from model import GPTConfig
from model.flops import bytes as nbytes
from model.flops import formulas
from model.flops import roofline as R
from model.flops.peaks import Peak, gpu_bandwidth

ROOT = Path(__file__).resolve().parent.parent


def test_bound_and_ridge_by_hand():
    # 100 GFLOP/s and 10 GB/s: ridge 10 FLOP/B. 1e9 FLOPs over 2e8 bytes: intensity 5 < 10, memory-bound;
    # the memory roof allows 2e8 / 1e10 = 20 ms, the compute roof 1e9 / 1e11 = 10 ms; attainable 5 x 10 GB/s
    b = R.bound(10**9, 2 * 10**8, 100e9, 10e9)
    assert b["ridge"] == 10 and b["intensity"] == 5 and b["bound"] == "memory"
    assert b["memory_seconds"] == pytest.approx(0.02) and b["compute_seconds"] == pytest.approx(0.01)
    assert b["seconds"] == pytest.approx(0.02) and b["attainable_flops_per_s"] == pytest.approx(50e9)
    c = R.bound(10**9, 5 * 10**7, 100e9, 10e9)  # intensity 20 >= 10: compute-bound, 10 ms
    assert c["bound"] == "compute" and c["seconds"] == pytest.approx(0.01)


def test_decode_compute_bound_batch_by_hand():
    # tiny model, fp32, context 2: per row f FLOPs, bytes W + B·k; the batch is the first B with B·f >= r(W + B·k)
    cfg = GPTConfig(vocab_size=3, block_size=4, n_layer=1, n_head=2, n_embd=4)
    f = formulas.decode_step(cfg, 1, 1).total
    m1, m2 = (nbytes.decode_minimum_bytes(cfg, b, 2, "float32")["total"] for b in (1, 2))
    k, w = m2 - m1, 2 * m1 - m2
    assert (f, w, k) == (2 * (4 * 12 + 2 * 2 * 4 + 16 + 64 + 64 + 12), 1072, 16 * 4 + 8 + 12)
    ridge = 0.5 * f / k  # half the asymptote: B·f >= ridge (W + B·k) <=> B >= ridge·W / (f - ridge·k) = W / k
    got = R.decode_compute_bound_batch(cfg, 2, "float32", ridge * 1e9, 1e9)
    assert got == -(-w // k)  # ceil(1072 / 84) = 13
    assert R.decode_compute_bound_batch(cfg, 2, "float32", 2 * f / k * 1e9, 1e9) is None  # above the asymptote


def test_mbu_never_above_one():
    bw = Peak(10e9, "test", unit="B/s")
    assert bw.mfu(5e9) == 0.5
    assert bw.mfu(20e9) == 1.0 and bw.flops == 20e9 and "raised" in bw.source and "GB/s" in bw.messages[0]
    assert bw.mfu(10e9) == 0.5


def test_gpu_bandwidths():
    assert gpu_bandwidth("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert gpu_bandwidth("NVIDIA H200")[0] == 4.8e12
    assert gpu_bandwidth("NVIDIA A100-SXM4-80GB")[0] == 2.039e12
    assert gpu_bandwidth("NVIDIA A100-SXM4-40GB")[0] == 1.555e12
    with pytest.raises(ValueError, match="unknown GPU"):
        gpu_bandwidth("Voodoo 2")


def run(*args):
    return subprocess.run([sys.executable, "flops.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


TINY = ["--n_layer=1", "--n_head=2", "--n_embd=8", "--block_size=16", "--vocab_size=11"]


def test_cli_roofline_json_and_png(tmp_path):
    out = tmp_path / "roof.png"
    r = run(*TINY, "--roofline", "--device", "h100", "--batch-size", "2", "--context", "8", "--json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["ridge"] == pytest.approx(989.4e12 / 3.35e12) and j["context"] == 8 and j["dtype"] == "bfloat16"
    assert j["decode_step"]["bound"] == "memory" and out.stat().st_size > 10_000


def test_cli_bytes_section():
    r = run(*TINY, "--batch-size", "2", "--seq-len", "8", "--context", "5", "--json")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)["bytes"]
    for step in ("forward", "train_step", "decode_step"):
        assert b[step]["unfused"]["analytic"] == b[step]["unfused"]["counted"] > b[step]["minimum"] > 0
        assert b[step]["dtype"] == "float32"
    assert set(b["decode_step"]["minimum_components"]) == {"weights", "kv_cache", "other"}
    assert b["decode_step"]["context"] == 5


@pytest.mark.parametrize("args, match", [
    (["--roofline", "--context", "0"], "--context=0"), (["--roofline", "--context", "17"], "--context=17"),
    (["--roofline", "--device", "voodoo"], "unknown device"), (["--roofline", "--profile"], "--roofline takes no"),
    (["--dtype", "float16"], "invalid choice"),
])
def test_cli_bad_input_one_line(args, match):
    r = run(*TINY, *args)
    assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
