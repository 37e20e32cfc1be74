"""bench/: the benchmark programs' errors, their paired ratios, the nanoGPT-style baseline, profile_step's table."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, small
from model import GPT
from model.gpt import cpu_decode

sys.path.insert(0, str(ROOT / "bench"))
import gemv  # noqa: E402
import profile_step  # noqa: E402
import tilt  # noqa: E402
import train_speed  # noqa: E402


def test_tilt_cli_errors_are_one_line(capsys):
    assert tilt.main(["--eval-every=0", "configs/shakespeare_char_cpu.toml"]) == 2
    assert tilt.main([]) == 2
    assert tilt.main(["no/such.toml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("tilt.py: error:") for line in err)
    assert "no/such.toml" in err[2]


def test_bench_cli_errors_are_one_line(capsys):
    assert profile_step.main(["--recipe=c"]) == 2
    assert profile_step.main(["--steps=0"]) == 2
    assert profile_step.main(["--dataset=/no/such/ds", "--which=flopgpt"]) == 2
    assert train_speed.main(["--recipes=z"]) == 2
    assert train_speed.main(["--warmup=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5
    assert all(line.startswith("profile_step.py: error:") for line in err[:3])
    assert all(line.startswith("train_speed.py: error:") for line in err[3:])
    assert "/no/such/ds" in err[2] and "'z'" in err[3]


def test_paired_speedup_pairs_blocks_of_the_same_repeat():
    # repeat 1 ran in a slow phase for both programs: the pairing keeps it from looking like a speed change
    base = [[10.0, 11.0, 12.0], [20.0, 22.0, 24.0], [10.0, 10.0, 10.0]]
    flop = [[8.0, 8.0, 9.0], [22.0, 22.0, 22.0], [4.0, 5.0, 6.0]]
    med, low, high = train_speed.paired_speedup(base, flop)
    assert (low, med, high) == (1.0, 11.0 / 8.0, 2.0)  # ratios 11/8, 22/22, 10/5
    # two slow baseline blocks and one lucky fast variant block: the ratio of medians over all steps says 2.5x
    base, flop = [[10.0], [20.0], [20.0]], [[8.0], [16.0], [8.0]]
    assert train_speed.median(sum(base, [])) / train_speed.median(sum(flop, [])) == 2.5
    assert train_speed.paired_speedup(base, flop) == (1.25, 1.25, 2.5)
    assert train_speed.paired_speedup([[3.0, 1.0, 2.0]], [[4.0]]) == (0.5, 0.5, 0.5)
    for bad in (([[1.0]], []), ([[1.0]], [[1.0], [1.0]]), ([[1.0], []], [[1.0], [1.0]])):
        with pytest.raises(ValueError, match="same number of non-empty blocks"):
            train_speed.paired_speedup(*bad)


def test_profile_step_reports_every_matmul_shape_and_the_overhead(dataset):
    """Recipe (a)'s step has 51 matmuls in 12 shapes (4 layers x 4 linears x fwd/bwd + the tied head)."""
    root = ROOT
    out = subprocess.run([sys.executable, "bench/profile_step.py", "--which=flopgpt", "--steps=1", "--warmup=1",
                          f"--dataset={dataset}"], capture_output=True, text=True, cwd=root, timeout=300, check=True)
    lines = out.stdout.splitlines()
    table = lines[next(i for i, ln in enumerate(lines) if ln.startswith("matmul")) + 1:]
    shapes = [ln for ln in table if ln.startswith("(")]
    assert len(shapes) == 12 and sum(int(ln.split()[-1]) for ln in shapes) == 51
    assert any("kernels both steps run alike" in ln for ln in lines)
    assert any(ln.startswith("the same step at batch 1, block 1") for ln in lines)


def test_the_nanogpt_style_baseline_computes_flopgpts_function():
    # the speed ratio compares two implementations of one model: same weights -> same logits, loss, gradients
    cfg = small(activation="gelu", dropout=0.0)
    torch.manual_seed(0)
    ours, base = GPT(cfg), train_speed.nanogpt_model(cfg)
    with torch.no_grad():  # weights far larger than GPT-2's init, so activations reach where GELU forms differ
        for p in ours.parameters():
            p.normal_(0.0, 0.5)
    our_name = {k.replace("mlp.", "").replace("transformer.", ""): k for k in ours.state_dict()}  # theirs -> ours
    base.load_state_dict({theirs: ours.state_dict()[k] for theirs, k in our_name.items()})  # strict: one to one
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    tgt = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    logits, loss = ours(idx, tgt)
    ref_logits, ref_loss = base(idx, tgt)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    for name, p in base.named_parameters():
        torch.testing.assert_close(ours.get_parameter(our_name[name]).grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sample_speed_runs_every_path_and_reports_tokens_per_second():
    out = subprocess.run([sys.executable, "bench/sample_speed.py", "--model=default", "--repeats=1", "--new-tokens=4",
                          "--modes=greedy,beam", "--no-hf", "--threads=1"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("greedy", "beam"))]
    paths = {" ".join(r[1:-6] if r[0] == "greedy" else r[2:-6]) for r in rows}
    expected = {"flopgpt fast fp32", "flopgpt reference fp32 (fast=False)", "flopgpt fast bf16"}
    if cpu_decode.unavailable(torch.bfloat16) is None:
        expected |= {"flopgpt fast fp32 avx512", "flopgpt fast bf16 avx512"}
    assert paths == expected
    assert all(float(r[-6].replace(",", "")) > 0 for r in rows)  # tokens/s


def test_decode_precision_reports_agreement_for_each_bf16_path():
    out = subprocess.run([sys.executable, "bench/decode_precision.py", "--tokens=6"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "bf16 forward: greedy tokens equal to fp32's: " in out.stdout
    avx = "bf16 decoding steps, kernels='avx512': "
    line = next(x for x in out.stdout.splitlines() if x.startswith(avx))
    assert ("greedy tokens equal" in line) == (cpu_decode.unavailable(torch.bfloat16) is None)


def test_gemv_times_every_variant_in_turns(monkeypatch):
    monkeypatch.setattr(gemv, "SHAPES", [(8, 4), (3, 8)])  # (out, in)
    calls = []
    variants = {name: (dtype, rows, layout, lambda x, w, b, name=name: calls.append(name))
                for name, (dtype, rows, layout, _) in gemv.VARIANTS.items()}
    got = gemv.timed(variants, repeats=2)
    assert list(got) == list(variants)
    for name, (sec, nbytes) in got.items():
        assert sec > 0 and nbytes == (8 * 4 + 3 * 8) * variants[name][0].itemsize
    n = len(variants)  # a warm-up pass each, then rounds in which every variant passes once, in order
    assert calls[2 * n:] == [name for _ in range(2) for name in variants for _ in range(2)]
