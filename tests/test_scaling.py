"""scaling.py and model/flops/scaling.py: exact planning, the IsoFLOP fit, resumable sweeps, CLI errors."""
import json
import math
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from model import GPT, GPTConfig
from model.config import TrainConfig, to_dict
from model.flops.formulas import train_step_flops
from model.flops.scaling import (Family, compute_multiplier, fit, fit_budget, ladder, plan, point_id,
                                 schedule)
from model.training import sweep as sweep_mod
from model.training.checkpoint import FORMAT, save_checkpoint

sys.path.insert(0, str(ROOT))
import scaling  # noqa: E402

BASE = GPTConfig(vocab_size=103, block_size=64, bias=False, activation="gelu")


# ----------------------------------------------------------------------------------------------------
# Planning

@pytest.mark.parametrize("batch,accum", [(16, 1), (4, 3)])
def test_plan_is_exact_within_one_step(batch, accum):
    budgets = [3e11, 1e12, 3e12]
    points = plan(BASE, Family(16, 16), budgets, 5, batch, accum)
    assert [p["budget"] for p in points] == [int(b) for b in budgets for _ in range(5)]
    for p in points:
        cfg = GPTConfig(vocab_size=103, block_size=64, n_layer=p["n_layer"], n_head=p["n_head"],
                        n_embd=p["n_embd"], bias=False, activation="gelu")
        step = train_step_flops(cfg, batch, 64) * accum  # grad_accum micro-batches per step
        assert p["flops"] == p["steps"] * step
        assert abs(p["flops"] - p["budget"]) <= step / 2  # the nearest whole number of steps
        assert p["steps"] >= 10
        assert p["params"] == GPT(cfg).num_params()
        assert p["params_nonembedding"] == GPT(cfg).num_params(non_embedding=True)
        assert p["tokens"] == p["steps"] * batch * 64 * accum
        assert p["flops_6nd"] == 6 * p["params"] * p["tokens"]
        assert p["n_embd"] == 16 * p["n_layer"] and p["n_embd"] // p["n_head"] == 16


def test_ladder_is_consecutive_and_centred_on_the_guess():
    # at 1e12 the members get 4252, 154, 17, 3.4, 0.94, ... tokens per parameter: 17 is closest to 20
    pts = ladder(BASE, Family(16, 16), int(1e12), 3, batch_size=16)
    assert [p["n_layer"] for p in pts] == [2, 3, 4]
    # pushed off the bottom of the family it shifts up rather than shrinking
    pts = ladder(BASE, Family(16, 16), int(1e12), 5, batch_size=16, tokens_per_param=1e4)
    assert [p["n_layer"] for p in pts] == [1, 2, 3, 4, 5]


def test_schedule_keeps_the_recipe_fractions():
    # recipe: 1000 steps, 50 warmup (5%), decay to the end -> 37 steps: round(1.85) = 2 warmup, decay at 37
    assert schedule(37, 1000, 50, 0) == {"max_iters": 37, "warmup_iters": 2, "lr_decay_iters": 37,
                                         "eval_interval": 9}
    # decay ending at 80% of a 2000-step recipe ends at 80% of the run
    assert schedule(500, 2000, 100, 1600)["lr_decay_iters"] == 400
    assert schedule(3, 2000, 100, 2000)["eval_interval"] == 1


def test_point_ids_are_unique():
    points = plan(BASE, Family(16, 16), [1e11, 1.5e11, 3e11], 3, 16)
    assert len({point_id(p) for p in points}) == len(points)
    assert point_id(points[0]) == "C1e11_L1_d16"


@pytest.mark.parametrize("budgets,message", [
    ([1e11], "two distinct budgets"),
    ([1e11, 1e11], "two distinct budgets"),
    ([1e5, 1e11], "too small for the smallest model"),
    ([float("nan"), 1e11], "finite"),
])
def test_plan_rejects_bad_budgets(budgets, message):
    with pytest.raises(ValueError, match=message):
        plan(BASE, Family(), budgets, 3, 16)


# ----------------------------------------------------------------------------------------------------
# Fitting

