"""Compute-optimal scaling in miniature: IsoFLOP sweeps (Hoffmann et al. 2022, approach 2) with exact FLOPs.

    python scaling.py [BASE.toml] [--key=value ...] [--preset tiny|default | --budgets 3e10,1e11,3e11]
                      [--sizes 5] [--aspect 8] [--head-dim 8] [--out DIR] [--jobs N]
                      [--dry-run [--json] | --print-commands | --collect]
    python scaling.py --fit OUT/results.jsonl [--json]
    python scaling.py --fit FILE --method parametric [--bootstrap K] [--seed S] [--exclude-highest M] [--json]
    python scaling.py --fit OUT/results.jsonl --compare [--bootstrap K] [--json]
    python scaling.py --ladder [--preset tiny|default] [--jobs N]
    python scaling.py --compare A.toml B.toml [--budgets ... | --preset ...] [--out DIR] [--jobs N]

For each budget C, a ladder of models of one family (n_embd = aspect · n_layer, head size fixed) each trains
(with train.py, one process per run) for the number of steps that makes its exact training FLOPs equal C to
within half a step. Every run's schedule is the base recipe's stretched to its length: warmup and decay keep
their fractions of the recipe's max_iters, lr, min_lr and the schedule's shape are the recipe's. Each finished
run is evaluated on the whole validation split (contiguous windows of block_size, eval mode) and recorded in
OUT/results.jsonl; a rerun skips recorded runs, resumes interrupted ones and records runs finished elsewhere.
Then the fit (model/flops/scaling.py): per-budget parabolas of loss vs log N, N_opt ∝ C^a, D_opt ∝ C^b and the
frontier L_opt vs log10 C, with compute counted as exact FLOPs, 6ND and 6·N_non-embedding·D; written to
OUT/fit.json and OUT/*.png. FLOPs = 2 per multiply-add.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

from model.training.threads import set_wait_policy

set_wait_policy()  # before torch loads: OpenMP reads its wait policy once (model/training/threads.py)

from model.cli import ROOT, OneLineParser, fmt, report_errors  # noqa: E402
from model.config import parse_overrides  # noqa: E402
from model.flops.plots import plot_frontiers, plot_fit  # noqa: E402
from model.flops.scaling import NAMES, Family, check_budgets, compare_lines, fit, plan, point_id, schedule  # noqa: E402
from model.training.recipe import load_recipe  # noqa: E402
from model.training.sweep import Sweep, point_state, public, read_results, run_sweep  # noqa: E402

USAGE = ("python scaling.py [BASE.toml] [--key=value ...] [--preset NAME | --budgets C1,C2,...] [--sizes K] "
         "[--out DIR] [--jobs N] [--dry-run [--json] | --print-commands | --collect] | --fit RESULTS.jsonl "
         "[--json] [--method parametric | --compare] | --compare A.toml B.toml | --ladder")
PRESETS = {
    # tokens_per_param centres each ladder; 200, not Chinchilla's 20: at these budgets the measured optima sit
    # at 100-500 tokens per parameter (docs/scaling.md), and 20 pushes the ladders above them
    "tiny": {"config": "configs/scaling_tiny.toml", "budgets": (3e9, 1e10), "sizes": 3, "tokens_per_param": 200},
    "default": {"config": "configs/scaling_pydoc.toml", "budgets": (1e11, 3e11, 1e12), "sizes": 5,
                "tokens_per_param": 200},
}
LADDER_KEYS = ("n_layer", "n_head", "n_embd")  # set by the family, not by overrides
OWN_KEYS = ("out_dir", "resume", "overwrite")  # set per run by the sweep
EVAL_ITERS = 1  # train.py's own evaluations only mark checkpoints; the sweep evaluates the whole split itself


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = OneLineParser(prog="scaling.py", usage=USAGE, allow_abbrev=False, description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="base TOML recipe (default: the preset's)")
    presets = "; ".join(f"{name}: {','.join(f'{b:.0e}'.replace('e+0', 'e').replace('e+', 'e') for b in v['budgets'])}" for name, v in PRESETS.items())
    p.add_argument("--preset", choices=sorted(PRESETS), help="budgets, sizes and recipe (default: default)")
    p.add_argument("--budgets", help=f"comma-separated FLOP budgets, e.g. 3e10,1e11,3e11 (default: the preset's; "
                                     f"{presets})")
    p.add_argument("--sizes", type=int, help="models per budget, >= 3 (default: the preset's; " +
                   "; ".join(f"{name}: {v['sizes']}" for name, v in PRESETS.items()) + ")")
    p.add_argument("--aspect", type=int, default=8, help="n_embd / n_layer of the family (default 8)")
    p.add_argument("--head-dim", type=int, default=8, help="head size of the family (default 8)")
    p.add_argument("--tokens-per-param", type=float,
                   help="first guess of the optimum that centres each ladder (default: the preset's, 200)")
    p.add_argument("--out", help="sweep folder (default: the recipe's out_dir)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, CPU threads divided among them "
                                                            "(default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run or --fit: one JSON object")
    p.add_argument("--print-commands", action="store_true", help="one train.py command per unfinished run")
    p.add_argument("--collect", action="store_true", help="record runs finished elsewhere, train nothing")
    p.add_argument("--fit", metavar="RESULTS", help="refit a results.jsonl (needs no training)")
    p.add_argument("--compare", nargs="*", metavar="A.toml B.toml",
                   help="sweep two recipes and compare their lines; with --fit: compare the two fitting methods")
    p.add_argument("--method", choices=("isoflop", "parametric"), default="isoflop",
                   help="with --fit: IsoFLOP parabolas (approach 2, default) or the parametric surface (approach 3)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap refits for the intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    p.add_argument("--exclude-highest", type=int, default=0, metavar="M",
                   help="parametric fit without the M highest-loss points (Besiroglu et al. exclude 5)")
    p.add_argument("--ladder", action="store_true", help="Porian et al.'s steps from Kaplan's setup to Chinchilla's")
    args, rest = p.parse_known_args(argv)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.compare is not None and len(args.compare) != (0 if args.fit else 2):
        raise ValueError("--compare takes two recipes A.toml B.toml, or none with --fit RESULTS (both methods)")
    modes = [m for m in ("dry_run", "print_commands", "collect", "fit", "compare", "ladder") if getattr(args, m)]
    if len(modes) > 1:
        raise ValueError(f"--{modes[0].replace('_', '-')} and --{modes[1].replace('_', '-')} exclude each other")
    return args, rest


def parse_budgets(text: str) -> list[float]:
    out = []
    for item in text.split(","):
        try:
            value = float(item.strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"--budgets: {item.strip()!r} is not a number (expected e.g. 3e10,1e11,3e11)") from None
        if not math.isfinite(value) or value < 1:
            raise ValueError(f"--budgets: {item.strip()!r} must be a finite number of FLOPs >= 1")
        out.append(value)
    return out


# ----------------------------------------------------------------------------------------------------
# The plan: base recipe + family + budgets -> points, each with its train.py command

def make_sweep(config: str, overrides: list[str], args, budgets, sizes: int, out: str | None) -> Sweep:
    """The plan of one recipe: every point with its train.py arguments (schedule stretched to its steps)."""
    for key in parse_overrides(overrides):
        if key in LADDER_KEYS:
            raise ValueError(f"--{key} is set by the model family of the sweep (--aspect, --head-dim)")
        if key in OWN_KEYS:
            raise ValueError(f"--{key} is set by the sweep for each run" + (" (use --out)" if key == "out_dir" else ""))
    model, train = load_recipe(config, overrides)
    family = Family(args.aspect, args.head_dim)
    sweep = Sweep(config, list(overrides), Path(out or train.out_dir), model, train)
    guess = PRESETS[args.preset or "default"]["tokens_per_param"] if args.tokens_per_param is None \
        else args.tokens_per_param
    for p in plan(model, family, budgets, sizes, train.batch_size, train.grad_accum, guess):
        p["id"] = point_id(p)
        sched = schedule(p["steps"], train.max_iters, train.warmup_iters, train.lr_decay_iters)
        keys = {"n_layer": p["n_layer"], "n_head": p["n_head"], "n_embd": p["n_embd"], **sched,
                "eval_iters": EVAL_ITERS, "out_dir": str(sweep.out / "points" / p["id"]), "progress": "false"}
        p["args"] = [config, *overrides, *(f"--{k}={v}" for k, v in keys.items())]
        sweep.points.append(p)
    return sweep


def shell_command(p: dict, resume: bool) -> str:
    train_py = os.path.relpath(ROOT / "train.py")
    return shlex.join(["python", train_py, *p["args"], *(["--resume"] if resume else [])])


def render_plan(sweep: Sweep) -> str:
    lines = [f"{'budget':>9} {'n_layer':>7} {'n_head':>6} {'n_embd':>6} {'params':>9} {'steps':>7} "
             f"{'tokens':>10} {'tok/param':>9} {'exact FLOPs':>12} {'6ND':>10} {'6ND/exact':>9}"]
    for p in sweep.points:
        lines.append(f"{p['budget']:9.3g} {p['n_layer']:7d} {p['n_head']:6d} {p['n_embd']:6d} {p['params']:9,d} "
                     f"{p['steps']:7,d} {p['tokens']:10,d} {p['tokens'] / p['params']:9.2f} {p['flops']:12.5g} "
                     f"{p['flops_6nd']:10.4g} {p['flops_6nd'] / p['flops']:9.3f}")
    total = sum(p["flops"] for p in sweep.points)
    lines.append(f"{len(sweep.points)} runs, {total:.4g} exact training FLOPs in all (2 per multiply-add); "
                 f"schedule: the recipe's ({sweep.config}) stretched to each run")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Fit, pictures, report

def render_fit(result: dict) -> str:
    by = result["by_convention"]
    top = max(p["budget"] for p in result["per_budget"])
    lines = [f"{'convention':<30} {'a (N_opt~C^a)':>13} {'b (D_opt~C^b)':>13} {'N_opt at ' + format(top, '.3g'):>16} "
             f"{'frontier slope':>14} {'intercept':>9}"]
    for conv, f in by.items():
        n_top = next((p["n_opt"] for p in f["per_budget"] if p["budget"] == top and p["in_range"]), None)
        lines.append(f"{NAMES[conv]:<30} {fmt(f['a'], '13.3f')} {fmt(f['b'], '13.3f')} {fmt(n_top, '16.4g')} "
                     f"{fmt(f['frontier']['slope'], '14.4f')} {fmt(f['frontier']['intercept'], '9.4f')}")
    if result["a"] is None:
        lines.append("fewer than two budgets have their optimum inside the ladder: no power law or frontier under "
                     "exact FLOPs (larger budgets, or --tokens-per-param to move the ladders)")
    m = result["frontier_measured"]
    lines.append(f"frontier: L_opt = slope · log10(C) + intercept (nats/token); through the best measured run of "
                 f"each budget instead: slope {fmt(m['slope'], '.4f')}, intercept {fmt(m['intercept'], '.4f')}")
    lines.append(f"per budget, exact FLOPs:\n  {'budget':>9} {'C':>11} {'N_opt':>10} {'D_opt':>10} {'L_opt':>7} "
                 f"{'N_best':>8} {'L_best':>7}  vertex")
    for p in result["per_budget"]:
        where = "inside the ladder" if p["in_range"] else ("no minimum (parabola opens down)" if p["n_opt"] is None
                                                         else "OUTSIDE the ladder: extrapolated, not fitted")
        lines.append(f"  {p['budget']:9.3g} {p['compute']:11.4g} {fmt(p['n_opt'], '10.4g')} "
                     f"{fmt(p['d_opt'], '10.4g')} {fmt(p['loss_opt'], '7.4f')} {p['n_best']:8.4g} "
                     f"{p['loss_best']:7.4f}  {where}")
    return "\n".join(lines)


def write_fit(result: dict, records: list[dict], out_dir: Path) -> list[Path]:
    """fit.json (strict JSON) and the three pictures into out_dir; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fit.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return [out_dir / "fit.json", *plot_fit(result, records, out_dir)]


