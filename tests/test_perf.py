"""Speed-related choices keep the numbers: exact GELU option, fused CPU AdamW, the linear lr schedule,
the full-split evaluation of bench/tilt.py."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, TrainConfig
from model.training.evaluate import full_split_loss
from model.training.optim import adamw, lr_at

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import profile_step  # noqa: E402
import tilt  # noqa: E402
import train_speed  # noqa: E402


def small(**kw):
    return GPTConfig(**{**dict(vocab_size=31, block_size=16, n_layer=2, n_head=2, n_embd=32), **kw})


def test_activation_choice_changes_only_the_mlp_nonlinearity():
    x = torch.linspace(-4, 4, 101)
    exact = GPT(small(activation="gelu")).transformer.h[0].mlp.gelu(x)
    tanh = GPT(small()).transformer.h[0].mlp.gelu(x)
    erf = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # the definition
    approx = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(exact, erf, atol=1e-6, rtol=0)
    torch.testing.assert_close(tanh, approx, atol=1e-6, rtol=0)
    assert (exact - tanh).abs().max() > 1e-4  # the two really differ
    with pytest.raises(ValueError, match="'relu'"):
        small(activation="relu")


def test_cpu_adamw_is_fused_and_matches_the_for_loop_reference():
    torch.manual_seed(0)
    # no biases: the key bias's gradient is pure rounding noise (softmax ignores it), which Adam amplifies
    a, b = GPT(small(bias=False)), GPT(small(bias=False))
    b.load_state_dict(a.state_dict())
    opt_a = adamw(a, 1e-2, 0.1, (0.9, 0.99), "cpu")
    assert opt_a.defaults["fused"] is True
    groups = [{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt_b = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.99), foreach=False)
    x = torch.randint(0, 31, (3, 16))
    for _ in range(4):
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(x, x)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_linear_schedule_by_hand():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=2, max_iters=12, lr_schedule="linear")
    assert [lr_at(s, cfg) for s in range(2)] == [0.5, 1.0]
    assert lr_at(2, cfg) == pytest.approx(1.0)
    assert lr_at(7, cfg) == pytest.approx(0.55)  # halfway from step 2 to step 12
    assert lr_at(12, cfg) == pytest.approx(0.1) and lr_at(50, cfg) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'step'"):
        TrainConfig(lr_schedule="step")


def test_full_split_loss_equals_naive_windows():
    torch.manual_seed(0)
    model = GPT(small(block_size=8)).eval()
    data = np.random.default_rng(0).integers(0, 31, size=61).astype(np.uint16)  # 7 windows + a short tail
    got = full_split_loss(model, data, 8, batch_rows=3)
    losses = []
    with torch.no_grad():
        for i in range(7):
            x = torch.tensor(data[i * 8:i * 8 + 8], dtype=torch.long)[None]
            y = torch.tensor(data[i * 8 + 1:i * 8 + 9], dtype=torch.long)[None]
            losses.append(F.cross_entropy(model(x)[0][0], y[0]).item())
    assert got == pytest.approx(sum(losses) / 7, rel=1e-5)
    assert model.training is False


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


def test_exact_gelu_flops_match_the_fvcore_measurement():
    from model.flops import formulas as flops
    from model.flops.counters import fvcore_count
    for act in ("gelu", "gelu_tanh"):
        cfg = GPTConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, activation=act)
        measured = fvcore_count(cfg, 2, 16)
        assert measured.non_matmul["gelu"] == (5 if act == "gelu" else 9) * 2 * 16 * 4 * 32 * 2  # by hand
        assert flops.forward(cfg, 2, 16).total == measured.total


PAGE_FAULTS = """
import resource, sys, torch
from model.training.runtime import cpu_process_settings
from model.training.optim import adamw
applied = cpu_process_settings() if sys.argv[1] == "on" else False
from model import GPT, GPTConfig
torch.manual_seed(0)
# manual attention on (8, 4, 512, 512) weights: 32 MB tensors, glibc's largest mmap threshold
model = GPT(GPTConfig(vocab_size=32, block_size=512, n_layer=1, n_head=4, n_embd=32, attention="manual"))
opt = adamw(model, 1e-3, 0.0, (0.9, 0.99), "cpu")
x = torch.randint(0, 32, (8, 512))
faults = []
for _ in range(8):  # training steps
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="the allocator setting is glibc's")
def test_cpu_process_settings_reuse_freed_memory_instead_of_faulting_it_in_again():
    """Counted, not timed, over training steps: without the setting every step maps its 32 MB attention
    weights afresh (about 58,000 page faults per step); with it, freed blocks are reused and steady-state steps
    have no page faults."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    runs = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, cwd=root,
                             check=True).stdout.split()
        runs[mode] = (out[0] == "True", int(out[1]))
    assert runs["on"][0] is True
    assert runs["off"][1] > 20_000  # a 32 MB tensor is 8,192 pages of 4 KiB; a step maps several
    assert runs["on"][1] < 100


def test_profile_step_reports_every_matmul_shape_and_the_overhead(dataset):
    """Recipe (a)'s step has 51 matmuls in 12 shapes (4 layers x 4 linears x fwd/bwd + the tied head)."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
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
    cfg = small(activation="gelu", bias=False, dropout=0.0)
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