def chinchilla_records(alpha, beta, budgets, sizes=7, span=1.5):
    """L = E + A/N^alpha + B/D^beta on IsoFLOP ladders of `span` decades that hold the true optimum
    (Hoffmann et al. 2022, eq. 4: N_opt = G·(C/6)^(beta/(alpha+beta))) but are centred at twice it, compute
    counted as 6ND."""
    E, A, B = 1.69, 406.4, 410.7  # Hoffmann et al. 2022's fitted constants
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    out = []
    for c in budgets:
        centre = 2 * G * (c / 6) ** (beta / (alpha + beta))
        for n in centre * np.logspace(-span / 2, span / 2, sizes):
            d = c / (6 * n)
            out.append({"budget": c, "params": float(n), "params_nonembedding": 0.9 * n, "tokens": float(d),
                        "flops": c, "flops_6nd": c, "val_loss": E + A / n ** alpha + B / d ** beta})
    return out


@pytest.mark.parametrize("alpha,beta", [(0.34, 0.28), (0.5, 0.25), (0.25, 0.4)])
def test_fit_recovers_chinchilla_exponents(alpha, beta):
    result = fit(chinchilla_records(alpha, beta, [1e18, 1e19, 1e20, 1e21]))
    assert result["a"] == pytest.approx(beta / (alpha + beta), abs=0.02)
    assert result["b"] == pytest.approx(alpha / (alpha + beta), abs=0.02)
    # the frontier falls with compute; its slope is d L_opt / d log10 C
    assert result["frontier"]["slope"] < 0
    assert set(result["by_convention"]) == {"exact", "6nd", "6n_nonembedding_d"}


def test_fit_leaves_out_extrapolated_optima():
    recs = chinchilla_records(0.34, 0.28, [1e18, 1e19, 1e20])
    # a fourth budget whose ladder is centred about 15x below its optimum: the vertex is an extrapolation
    far = [{**r, "budget": 1e21, "flops": 1e21, "flops_6nd": 1e21, "params": r["params"] / 30 * 10 ** 1.35,
            "tokens": 1e21 / (6 * r["params"] / 30 * 10 ** 1.35)} for r in recs if r["budget"] == 1e18]
    for r in far:
        r["val_loss"] = 1.69 + 406.4 / r["params"] ** 0.34 + 410.7 / r["tokens"] ** 0.28
    result = fit(recs + far)
    assert [p["in_range"] for p in result["per_budget"]] == [True, True, True, False]
    assert result["a"] == pytest.approx(0.28 / 0.62, abs=0.02)
    assert result["frontier_measured"]["slope"] < 0


def test_fit_budget_vertex_and_d_opt_by_hand():
    # loss = 2 + 0.5·(log10 N - 5)^2: vertex at N = 1e5, loss 2; 6ND: D_opt = C / (6·N_opt)
    recs = [{"budget": 6e12, "params": n, "params_nonembedding": n / 2, "tokens": 1e12 / n, "flops": 7e12,
             "flops_6nd": 6e12, "val_loss": 2 + 0.5 * (math.log10(n) - 5) ** 2} for n in (1e4, 1e5, 1e6)]
    p = fit_budget(recs, "6nd")
    assert p["n_opt"] == pytest.approx(1e5) and p["loss_opt"] == pytest.approx(2.0)
    assert p["compute"] == pytest.approx(6e12) and p["d_opt"] == pytest.approx(6e12 / (6 * 1e5))
    assert p["in_range"]
    assert p["n_best"] == 100_000 and type(p["n_best"]) is int  # a count: "n_best": 100000 in fit.json
    odd = [{**r, "params": 1872 * r["params"] / 1e5} for r in recs]  # 10 ** log10(1872) is 1871.9999999999993
    assert json.dumps(fit_budget(odd, "exact")["n_best"]) == "1872"
    # exact FLOPs: 7e12 FLOPs over 1e12/N tokens -> 7·N FLOPs per token -> D_opt = 7e12 / (7·1e5)
    assert fit_budget(recs, "exact")["d_opt"] == pytest.approx(1e7)
    # non-embedding N is half: the vertex moves to 5e4 on that axis
    assert fit_budget(recs, "6n_nonembedding_d")["n_opt"] == pytest.approx(5e4)
    # a parabola that opens downwards has no optimum
    for r in recs:
        r["val_loss"] = 4 - r["val_loss"]
    assert fit_budget(recs, "exact")["n_opt"] is None