def fit_and_write(records: list[dict], out_dir: Path, as_json: bool) -> dict:
    """Fit, write fit.json and the pictures into out_dir, print the report (or the JSON)."""
    result = fit(records)
    paths = write_fit(result, records, out_dir)
    if as_json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        print(render_fit(result))
        print("wrote " + ", ".join(str(p) for p in paths))
    return result


# ----------------------------------------------------------------------------------------------------
# Modes

def do_sweep(args, overrides, budgets, sizes) -> int:
    config = args.config or os.path.relpath(ROOT / PRESETS[args.preset or "default"]["config"])
    sweep = make_sweep(config, overrides, args, budgets, sizes, args.out)
    if args.dry_run:
        print(json.dumps({"points": [public(p) for p in sweep.points]}, indent=2) if args.json
              else render_plan(sweep))
        return 0
    if args.print_commands:
        results = sweep.out / "results.jsonl"
        records = {r.get("id"): r for r in (read_results(results) if results.exists() else [])}
        for p in sweep.points:
            state = point_state(p, sweep.out, records)
            if state in ("new", "interrupted"):
                print(shell_command(p, state == "interrupted"))
        return 0
    records = run_sweep(sweep, args.jobs, train_new=not args.collect)
    if len(records) < len(sweep.points):
        print(f"{len(records)} of {len(sweep.points)} runs recorded; fitting what has finished", file=sys.stderr)
    fit_and_write(records, sweep.out, args.json)
    return 0


