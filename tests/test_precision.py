"""Float32 matmul precision (TrainConfig.matmul_precision): the CPU kernels a run at "medium" builds the model
with, the setting applied for a run and put back, the peak calibrated per precision, and the benchmark rows."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import train as train_mod
from conftest import small
from model import GPT, GPTConfig, TrainConfig
from model.gpt.speed import use_cpu_kernels
from model.flops import peaks
from model.training.runtime import (cpu_bf16_matmul_unit, describe_matmul_precision, matmul_precision,
                                    resolve_matmul_precision)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_speed  # noqa: E402


def precision(name):
    return matmul_precision(name, "cpu")


def test_medium_precision_gradients_match_fp32_sdpa_closely():
    """The model a CPU run at "medium" trains (cpu_kernels: manual attention, bf16 matmul inputs) against fp32
    SDPA with the same weights."""
    torch.manual_seed(1)
    m = GPT(small())
    fast = GPT(small(), cpu_kernels=use_cpu_kernels("cpu", 0.0, "medium", False))
    fast.load_state_dict(m.state_dict())
    idx = torch.randint(0, 31, (3, 16))
    ref_logits, ref_loss = m(idx, idx)
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    with precision("medium"):
        logits, loss = fast(idx, idx)
        loss.backward()
    # bf16 matmul inputs where the CPU has them: close to fp32, not equal (equal where "medium" is a no-op)
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=5e-2, rtol=0)
    for n, p in fast.named_parameters():
        scale = ref[n].abs().max().item()
        assert (p.grad - ref[n]).abs().max().item() <= 0.05 * scale + 1e-6, n


def test_medium_precision_compiles_without_graph_breaks():
    """The forward reads no global setting: compiled under "medium", one graph."""
    m = GPT(small()).train()
    idx = torch.randint(0, 31, (2, 16))
    with precision("medium"):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(m)(idx, idx)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_resolve_and_describe_by_hand():
    assert resolve_matmul_precision("auto", "cpu") == "highest"
    assert resolve_matmul_precision("auto", "cuda") == "high"
    for name in ("highest", "high", "medium"):
        assert resolve_matmul_precision(name, "cpu") == name
    with pytest.raises(ValueError, match="'low'"):
        resolve_matmul_precision("low", "cpu")
    with pytest.raises(ValueError, match="matmul_precision must be one of .* got 'fast'"):
        TrainConfig(matmul_precision="fast")
    assert describe_matmul_precision("highest", "cpu") == "fp32 matmuls in full fp32"
    assert "TF32" in describe_matmul_precision("high", "cuda")
    medium = describe_matmul_precision("medium", "cpu")
    assert cpu_bf16_matmul_unit() in ("AMX", "AVX512-BF16", "emulated", None)
    if cpu_bf16_matmul_unit() is None:
        assert "has no effect" in medium
    else:
        assert medium.startswith("fp32 matmuls with bf16 inputs and fp32 accumulation (oneDNN, ")


def test_matmul_precision_block_puts_the_callers_setting_back_even_on_error():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with matmul_precision("medium", "cpu"):
            assert torch.get_float32_matmul_precision() == "medium"
        assert torch.get_float32_matmul_precision() == "high"
        with pytest.raises(RuntimeError, match="inside"):
            with matmul_precision("auto", "cpu"):
                assert torch.get_float32_matmul_precision() == "highest"
                raise RuntimeError("inside")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def tiny_run(dataset, out_dir, **kw):
    vocab = json.loads((Path(dataset) / "meta.json").read_text())["vocab_size"]
    model_cfg = GPTConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=32)
    cfg = TrainConfig(dataset=str(dataset), out_dir=str(out_dir), batch_size=4, max_iters=3, eval_interval=3,
                      eval_iters=1, warmup_iters=1, device="cpu", peak_flops=1e12, progress=False, **kw)
    return model_cfg, cfg


def test_train_runs_at_the_precision_and_puts_the_setting_back(dataset, tmp_path, capsys, monkeypatch):
    seen, kernels = [], []
    real_forward = GPT.forward

    def spy(self, *a, **k):
        seen.append(torch.get_float32_matmul_precision())
        kernels.append(self.cpu_kernels)
        return real_forward(self, *a, **k)

    monkeypatch.setattr(GPT, "forward", spy)
    with precision("high"):  # whatever the caller had
        summary = train_mod.train(*tiny_run(dataset, tmp_path / "a", matmul_precision="medium"))
        assert torch.get_float32_matmul_precision() == "high"
        assert seen and set(seen) == {"medium"}  # training steps and evaluations alike
        assert set(kernels) == {True}  # bf16 matmul inputs: the CPU kernels' manual attention, not SDPA
        assert math.isfinite(summary["val_loss"])
        assert describe_matmul_precision("medium", "cpu") in capsys.readouterr().err
        # an error raised inside the run puts it back too
        monkeypatch.setattr(train_mod, "_train", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
        with pytest.raises(ValueError, match="boom"):
            train_mod.train(*tiny_run(dataset, tmp_path / "b", matmul_precision="medium"))
        assert torch.get_float32_matmul_precision() == "high"


def test_cpu_calibration_is_cached_per_matmul_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    readings = iter([100e9, 300e9, 999e9])
    monkeypatch.setattr(peaks, "measure_cpu_peak", lambda n=1024, repeats=5: next(readings))
    with precision("highest"):
        fp32 = peaks.calibrated_cpu_peak(trials=1)
        assert peaks.calibrated_cpu_peak(trials=1).flops == fp32.flops  # cached: no second reading
    with precision("medium"):
        bf16 = peaks.calibrated_cpu_peak(trials=1)  # the bf16 matmul peak: its own entry
    assert (fp32.flops, bf16.flops) == (100e9, 300e9)


def test_bench_has_bf16_matmul_rows_only_where_they_run_on_bf16_hardware(monkeypatch):
    opts = train_speed.parse_args(["--quick"])
    cpu = torch.device("cpu")
    monkeypatch.setattr(train_speed, "bf16_cpu_matmuls_available", lambda: True)
    rows = train_speed.variants_for("a", opts, cpu)
    assert [(r.label, r.precision) for r in rows if r.precision == "medium"] == [
        ("nanoGPT-style bf16-mm", "medium"), ("flopgpt bf16-mm", "medium")]
    assert rows[0] == train_speed.Variant("nanoGPT-style", "nanogpt", "sdpa", False, "highest")  # fp32 baseline
    assert not [r for r in train_speed.variants_for("a", train_speed.parse_args(["--no-bf16-matmuls"]), cpu)
                if r.precision == "medium"]
    monkeypatch.setattr(train_speed, "bf16_cpu_matmuls_available", lambda: False)
    assert not [r for r in train_speed.variants_for("a", opts, cpu) if r.precision == "medium"]


def test_bench_recipe_b_on_cpu_runs_at_most_three_processes(monkeypatch):
    monkeypatch.setattr(train_speed, "bf16_cpu_matmuls_available", lambda: True)
    rows = train_speed.variants_for("b", train_speed.parse_args([]), torch.device("cpu"))
    assert [r.label for r in rows] == ["nanoGPT-style", "flopgpt sdpa", "flopgpt bf16-mm"]
    rows = train_speed.variants_for("b", train_speed.parse_args(["--no-bf16-matmuls"]), torch.device("cpu"))
    assert [r.label for r in rows] == ["nanoGPT-style", "flopgpt sdpa", "flopgpt manual"]
    rows = train_speed.variants_for("b", train_speed.parse_args(["--without=cpu_kernels"]), torch.device("cpu"))
    assert [r.label for r in rows] == ["nanoGPT-style", "flopgpt", "flopgpt without cpu_kernels"]
    assert rows[2].without == {"cpu_kernels"} and not rows[1].without


def test_bench_without_rows_leave_out_one_technique_each(monkeypatch):
    monkeypatch.setattr(train_speed, "bf16_cpu_matmuls_available", lambda: True)
    opts = train_speed.parse_args(["--without=allocator,cpu_kernels"])
    rows = train_speed.variants_for("a", opts, torch.device("cpu"))
    assert [(r.label, r.precision, set(r.without)) for r in rows] == [
        ("nanoGPT-style", "highest", set()), ("flopgpt", "highest", set()),
        ("flopgpt without allocator", "highest", {"allocator"}),
        ("flopgpt without cpu_kernels", "highest", {"cpu_kernels"}),
        ("flopgpt bf16-mm", "medium", set()), ("flopgpt bf16-mm without cpu_kernels", "medium", {"cpu_kernels"})]
    with pytest.raises(ValueError, match="unknown technique 'turbo'"):
        train_speed.parse_args(["--without=turbo"])