def test_compute_multiplier_by_hand():
    a = {"slope": -0.1, "intercept": 3.0}
    b = {"slope": -0.1, "intercept": 2.9}  # 0.1 nats lower everywhere = one decade of compute
    assert compute_multiplier(a, b, 1.8) == pytest.approx(10.0)
    assert compute_multiplier(a, {"slope": 0.0, "intercept": 1.0}, 1.8) is None


def test_fit_rejects_unfittable_records():
    recs = chinchilla_records(0.34, 0.28, [1e18, 1e19])
    with pytest.raises(ValueError, match="two or more budgets"):
        fit([r for r in recs if r["budget"] == 1e18])
    with pytest.raises(ValueError, match="lacks val_loss"):
        fit([{k: v for k, v in r.items() if k != "val_loss"} for r in recs])
    with pytest.raises(ValueError, match="three"):
        fit([r for r in recs if r["budget"] == 1e19 or r is recs[0]])


# ----------------------------------------------------------------------------------------------------
# Sweeps on disk: records, finished and interrupted runs

def small_sweep(dataset, out):
    args, overrides = scaling.parse_args([str(ROOT / "configs" / "scaling_tiny.toml"), f"--dataset={dataset}"])
    return scaling.make_sweep(args.config, overrides, args, [3e9, 1e10], 3, str(out))


def fake_checkpoint(sweep, p, step):
    cfg = GPTConfig(vocab_size=p["vocab_size"], block_size=p["block_size"], n_layer=p["n_layer"],
                    n_head=p["n_head"], n_embd=p["n_embd"], bias=False, activation="gelu")
    torch.manual_seed(0)
    state = {"format": FORMAT, "step": step, "model": GPT(cfg).state_dict(), "model_config": to_dict(cfg),
             "train_config": to_dict(TrainConfig(max_iters=p["steps"]))}
    save_checkpoint(state, sweep.out / "points" / p["id"] / "last.pt")
    return cfg


