"""flops.py --profile: per-component FLOPs from the formulas, each op's time in its component's row, MFU <= 1."""
import json
import time

import pytest
import torch

import flops as cli
from model import GPTConfig
from model.flops import formulas as f
from model.flops.peaks import Peak
from model.flops.profile import COMPONENTS, component_flops, profile_step

SMALL = ["--n_layer=2", "--n_head=2", "--n_embd=16", "--block_size=8", "--vocab_size=23", "--dropout=0"]


def by_hand(cfg, B, T):
    """Each row from the single-op formula functions (train step: matmuls 3x, element-wise ops 1 + 2 = 3x)."""
    tok = B * T
    return {"qkv": 3 * f.qkv(cfg, tok), "attn_scores": 3 * f.attn_scores(cfg, B, T, T) + 3 * f.attn_scale(cfg, B, T, T),
            "softmax": 3 * f.softmax(cfg, B, T, T), "attn_values": 3 * f.attn_values(cfg, B, T, T),
            "attn_proj": 3 * f.attn_proj(cfg, tok), "mlp_up": 3 * f.mlp_up(cfg, tok), "gelu": 3 * f.gelu(cfg, tok),
            "mlp_down": 3 * f.mlp_down(cfg, tok), "layer_norm": 3 * f.layer_norm(cfg, tok),
            "lm_head": 3 * f.lm_head(cfg, tok), "cross_entropy": 3 * f.cross_entropy(cfg, tok), "optimizer": 0,
            "other": 3 * (f.residual_add(cfg, tok) + f.position_add(cfg, tok) + f.bias_add(cfg, tok))
            + f.embedding_backward(cfg, tok)}


def test_component_flops_equal_the_formulas_and_sum_to_the_step():
    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=23)
    rows = component_flops(cfg, 2, 8, fused=False)
    assert rows == by_hand(cfg, 2, 8)
    step = f.train_step(cfg, 2, 8)
    assert sum(rows.values()) == step.total + step.non_matmul_total
    fused = component_flops(cfg, 2, 8, fused=True)
    assert fused["attention_fused"] == rows["attn_scores"] + rows["softmax"] + rows["attn_values"]
    assert sum(fused.values()) == sum(rows.values())


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_profile_rows_carry_the_formulas_and_mfu_stays_below_one(attention):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=23, dropout=0.0, attention=attention)
    peak = Peak(1.0, "forced low for the test")  # any real step beats 1 FLOP/s: the peak must be raised
    r = profile_step(cfg, 2, 8, torch.device("cpu"), peak, steps=2, warmup=1)
    names = [row["component"] for row in r["rows"]]
    assert set(names) <= set(COMPONENTS) and names[-1] == "other"
    if attention == "manual":  # the hand-written attention's ops are split by the softmax between them
        assert {"attn_scores", "softmax", "attn_values"} <= set(names) and r["attention"] == "separate ops"
        assert all(row["seconds"] > 0 for row in r["rows"] if row["component"] in ("attn_scores", "attn_values"))
    expected = component_flops(cfg, 2, 8, fused=r["attention"] == "fused kernel")
    assert {row["component"]: row["flops"] for row in r["rows"]} == expected
    assert all(row["seconds"] >= 0 for row in r["rows"])
    assert r["model_flops"] == f.train_step_flops(cfg, 2, 8)
    assert r["mfu"] == 1.0 and r["peak_flops"] == pytest.approx(r["model_flops"] / r["unprofiled_step_seconds"])
    assert "raised" in r["peak_source"] and "exceeds the peak" in r["peak_messages"][0]
    # bytes per row: the exact unfused formulas (fp32), the fused attention's parts merged into its row
    from model.flops.bytes import unfused_train_step
    parts = unfused_train_step(cfg, 2, 8, "float32")
    assert sum(row["bytes"] for row in r["rows"]) == sum(parts.values())
    assert all(row["intensity"] == pytest.approx(row["flops"] / row["bytes"]) for row in r["rows"])
    assert r["profiled_step_seconds"] >= r["step_seconds"] - 1e-12 and r["timer_seconds"] >= 0


PLANT = 2048  # a (2048, 2048) @ (2048, 2048) matmul: 17 GFLOP, far above anything else the tiny model does
PLANTED = {"transformer.h.1.mlp.gelu": "gelu", "transformer.h.0.attn.c_proj": "attn_proj",
           "transformer.ln_f": "layer_norm"}  # module -> the row its ops belong to


@pytest.mark.parametrize("module,component", PLANTED.items())
def test_a_planted_slow_op_lands_in_its_components_row(monkeypatch, module, component):
    """One module's forward also runs a large matmul: its row must carry that time (at least half the matmul's
    best time measured alone: the margin is for a busy machine), the rows of the other candidates must not."""
    import model.flops.profile as profile
    planted = torch.randn(PLANT, PLANT)

    class Planted(profile.GPT):
        def __init__(self, cfg):
            super().__init__(cfg)
            target = self.get_submodule(module)
            forward = target.forward
            target.forward = lambda x: (torch.mm(planted, planted), forward(x))[1]

    monkeypatch.setattr(profile, "GPT", Planted)
    alone = []
    for _ in range(3):
        start = time.perf_counter()
        torch.mm(planted, planted)
        alone.append(time.perf_counter() - start)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=23, dropout=0.0)
    r = profile_step(cfg, 2, 8, torch.device("cpu"), Peak(1e15, "test"), steps=2, warmup=1)
    seconds = {row["component"]: row["seconds"] for row in r["rows"]}
    assert seconds[component] >= 0.5 * min(alone), seconds  # one planted matmul per profiled step
    assert all(seconds[c] < seconds[component] for c in PLANTED.values() if c != component), seconds


def test_cli_profile_json_schema_and_png(tmp_path, capsys):
    png = tmp_path / "p.png"
    assert cli.main([*SMALL, "--batch-size", "2", "--profile", "--json", "--device", "cpu", "--out", str(png)]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert {"rows", "step_seconds", "mfu", "peak_flops", "peak_source"} <= set(out)
    assert all({"component", "flops", "seconds", "flops_per_s", "flop_share", "time_share"} <= set(r) for r in out["rows"])
    assert 0 <= out["mfu"] <= 1 and png.stat().st_size > 0
    assert out["model"].endswith("(2 layers x 16)") and " CPU thread" in out["threads"]


def test_cli_profile_png_goes_to_out_by_default_named_after_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "tiny.toml"
    toml.write_text("n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 8\nvocab_size = 23\n")
    assert cli.main([str(toml), "--batch-size", "2", "--profile", "--device", "cpu", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("profile: tiny (1 layers x 16) on cpu") and "1 CPU thread" in out
    assert out.rstrip().endswith("wrote out/profile_tiny.png") and (tmp_path / "out" / "profile_tiny.png").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".png"] == []  # nothing beside the config


def test_cli_profile_bad_inputs(capsys):
    assert cli.main([*SMALL, "--profile", "--device", "tpu"]) == 2
    assert "--device 'tpu' is not a device" in capsys.readouterr().err
    assert cli.main([*SMALL, "--profile", "--plan"]) == 2
