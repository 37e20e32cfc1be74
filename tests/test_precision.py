"""Float32 matmul precision (TrainConfig.matmul_precision) and the CPU attention path it selects: the
hand-written CausalAttention against the manual path and a float64 gradcheck, the setting applied for a run
and put back, the peak calibrated per precision, and the benchmark rows."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train as train_mod
from model import GPT, GPTConfig, TrainConfig
from model.gpt import gpt as gpt_mod
from model.flops import peaks
from model.training.runtime import cpu_bf16_matmul_unit, describe_matmul_precision, matmul_precision, resolve_matmul_precision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_speed  # noqa: E402


def precision(name):
    return matmul_precision(name, "cpu")


def small(**kw):
    return GPTConfig(**{**dict(vocab_size=31, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False), **kw})


def manual_attention(qkv, n_head):
    """The textbook form, written out here: softmax(q kᵀ / sqrt(hs) + causal mask) v, heads side by side."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = (z.view(B, T, n_head, hs).transpose(1, 2) for z in qkv.split(C, dim=2))
    att = q @ k.transpose(-2, -1) / math.sqrt(hs)
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)


def test_causal_attention_gradcheck_in_float64():
    qkv = torch.randn(2, 5, 3 * 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gpt_mod.CausalAttention.apply(t, 2), (qkv,))


@pytest.mark.parametrize("B, T, nh, hs", [(3, 16, 4, 8), (1, 1, 2, 4), (2, 7, 1, 5)])
def test_causal_attention_matches_the_manual_form(B, T, nh, hs):
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * nh * hs, requires_grad=True)
    dy = torch.randn(B, T, nh * hs)
    y = gpt_mod.CausalAttention.apply(qkv, nh)
    (grad,) = torch.autograd.grad(y, qkv, dy)
    y_ref = manual_attention(qkv, nh)
    (grad_ref,) = torch.autograd.grad(y_ref, qkv, dy)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5)


def test_medium_precision_on_cpu_takes_causal_attention_not_sdpa(monkeypatch):
    """Under "medium", CPU 'sdpa' runs CausalAttention (SDPA's CPU kernel is 10x slower there) without dropout
    or a cache; with a KV cache it takes the manual path; at "highest" it stays SDPA."""
    calls = {"causal": 0, "sdpa": 0}
    real_apply, real_sdpa = gpt_mod.CausalAttention.apply, F.scaled_dot_product_attention

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(gpt_mod.CausalAttention, "apply", count("causal", real_apply))
    monkeypatch.setattr(gpt_mod.F, "scaled_dot_product_attention", count("sdpa", real_sdpa))
    torch.manual_seed(0)
    m = GPT(small())
    idx = torch.randint(0, 31, (2, 16))
    ref_logits, ref_loss = m(idx, idx)
    assert calls == {"causal": 0, "sdpa": 2}
    with precision("medium"):
        logits, loss = m(idx, idx)
        assert calls == {"causal": 2, "sdpa": 2}
        cache = m.new_cache(2)
        m(idx[:, :5], kv_cache=cache)
        m(idx[:, 5:6], kv_cache=cache)
        assert calls == {"causal": 2, "sdpa": 2}  # cached steps: the manual path
    # bf16 matmul inputs where the CPU has them: close to fp32, not equal (equal where "medium" is a no-op)
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=5e-2, rtol=0)


def test_medium_precision_gradients_match_fp32_sdpa_closely():
    torch.manual_seed(1)
    m = GPT(small())
    idx = torch.randint(0, 31, (3, 16))
    m(idx, idx)[1].backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    with precision("medium"):
        m(idx, idx)[1].backward()
    for n, p in m.named_parameters():
        scale = ref[n].abs().max().item()
        assert (p.grad - ref[n]).abs().max().item() <= 0.05 * scale + 1e-6, n


def test_medium_precision_compiles_without_graph_breaks():
    """The precision is read through torch.compiler.assume_constant_result: a str would break the graph."""
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
    seen = []
    real_forward = GPT.forward

    def spy(self, *a, **k):
        seen.append(torch.get_float32_matmul_precision())
        return real_forward(self, *a, **k)

    monkeypatch.setattr(GPT, "forward", spy)
    with precision("high"):  # whatever the caller had
        summary = train_mod.train(*tiny_run(dataset, tmp_path / "a", matmul_precision="medium"))
        assert torch.get_float32_matmul_precision() == "high"
        assert seen and set(seen) == {"medium"}  # training steps and evaluations alike
        assert math.isfinite(summary["val_loss"])
        assert describe_matmul_precision("medium", "cpu") in capsys.readouterr().err
        # an error raised inside the run puts it back too
        monkeypatch.setattr(train_mod, "_train", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
        with pytest.raises(ValueError, match="boom"):
            train_mod.train(*tiny_run(dataset, tmp_path / "b", matmul_precision="medium"))
        assert torch.get_float32_matmul_precision() == "high"


def test_cpu_peak_is_calibrated_and_cached_per_precision(monkeypatch):
    readings = iter([100e9, 300e9, 999e9])
    monkeypatch.setattr(peaks, "measure_cpu_peak", lambda n=1024, repeats=5: next(readings))
    peaks._cpu_peak.cache_clear()
    try:
        with precision("highest"):
            fp32 = peaks.cpu_peak()
            assert peaks.cpu_peak() == fp32  # cached: no second reading
        with precision("medium"):
            bf16 = peaks.cpu_peak()
        assert (fp32[0], bf16[0]) == (100e9, 300e9)
        assert "CPU fp32, calibrated" in fp32[1] and "bf16 inputs (precision 'medium')" in bf16[1]
    finally:
        peaks._cpu_peak.cache_clear()


def test_bench_has_bf16_matmul_rows_only_where_they_run_on_bf16_hardware(monkeypatch):
    opts = train_speed.parse_args(["--quick"])
    cpu = torch.device("cpu")
    monkeypatch.setattr(train_speed, "bf16_cpu_matmuls_available", lambda: True)
    rows = train_speed.variants_for("a", opts, cpu)
    assert [(r[0], r[4]) for r in rows if r[4] == "medium"] == [("nanoGPT-style bf16-mm", "medium"),
                                                               ("flopgpt bf16-mm", "medium")]
    assert rows[0][:5] == ("nanoGPT-style", "nanogpt", "sdpa", False, "highest")  # the baseline stays fp32
    assert not [r for r in train_speed.variants_for("a", train_speed.parse_args(["--no-bf16-matmuls"]), cpu)
                if r[4] == "medium"]
    monkeypatch.setattr(train_speed, "bf16_cpu_matmuls_available", lambda: False)
    assert not [r for r in train_speed.variants_for("a", opts, cpu) if r[4] == "medium"]


def test_bench_recipe_b_on_cpu_runs_at_most_three_processes(monkeypatch):
    monkeypatch.setattr(train_speed, "bf16_cpu_matmuls_available", lambda: True)
    rows = train_speed.variants_for("b", train_speed.parse_args([]), torch.device("cpu"))
    assert [r[0] for r in rows] == ["nanoGPT-style", "flopgpt sdpa", "flopgpt bf16-mm"]
    rows = train_speed.variants_for("b", train_speed.parse_args(["--no-bf16-matmuls"]), torch.device("cpu"))
    assert [r[0] for r in rows] == ["nanoGPT-style", "flopgpt sdpa", "flopgpt manual"]
