"""MFU in train.py: step records carry flops_per_s = exact step FLOPs / step time, and mfu never exceeds 1,
even against a peak forced low (which the first step raises, saying so)."""
import json
from pathlib import Path

import pytest

import train as train_mod
from model import GPTConfig, TrainConfig
from model.flops.bytes import train_minimum_bytes
from model.flops.formulas import train_step_flops


def test_mfu_at_most_one_and_flops_per_s_exact_with_a_peak_forced_low(dataset, tmp_path, capsys):
    vocab = json.loads((Path(dataset) / "meta.json").read_text())["vocab_size"]
    model_cfg = GPTConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg = TrainConfig(dataset=str(dataset), out_dir=str(tmp_path / "run"), batch_size=4, grad_accum=2,
                      max_iters=5, eval_interval=5, eval_iters=1, warmup_iters=1, device="cpu", peak_flops=1e3,
                      progress=False)
    summary = train_mod.train(model_cfg, cfg)
    step_flops = train_step_flops(model_cfg, 4, 16) * 2
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") != "eval"]
    assert len(steps) == 5
    for r in steps:
        assert 0 < r["mfu"] <= 1
        assert r["flops_per_s"] == pytest.approx(step_flops / (r["dt_ms"] / 1e3), rel=1e-9)
    assert steps[0]["mfu"] == 1.0  # 1 kFLOP/s is beaten at once: the peak becomes that step's rate
    assert summary["peak_flops"] == pytest.approx(max(r["flops_per_s"] for r in steps))  # raised, never exceeded
    assert 0 < summary["mfu"] <= 1
    err = capsys.readouterr().err
    assert "the peak is raised to the measured rate" in err
    done = [ln for ln in err.splitlines() if ln.startswith("done:")][0]
    assert "raised to a measured" in done and "given (peak_flops)" in done  # the final line names peak and source
    # MBU beside MFU: minimum bytes (fp32 weights read twice for 2 micro-batches, written once, AdamW state)
    step_bytes = train_minimum_bytes(model_cfg, 4, 16, "float32", 2)["total"]
    for r in steps:
        assert r["bytes_per_s"] == pytest.approx(step_bytes / (r["dt_ms"] / 1e3), rel=1e-9)
        assert 0 < r["mbu"] <= 1
    assert 0 < summary["mbu"] <= 1 and "MBU " in done and "GB/s" in done
