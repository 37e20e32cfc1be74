"""`python flops.py`: tables, --json, --sweep, config handling, bad inputs; the configs/ files."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import flops as cli
from model import GPTConfig, TrainConfig
from model.flops import formulas as flops
from model.flops import report
from model.config import load

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--n_layer=2", "--n_head=2", "--n_embd=16", "--block_size=8", "--vocab_size=23"]


def run_json(argv, capsys) -> dict:
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_is_gpt2_124m_with_the_check_values(capsys):
    out = run_json([], capsys)
    assert out["config"] == {**GPTConfig().__dict__}
    assert (out["batch_size"], out["seq_len"]) == (1, 1024)
    f = out["forward"]
    assert f["analytic"] == f["fvcore"] == f["torch"] == 291_648_307_200 and f["fvcore_macs"] == 145_824_153_600
    assert out["train_step"]["analytic"] == out["train_step"]["torch"] == 874_944_921_600
    assert out["params"] == {"total": 124_439_808, "non_embedding": 85_056_000, "kaplan_12Ld2": 84_934_656}
    assert out["fvcore_unsupported_ops"] == {}


def test_json_shape_and_agreement(capsys):
    out = run_json([*SMALL, "--attention=manual", "--pos_encoding=sinusoidal", "--batch-size", "3",
                    "--seq-len", "5"], capsys)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=23, attention="manual",
                    pos_encoding="sinusoidal")
    assert out["config"]["attention"] == "manual" and (out["batch_size"], out["seq_len"]) == (3, 5)
    exact = flops.forward(cfg, 3, 5)
    comps = out["forward"]["components"]
    assert set(comps) == set(flops.MATMUL_COMPONENTS)  # a partition: no aggregate among the parts
    for counter in ("analytic", "fvcore"):
        assert sum(row[counter] for row in comps.values()) == out["forward"][counter] == exact.total
    attention = out["forward"]["aggregates"]["attention"]
    assert attention["of"] == ["attn_scores", "attn_values"]
    assert attention["analytic"] == attention["fvcore"] == attention["torch"] == exact.attention
    assert attention["analytic"] == sum(comps[name]["analytic"] for name in attention["of"])
    for name in flops.MATMUL_COMPONENTS:
        assert comps[name]["analytic"] == comps[name]["fvcore"] == exact.matmul[name]
        if name not in ("attn_scores", "attn_values"):
            assert comps[name]["torch"] == exact.matmul[name]
    assert out["forward"]["causal"] == exact.causal_total
    assert {op: v["analytic"] for op, v in out["forward"]["non_matmul"].items()} == exact.non_matmul
    assert out["train_step"]["analytic"] == out["train_step"]["torch"] == 3 * exact.total
    for a in out["approximations"].values():
        assert set(a) >= {"flops", "ratio_to_exact"} and a["ratio_to_exact"] == pytest.approx(a["flops"] / a["exact"])
    assert set(out["params"]) >= {"total", "non_embedding"}


def test_text_report(capsys):
    assert cli.main([*SMALL, "--seq-len=4"]) == 0
    out = capsys.readouterr().out
    for text in ("qkv", "attention (scores+values)", "total", "training step", "non-matmul", "layer_norm",
                 "parameters: total", "palm", "chinchilla", "2NS_cached", "counted in"):
        assert text in out
    total = flops.forward(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=23), 1, 4).total
    assert f"{total:,}" in out


def test_vocab_size_from_the_dataset_meta(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "meta.json").write_text(json.dumps({"vocab_size": 65, "dtype": "uint16", "tokenizer": "char"}))
    (tmp_path / "c.toml").write_text('dataset = "ds"\nn_layer = 1\nn_head = 2\nn_embd = 8\nblock_size = 4\n'
                                     'batch_size = 32\nlr = 1e-3\n')
    out = run_json(["c.toml"], capsys)
    assert out["config"]["vocab_size"] == 65 and "meta.json" in out["vocab_source"]
    assert out["seq_len"] == 4 and out["batch_size"] == 1  # train keys (batch_size) are ignored
    (tmp_path / "c2.toml").write_text('dataset = "missing"\nn_layer = 1\nn_head = 2\nn_embd = 8\nblock_size = 4\n')
    out = run_json(["c2.toml"], capsys)
    assert out["config"]["vocab_size"] == 50257 and "not found" in out["vocab_source"]
    out = run_json(["c.toml", "--vocab_size=7"], capsys)  # an explicit vocab_size wins
    assert out["config"]["vocab_size"] == 7


@pytest.mark.parametrize("argv,message", [
    (["--seq-len=9", *SMALL], "block_size"), (["--seq-len=0", *SMALL], "seq-len"),
    (["--batch-size=0", *SMALL], "batch-size"), (["--bogus=1"], "bogus"), (["missing.toml"], "missing.toml"),
    (["--n_head=5"], "n_embd"), (["--batch-size=x"], "batch-size"), (["a.toml", "b.toml"], "b.toml"),
    (["--device=h100"], "--plan"),
])
def test_bad_inputs_exit_2_with_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_help_lists_the_model_keys_with_the_values_of_the_config(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([str(ROOT / "configs" / "default.toml"), "--n_head=2", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--batch-size" in out
    for line in ("--n_layer=4 ", "--n_head=2 ", "--block_size=128 ", "--pos_encoding=learned "):
        assert f"  {line}" in out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "  --n_layer=12 " in capsys.readouterr().out  # no config: GPT-2 124M


def test_bad_toml_value(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('n_layer = "four"\n')
    assert cli.main([str(bad)]) == 2
    assert "n_layer" in capsys.readouterr().err


def test_cli_subprocess_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "flops.py", "--seq-len=99999"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_sweep_writes_csv_and_plots(tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    assert cli.main([*SMALL, "--sweep", str(out_dir)]) == 0
    assert {p.name for p in out_dir.iterdir()} == {"flops_sweep.csv", "measured_vs_analytic.png",
                                                   "approximation_ratios.png"}
    rows = list(csv.DictReader((out_dir / "flops_sweep.csv").open()))
    assert {r["sweep"] for r in rows} == {"width", "depth", "seq_len"}
    assert [int(r["seq_len"]) for r in rows if r["sweep"] == "seq_len"] == [1, 2, 4, 8]
    for r in rows:
        assert r["analytic_forward"] == r["fvcore_forward"] == r["torch_forward"]
        assert r["analytic_train"] == r["torch_train"]
    for png in ("measured_vs_analytic.png", "approximation_ratios.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_points():
    pts = report.sweep_points(GPTConfig())
    assert [c.n_embd for s, c in pts if s == "width"] == [192, 384, 768, 1536]
    assert [c.n_layer for s, c in pts if s == "depth"] == [1, 6, 12, 24]
    assert report.seq_lens(1024)[-1] == 1024 and report.seq_lens(24) == [1, 2, 4, 8, 16, 24]


@pytest.mark.parametrize("name,shape,params", [
    ("gpt2_124m", (12, 768, 12), 124_439_808), ("gpt2_350m", (24, 1024, 16), 354_823_168),
    ("gpt2_774m", (36, 1280, 20), 774_030_080), ("gpt2_1558m", (48, 1600, 25), 1_557_611_200),
    ("gpt3_175b", (96, 12288, 96), 174_604_259_328),
])
def test_config_files(name, shape, params):
    model_cfg, _ = load(ROOT / "configs" / f"{name}.toml", classes=(GPTConfig, TrainConfig))
    assert (model_cfg.n_layer, model_cfg.n_embd, model_cfg.n_head) == shape
    assert model_cfg.vocab_size == 50257
    assert model_cfg.block_size == (2048 if name == "gpt3_175b" else 1024)
    assert flops.params_total(model_cfg) == params


def test_gpt2_124m_is_a_train_config():
    model_cfg, train_cfg = load(ROOT / "configs" / "gpt2_124m.toml", classes=(GPTConfig, TrainConfig))
    assert train_cfg.batch_size * model_cfg.block_size * train_cfg.grad_accum == 491_520  # ~0.5M tokens/step
    assert (train_cfg.lr, train_cfg.min_lr, train_cfg.warmup_iters, train_cfg.max_iters) == (6e-4, 6e-5, 2000, 600000)
    assert (train_cfg.weight_decay, train_cfg.beta2, train_cfg.eval_interval, train_cfg.eval_iters) == (0.1, 0.95, 1000,
                                                                                                        200)
    assert train_cfg.dataset == "data/openwebtext_gpt2" and train_cfg.compile is True