def do_fit(args, overrides) -> int:
    if overrides or args.config or args.budgets or args.preset:
        raise ValueError("--fit takes a results file only (with --json, --out, --method, --compare)")
    path = Path(args.fit)
    if args.method == "parametric" or args.compare is not None:
        from model.flops.fit_report import fit_file
        fit_file(path, args.out, args.json, args.bootstrap, args.seed, args.exclude_highest,
                 compare=args.compare is not None)
        return 0
    fit_and_write(read_results(path), Path(args.out) if args.out else path.parent, args.json)
    return 0


def do_ladder(args, overrides, budgets, sizes) -> int:
    """Porian et al.'s steps from Kaplan's setup to Chinchilla's (model/flops/ladder.py), runs reused."""
    from model.flops.ladder import render_ladder, run_ladder
    config = args.config or os.path.relpath(ROOT / PRESETS[args.preset or "default"]["config"])
    out = Path(args.out or f"out/ladder_{args.preset or 'default'}")
    base = make_sweep(config, overrides, args, budgets, sizes, str(out))
    result = run_ladder(lambda o: make_sweep(config, overrides, args, budgets, sizes, str(o)),
                        lambda sweep: run_sweep(sweep, args.jobs), out, base.train.lr, base.train.min_lr,
                        args.bootstrap, args.seed, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result, indent=2, allow_nan=False) if args.json else render_ladder(result) + "\nwrote "
          + ", ".join(result["written"]))
    return 0