def test_rerun_skips_recorded_resumes_interrupted_and_collects_finished(dataset, tmp_path, monkeypatch):
    sweep = small_sweep(dataset, tmp_path / "sw")
    recorded, finished, interrupted = sweep.points[:3]
    sweep.out.mkdir(parents=True)
    rec = {"id": recorded["id"], **sweep_mod.public(recorded), "val_loss": 2.5, "wall_s": 1.0, "args": recorded["args"]}
    (sweep.out / "results.jsonl").write_text(json.dumps(rec) + "\n")
    fake_checkpoint(sweep, finished, finished["steps"])
    fake_checkpoint(sweep, interrupted, 1)
    launched = []
    real_popen = subprocess.Popen

    def no_training(cmd, **kwargs):  # stands in for train.py: records the command, runs a process that fails
        launched.append(cmd)
        return real_popen([sys.executable, "-c", "raise SystemExit(3)"])

    monkeypatch.setattr(sweep_mod.subprocess, "Popen", no_training)
    with pytest.raises(RuntimeError, match=r"failed: .*exit 3"):
        sweep_mod.run_sweep(sweep, jobs=1)
    assert len(launched) == 1  # a failure stops new launches; the first unfinished run is the interrupted one
    assert launched[0][-1] == "--resume" and f"--out_dir={sweep.out / 'points' / interrupted['id']}" in launched[0]
    lines = [json.loads(x) for x in (sweep.out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [recorded["id"], finished["id"]]  # recorded kept once, finished collected
    assert lines[1]["wall_s"] is None and lines[1]["val_tokens"] > 0

    # collect-only: no process at all, and the records are unchanged
    launched.clear()
    records = sweep_mod.run_sweep(sweep, jobs=2, train_new=False)
    assert launched == [] and [r["id"] for r in records] == [recorded["id"], finished["id"]]


def test_a_record_of_another_plan_is_refused(dataset, tmp_path):
    sweep = small_sweep(dataset, tmp_path / "sw")
    p = sweep.points[0]
    sweep.out.mkdir(parents=True)
    other = {"id": p["id"], **sweep_mod.public(p), "val_loss": 2.5, "args": [*p["args"][:-1], "--lr=1"]}
    (sweep.out / "results.jsonl").write_text(json.dumps(other) + "\n")
    with pytest.raises(ValueError, match="another plan or recipe"):
        sweep_mod.run_sweep(sweep, jobs=1)


def test_print_commands_lists_unfinished_runs(dataset, tmp_path, capsys):
    sweep = small_sweep(dataset, tmp_path / "sw")
    fake_checkpoint(sweep, sweep.points[1], 1)
    argv = [str(ROOT / "configs" / "scaling_tiny.toml"), f"--dataset={dataset}", "--budgets", "3e9,1e10",
            "--sizes", "3", "--out", str(sweep.out), "--print-commands"]
    assert scaling.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(sweep.points)
    for line, p in zip(lines, sweep.points):
        words = shlex.split(line)
        assert words[:2] == ["python", scaling.os.path.relpath(ROOT / "train.py")]
        assert f"--out_dir={sweep.out / 'points' / p['id']}" in words and f"--max_iters={p['steps']}" in words
        assert (words[-1] == "--resume") == (p is sweep.points[1])


# ----------------------------------------------------------------------------------------------------
# CLI: bad inputs are one line and exit 2

@pytest.mark.parametrize("argv,message", [
    (["--budgets", "1e11", "--dry-run"], "two distinct budgets"),
    (["--budgets", "1e11,lots", "--dry-run"], "'lots' is not a number"),
    (["--budgets", "1e6,1e11", "--dry-run"], "too small for the smallest model"),
    (["--budgets", "1e11,3e11", "--sizes", "2", "--dry-run"], "sizes must be an integer >= 3"),
    (["--n_layer=4", "--dry-run"], "set by the model family"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--tokens-per-param", "-5", "--dry-run"], "tokens_per_param must be a positive number"),
    (["--aspect", "12", "--dry-run"], "must be a multiple of head_dim"),
    (["--fit", "/nonexistent/results.jsonl"], "results file not found"),
    (["--dry-run", "--collect"], "exclude each other"),
])
def test_cli_bad_inputs_one_line_exit_2(argv, message, capsys):
    from model.training.data import ensure_dataset
    ensure_dataset("data/pydoc_char")  # prepared first, so its one-time note is not part of the error output
    capsys.readouterr()
    assert scaling.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scaling.py: error:") and message in err


def test_cli_exit_code_and_no_traceback():
    r = subprocess.run([sys.executable, str(ROOT / "scaling.py"), "--budgets", "abc,1e11", "--dry-run"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_dry_run_json_schema(capsys):
    assert scaling.main(["--preset", "tiny", "--dry-run", "--json"]) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    assert len(points) == 6
    assert all(list(p) == ["budget", "n_layer", "n_head", "n_embd", "vocab_size", "block_size", "batch_size",
                           "grad_accum", "steps", "params", "params_nonembedding", "tokens", "flops",
                           "flops_6nd"] for p in points)


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path):
    """The whole method: plan, train 6 runs with train.py, record, fit, draw; a rerun trains nothing."""
    from model.training.data import prepare
    data = prepare("pydoc", "char", tmp_path / "pydoc_char", quiet=True)
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "scaling.py"), "--preset", "tiny", f"--dataset={data}", "--out", str(out),
           "--jobs", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    records = sweep_mod.read_results(out / "results.jsonl")
    assert len(records) == 6 and all(math.isfinite(x["val_loss"]) and x["wall_s"] > 0 for x in records)
    result = json.loads((out / "fit.json").read_text())
    assert {"a", "b", "per_budget", "frontier", "by_convention"} <= set(result)
    assert [p["budget"] for p in result["per_budget"]] == [int(3e9), int(1e10)]
    for name in ("isoflop.png", "optima.png", "frontier.png"):
        assert (out / name).stat().st_size > 1000
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and "training" not in again.stderr
    assert len(sweep_mod.read_results(out / "results.jsonl")) == 6
    refit = subprocess.run([sys.executable, str(ROOT / "scaling.py"), "--fit", str(out / "results.jsonl"),
                            "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert refit.returncode == 0 and json.loads(refit.stdout) == result
