"""Compute planner (model/flops/planner.py and `flops.py --plan`)."""
import json
import math

import pytest

import flops as flops_cli
from model import GPTConfig
from model.flops import formulas as flops
from model.flops.counters import build_model, torch_count
from model.flops.planner import parse_tokens, plan_run, scale_class

SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=23)


@pytest.mark.parametrize("value,name", [
    (10 ** 21, "zettascale"), (10 ** 21 - 1, "exascale"), (10 ** 24, "yottascale"), (10 ** 24 - 1, "zettascale"),
    (10 ** 27, "yottascale"), (10 ** 18, "exascale"), (10 ** 18 - 1, "petascale"), (10 ** 15, "petascale"),
    (10 ** 12, "terascale"), (10 ** 9, "gigascale"), (10 ** 6, "megascale"), (10 ** 3, "kiloscale"),
    (999, "sub-kiloscale"), (0, "sub-kiloscale"), (3.14e23, "zettascale"),
])
def test_scale_classes_at_their_boundaries(value, name):
    assert scale_class(value) == name


@pytest.mark.parametrize("value,name", [
    (1e21, "zettascale"), (1e24, "yottascale"), (1e18, "exascale"),  # the float below 10^24 reads as 1e24
    (math.nextafter(1e24, 0), "zettascale"), (math.nextafter(1e21, 0), "exascale"),
    (9.999999999999999e23, "zettascale"), (1.0000000000000001e24, "yottascale"),
])
def test_scale_class_of_floats_is_the_decimal_they_print_as(value, name):
    assert scale_class(value) == name


def test_plans_without_a_finite_answer_are_value_errors():
    with pytest.raises(ValueError, match="beyond the largest float"):
        plan_run(SMALL, 10 ** 400, 8, 1e12, 0.4)
    for peak, mfu in ((1e-320, 0.4), (5e-324, 0.4), (1e12, 1e-320)):
        with pytest.raises(ValueError, match="no finite plan"):
            plan_run(SMALL, 300 * 10 ** 9, 8, peak, mfu)


@pytest.mark.parametrize("extra", [["--tokens", "1e400"], ["--tokens", "300B", "--peak-flops", "1e-320"],
                                   ["--tokens", "300B", "--peak-flops", "1e-320", "--json"],
                                   ["--tokens", "1B", "--mfu", "1e-320"], ["--tokens", "1B", "--peak-flops", "nan"],
                                   ["--tokens", "1B", "--peak-flops", "inf"]])
def test_cli_plans_without_a_finite_answer_exit_2(extra, capsys):
    assert flops_cli.main(["--plan", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("flops.py: error:")


def test_plan_json_is_strict(capsys):
    assert flops_cli.main(["--plan", "--tokens", "1e300", "--peak-flops", "1e12", "--json"]) == 2
    capsys.readouterr()
    assert flops_cli.main(["--plan", "--tokens", "1e30", "--peak-flops", "1e12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert out["scale"] == "yottascale" and out["seconds"] == pytest.approx(out["flops"] / 4e11)


@pytest.mark.parametrize("text,tokens", [
    ("300e9", 300 * 10 ** 9), ("300B", 300 * 10 ** 9), ("300b", 300 * 10 ** 9), ("1.4T", 14 * 10 ** 11),
    ("2.5M", 2_500_000), ("5k", 5000), ("300_000", 300_000), ("3e11", 3 * 10 ** 11), ("7", 7), (12, 12),
    ("1.5e3", 1500), ("300G", 300 * 10 ** 9),
])
def test_token_forms(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["-5", "0", "0B", "1.5", "abc", "", "3e", "1e-3", "B", "--5", True])
def test_bad_token_counts(text):
    with pytest.raises(ValueError):
        parse_tokens(text)


def test_plan_total_equals_measured_training_steps():
    model = build_model(SMALL)
    measured_step = torch_count(SMALL, 1, 8, train=True, model=model).total  # FlopCounterMode, fwd + bwd
    for tokens in (8, 64, 65, 1000):  # 65 tokens: 9 sequences, the last one partly filled
        plan = plan_run(SMALL, tokens, 8, 1e12, 0.5)
        sequences = -(-tokens // 8)
        assert plan["sequences"] == sequences and plan["tokens_trained"] == 8 * sequences
        assert plan["flops"] == sequences * measured_step
        # one micro-batch of all the sequences is the same compute
        assert plan["flops"] == torch_count(SMALL, sequences, 8, train=True, model=model).total
        assert plan["seconds"] == pytest.approx(plan["flops"] / 0.5e12)
    short = plan_run(SMALL, 100, 4, 1e12)
    assert short["flops"] == 25 * torch_count(SMALL, 1, 4, train=True, model=model).total


def test_plan_ratios_and_generation_costs():
    p = plan_run(GPTConfig(), 300 * 10 ** 9, 1024, 989.4e12, 0.4)
    assert p["flops"] == 292_968_750 * 874_944_921_600
    assert p["flops_6nd"] == 6 * 124_439_808 * 300 * 10 ** 9
    assert p["ratio_6nd"] == pytest.approx(p["flops_6nd"] / p["flops"])
    assert p["scale"] == "exascale" and p["mfu"] == 0.4
    assert p["per_generated_token"]["cached"] == flops.decode_step(GPTConfig(), 1, 1023).total
    assert p["per_generated_token"]["uncached"] == flops.step(GPTConfig(), 1, 1024, last_only=True).total


@pytest.mark.parametrize("kwargs", [dict(tokens=0), dict(tokens=-8), dict(seq_len=9), dict(seq_len=0),
                                    dict(peak_flops=0.0), dict(mfu=0.0), dict(mfu=1.5), dict(tokens=8.0)])
def test_plan_run_bad_inputs(kwargs):
    args = {"config": SMALL, "tokens": 64, "seq_len": 8, "peak_flops": 1e12, "mfu": 0.4, **kwargs}
    with pytest.raises(ValueError):
        plan_run(**args)


def test_cli_plan_json(capsys):
    assert flops_cli.main(["--n_layer=2", "--n_head=2", "--n_embd=16", "--block_size=8", "--vocab_size=23",
                           "--plan", "--tokens", "1k", "--device", "a100", "--mfu", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 1000 and out["sequences"] == 125 and out["peak_flops"] == 312e12
    assert out["flops"] == 125 * flops.train_step_flops(SMALL, 1, 8)
    assert out["seconds"] == pytest.approx(out["flops"] / (0.5 * 312e12))
    assert out["config"]["n_layer"] == 2 and "A100" in out["device"]


def test_cli_plan_text_and_peak_override(capsys):
    assert flops_cli.main(["--n_layer=2", "--n_head=2", "--n_embd=16", "--block_size=8", "--vocab_size=23",
                           "--plan", "--tokens=64", "--peak-flops=1e12"]) == 0
    out = capsys.readouterr().out
    assert "8 sequences" in out and "6ND" in out and "MFU 40%" in out and "with a KV cache" in out


@pytest.mark.parametrize("argv", [
    ["--plan", "--tokens", "-5"], ["--plan", "--tokens", "0"], ["--plan"], ["--plan", "--tokens", "1B",
                                                                               "--device", "tpu"],
    ["--plan", "--tokens", "1B", "--mfu", "2"], ["--plan", "--tokens", "1B", "--peak-flops", "-1"],
    ["--tokens", "1B"],
])
def test_cli_plan_bad_inputs_exit_2_with_one_line(argv, capsys):
    assert flops_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flops.py: error:")
