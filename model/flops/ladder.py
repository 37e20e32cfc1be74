"""Tilting the line one change at a time (Porian et al. 2024, "Resolving Discrepancies in Compute-Optimal
Scaling of Language Models", arXiv 2406.19146), at toy scale on the sweep's own family and budgets.

Porian et al. reproduce Kaplan et al.'s exponent of N_opt (their Figure 1a) and move it to Chinchilla's ~0.5 by
changing one thing per step: (b) count the last layer's FLOPs, (c) shorten the warmup, (d) decay the learning
rate with a cosine to the end of each run, (e) tune the learning rate, batch size and AdamW β2 per model size.
Here, each step adds its change to the one before:

    kaplan        Kaplan's accounting: N = non-embedding parameters, C = 6·N·D (no last layer, no attention);
                  Kaplan's schedule: a fixed warmup of WARMUP_SHARE of a fixed horizon of HORIZON x the
                  longest run (3,000 of 250,000 steps in Kaplan et al.), cosine over that horizon, so no run
                  decays to its end
    last_layer    the same runs; N and C count the last layer (the lm_head, vocab_size x n_embd)
    short_warmup  warmup as many tokens as the model has parameters (every run sees at least one token per
                  parameter, so the warmup is short for all of them)
    cosine        the cosine reaches min_lr at each run's last step
    tuned         per model size, the lr (x1/2, x1, x2 of the recipe's, min_lr scaled with it) and AdamW β2
                  (0.95, 0.99) with the lowest loss at the smallest budget (the batch size stays the recipe's)

After each step: approach 2's a (IsoFLOP parabolas, model/flops/scaling.py) with a 95% interval from a
bootstrap over the runs (model/flops/fit_report.isoflop_bootstrap). The training goes through two callables
from scaling.py, make(out) -> a planned Sweep and run(sweep) -> its records, so that runs resume and are
reused: a rerun trains nothing that is recorded, and kaplan and last_layer share every run.
"""
from __future__ import annotations

import json
from pathlib import Path

from .fit_report import isoflop_bootstrap

HORIZON = 4  # Kaplan's decay horizon, in multiples of the longest run of the plan
WARMUP_SHARE = 3000 / 250_000  # Kaplan et al.'s warmup steps over their decay horizon
LR_MULTS = (0.5, 1.0, 2.0)
BETA2S = (0.95, 0.99)
STEPS = (("kaplan", "Kaplan: non-emb N, long warmup"), ("last_layer", "+ last layer counted"),
         ("short_warmup", "+ short warmup"), ("cosine", "+ cosine to the end"), ("tuned", "+ lr, β2 per size"))


def kaplan_schedule(p: dict, longest: int) -> dict:
    horizon = HORIZON * longest
    return {"warmup_iters": round(WARMUP_SHARE * horizon), "lr_decay_iters": horizon}


def short_warmup(p: dict) -> int:
    return max(1, round(p["params"] / (p["batch_size"] * p["block_size"] * p["grad_accum"])))


def with_args(sweep, extra) -> object:
    """The sweep with extra --key=value arguments per point (later arguments override the sweep's own)."""
    for p in sweep.points:
        p["args"] = [*p["args"], *(f"--{k}={v}" for k, v in extra(p).items())]
    return sweep


def accounting(records: list[dict], last_layer: bool) -> list[dict]:
    """Records re-counted for the fit: N = non-embedding parameters (+ the lm_head's vocab_size·n_embd with
    last_layer), C = 6·N·D in the `flops` field that the exact-FLOP fit reads."""
    out = []
    for r in records:
        n = r["params_nonembedding"] + (r["vocab_size"] * r["n_embd"] if last_layer else 0)
        out.append({**r, "params": n, "flops": 6 * n * r["tokens"], "flops_6nd": 6 * n * r["tokens"]})
    return out


