"""model/flops/ladder.py: Porian et al.'s steps, each run's schedule and lr, runs shared between steps, the
accounting of each step, and scaling.py --ladder's output (training replaced by a loss formula)."""
import json
import math

import pytest

from conftest import ROOT
from model.flops import ladder

import scaling  # noqa: E402  (conftest puts the repository root on sys.path)


def arg(p_args, key):
    return [a.split("=", 1)[1] for a in p_args if a.startswith(f"--{key}=")][-1]  # the last one wins


def fake_run(calls):
    """Stands in for run_sweep: a loss whose minimum moves from the ladder's first model towards its last as
    the budget grows, lower for lr x2 and beta2 0.95 (so tuning has a winner), recorded as scaling.py does."""
    def run(sweep):
        calls.append(sweep)
        out = []
        for p in sweep.points:
            sizes = sorted(q["n_layer"] for q in sweep.points if q["budget"] == p["budget"])
            mid = sizes[0] + 0.6 + 0.8 * math.log10(p["budget"] / 3e9)
            lr, beta2 = float(arg(p["args"], "lr") if any(a.startswith("--lr=") for a in p["args"]) else 2e-3), \
                float(arg(p["args"], "beta2") if any(a.startswith("--beta2=") for a in p["args"]) else 0.99)
            loss = 3 - 0.1 * math.log10(p["budget"]) + 0.05 * (p["n_layer"] - mid) ** 2 \
                - 0.01 * (lr == 4e-3) - 0.005 * (beta2 == 0.95)
            out.append({"id": p["id"], **scaling.public(p), "val_loss": loss, "args": p["args"]})
        return out
    return run


def test_ladder_steps_schedules_sharing_and_accounting(dataset, tmp_path):
    args, overrides = scaling.parse_args([str(ROOT / "configs" / "scaling_tiny.toml"), f"--dataset={dataset}"])

    def make(out):
        return scaling.make_sweep(args.config, overrides, args, [3e9, 1e10], 3, str(out))
    calls = []
    result = ladder.run_ladder(make, fake_run(calls), tmp_path / "lad", 2e-3, 2e-4, bootstrap=50, seed=0,
                               log=lambda m: None)
    names = [c.out.name for c in calls]
    # kaplan and last_layer share one set of runs; 6 tuning sweeps at the smallest budget only
    assert names[:3] == ["kaplan", "short_warmup", "cosine"] and names[-1] == "tuned" and len(names) == 3 + 6 + 1
    assert all({p["budget"] for p in c.points} == {int(3e9)} for c in calls[3:9])
    longest = max(p["steps"] for p in calls[0].points)
    for p in calls[0].points:  # Kaplan: one fixed warmup and a horizon past every run
        assert arg(p["args"], "warmup_iters") == str(round(3000 / 250000 * 4 * longest))
        assert arg(p["args"], "lr_decay_iters") == str(4 * longest) and int(arg(p["args"], "max_iters")) < 4 * longest
    for p in calls[1].points:  # short warmup: as many tokens as parameters
        assert arg(p["args"], "warmup_iters") == str(max(1, round(p["params"] / (32 * 32))))
        assert arg(p["args"], "lr_decay_iters") == str(4 * longest)
    for p in calls[2].points + calls[-1].points:  # cosine to the end of each run
        assert arg(p["args"], "lr_decay_iters") == str(p["steps"])
    for p in calls[-1].points:  # tuned: the fake loss prefers lr x2 and beta2 0.95 for every size
        assert arg(p["args"], "lr") == "0.004" and arg(p["args"], "min_lr") == "0.0004"
        assert arg(p["args"], "beta2") == "0.95"
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == ["kaplan", "last_layer", "short_warmup", "cosine", "tuned"]
    assert steps["kaplan"]["runs"] == steps["last_layer"]["runs"] == 6
    # the accounting moves the exponent: N and C with the lm_head (vocab 103 x n_embd) differ from Kaplan's
    assert steps["kaplan"]["a"] > 0 and steps["last_layer"]["a"] > 0
    assert steps["kaplan"]["a"] != pytest.approx(steps["last_layer"]["a"], abs=1e-3)
    recs = ladder.accounting([{"params_nonembedding": 100, "vocab_size": 10, "n_embd": 8, "tokens": 1000}], True)
    assert recs[0]["params"] == 180 and recs[0]["flops"] == 6 * 180 * 1000
    saved = json.loads((tmp_path / "lad" / "ladder.json").read_text())
    assert [s["name"] for s in saved["steps"]] == list(steps)
    assert (tmp_path / "lad" / "ladder.png").stat().st_size > 1000
    text = ladder.render_ladder(result)
    assert "+ last layer counted" in text and "95% interval" in text


def test_ladder_flag_conflicts_are_one_line_exit_2(capsys):
    assert scaling.main(["--ladder", "--fit", "results.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exclude each other" in err