def do_compare(args, overrides, budgets, sizes) -> int:
    """Sweep both recipes at the same budgets; each line, and the compute multiplier at A's losses."""
    a_path, b_path = args.compare
    names = [Path(a_path).stem, Path(b_path).stem]
    if names[0] == names[1]:
        raise ValueError(f"--compare: both recipes are named {names[0]!r}; rename one")
    out = Path(args.out or "out/compare")
    fits = {}
    for name, path in zip(names, args.compare):
        sweep = make_sweep(path, overrides, args, budgets, sizes, str(out / name))
        print(f"recipe {name} ({path}): {len(sweep.points)} runs in {sweep.out}", file=sys.stderr)
        records = run_sweep(sweep, args.jobs)
        fits[name] = fit(records)
        write_fit(fits[name], records, sweep.out)
    result = compare_lines(fits, names, args.compare)
    (out / "compare.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    png = plot_frontiers(fits, out / "compare.png")
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
        return 0
    kind = result["line"]
    print("line: " + ("the parabola optima (L_opt)" if kind == "frontier" else
                      "the best measured run per budget (some optima lie outside the ladders)"))
    for tag, name in zip("ab", names):
        f = result[tag]["frontier"]
        print(f"{tag.upper()} {name}: loss = {fmt(f['slope'], '.4f')} · log10 C + {fmt(f['intercept'], '.4f')}")
    for r in result["multiplier_at_a_budgets"]:
        print(f"to reach A's loss {r['loss']:.4f} (A at {r['budget']:.3g} FLOPs), A needs "
              f"{fmt(r['multiplier'], '.2f')}x the compute B needs")
    print(f"wrote {out / 'compare.json'}, {png}")
    return 0


def run(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    if args.fit:
        return do_fit(args, overrides)
    preset = PRESETS[args.preset or "default"]
    budgets = parse_budgets(args.budgets) if args.budgets else list(preset["budgets"])
    check_budgets(budgets)  # before the dataset is looked for (or prepared)
    sizes = args.sizes if args.sizes is not None else preset["sizes"]
    if args.ladder:
        return do_ladder(args, overrides, budgets, sizes)
    if args.compare:
        if args.config:
            raise ValueError("--compare takes its two recipes instead of a base config")
        return do_compare(args, overrides, budgets, sizes)
    return do_sweep(args, overrides, budgets, sizes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        try:
            return run(argv)
        except BrokenPipeError:  # output piped into `head` and closed early: not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    try:  # OSError: a --out that cannot be written (read-only, /dev/null), a full disk
        return report_errors("scaling.py", body, errors=(ValueError, OSError))
    except RuntimeError as e:  # runs that failed: they are named, finished ones recorded
        print(f"scaling.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scaling.py: interrupted; finished runs are recorded, interrupted ones saved: rerun the same "
              "command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