def tune(make, run, out: Path, lr: float, min_lr: float, log) -> dict[int, dict]:
    """Per n_layer, the (lr, min_lr, beta2) with the lowest loss at the smallest budget (cosine recipe)."""
    best: dict[int, tuple[float, dict]] = {}
    for mult in LR_MULTS:
        for beta2 in BETA2S:
            sweep = make(out / f"tune_lr{mult:g}_b2{beta2:g}")
            first = min(p["budget"] for p in sweep.points)
            sweep.points = [p for p in sweep.points if p["budget"] == first]
            choice = {"lr": lr * mult, "min_lr": min_lr * mult, "beta2": beta2}
            with_args(sweep, lambda p, c=choice: {"warmup_iters": short_warmup(p), "lr_decay_iters": p["steps"], **c})
            for r in run(sweep):
                if r["n_layer"] not in best or r["val_loss"] < best[r["n_layer"]][0]:
                    best[r["n_layer"]] = (r["val_loss"], choice)
    log("tuned per n_layer: " + ", ".join(f"{m}: lr {c['lr']:g}, beta2 {c['beta2']:g}"
                                          for m, (_, c) in sorted(best.items())))
    return {m: c for m, (_, c) in best.items()}


def nearest(tuned: dict[int, dict], m: int) -> dict:
    return tuned[min(tuned, key=lambda k: (abs(k - m), k))]


def run_ladder(make, run, out: Path, lr: float, min_lr: float, bootstrap: int = 1000, seed: int = 0,
               log=print) -> dict:
    """Every step's runs (trained or reused), fit and a with its interval; writes OUT/ladder.json, ladder.png."""
    from .fit_plots import plot_ladder
    out = Path(out)
    longest = max(p["steps"] for p in make(out / "kaplan").points)
    kaplan = run(with_args(make(out / "kaplan"), lambda p: kaplan_schedule(p, longest)))
    short = run(with_args(make(out / "short_warmup"),
                          lambda p: {**kaplan_schedule(p, longest), "warmup_iters": short_warmup(p)}))
    cosine = run(with_args(make(out / "cosine"), lambda p: {"warmup_iters": short_warmup(p),
                                                             "lr_decay_iters": p["steps"]}))
    tuned = tune(make, run, out, lr, min_lr, log)
    final = run(with_args(make(out / "tuned"), lambda p: {"warmup_iters": short_warmup(p),
                                                           "lr_decay_iters": p["steps"],
                                                           **nearest(tuned, p["n_layer"])}))
    records = {"kaplan": accounting(kaplan, False), "last_layer": accounting(kaplan, True),
               "short_warmup": accounting(short, True), "cosine": accounting(cosine, True),
               "tuned": accounting(final, True)}
    steps = []
    for name, label in STEPS:
        iso = isoflop_bootstrap(records[name], bootstrap, seed)
        steps.append({"name": name, "label": label, "a": iso["a"], "a_ci95": iso["a_ci95"],
                      "replicates_with_a": iso["replicates_with_a"], "bootstrap": bootstrap, "runs": len(records[name]),
                      "per_budget": [{k: b[k] for k in ("budget", "n_opt", "in_range", "n_best", "loss_best")}
                                     for b in iso["per_budget"]]})
    result = {"steps": steps, "kaplan_horizon": HORIZON * longest,
              "kaplan_warmup": round(WARMUP_SHARE * HORIZON * longest),
              "tuned": {str(m): c for m, c in sorted(tuned.items())}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ladder.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    result["written"] = [str(out / "ladder.json"), str(plot_ladder(steps, out / "ladder.png"))]
    return result


def render_ladder(result: dict) -> str:
    lines = [f"{'step':<28} {'a (N_opt ~ C^a)':>15}  95% interval       budgets with an optimum inside"]
    for s in result["steps"]:
        a = "-" if s["a"] is None else f"{s['a']:.3f}"
        ci = "" if s["a_ci95"] is None else f"[{s['a_ci95'][0]:.3f}, {s['a_ci95'][1]:.3f}]"
        inside = sum(b["in_range"] for b in s["per_budget"])
        lines.append(f"{s['label']:<28} {a:>15}  {ci:<18} {inside} of {len(s['per_budget'])} "
                     f"({s['replicates_with_a']} of {s['bootstrap']} resamples had an a)")
    lines.append(f"Kaplan schedule: warmup {result['kaplan_warmup']} steps, cosine horizon {result['kaplan_horizon']} "
                 f"steps, for every run")
    return "\n".join(lines)
