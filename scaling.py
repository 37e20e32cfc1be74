"""Compute-optimal scaling in miniature: IsoFLOP sweeps (Hoffmann et al. 2022, approach 2) with exact FLOPs.

    python scaling.py [BASE.toml] [--key=value ...] [--preset tiny|default | --budgets 3e10,1e11,3e11]
                      [--sizes 5] [--aspect 8] [--head-dim 8] [--out DIR] [--jobs N]
                      [--dry-run [--json] | --print-commands | --collect]
    python scaling.py --fit OUT/results.jsonl [--json]
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
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from model.training.threads import child_env, describe, set_wait_policy  # noqa: E402  (no torch)
USAGE = ("python scaling.py [BASE.toml] [--key=value ...] [--preset NAME | --budgets C1,C2,...] [--sizes K] "
         "[--out DIR] [--jobs N] [--dry-run [--json] | --print-commands | --collect] | --fit RESULTS.jsonl "
         "[--json] | --compare A.toml B.toml")
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
EVAL_BATCH = 64  # validation windows per forward in the whole-split evaluation


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2
        raise ValueError(message)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = _Parser(prog="scaling.py", usage=USAGE, allow_abbrev=False, description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="base TOML recipe (default: the preset's)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="budgets, sizes and recipe (default: default)")
    p.add_argument("--budgets", help="comma-separated FLOP budgets, e.g. 3e10,1e11,3e11")
    p.add_argument("--sizes", type=int, help="models per budget (>= 3)")
    p.add_argument("--aspect", type=int, default=8, help="n_embd / n_layer of the family (default 8)")
    p.add_argument("--head-dim", type=int, default=8, help="head size of the family (default 8)")
    p.add_argument("--tokens-per-param", type=float,
                   help="first guess of the optimum that centres each ladder (default: the preset's, 200)")
    p.add_argument("--out", help="sweep folder (default: the recipe's out_dir)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, CPU threads divided among them")
    p.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run or --fit: one JSON object")
    p.add_argument("--print-commands", action="store_true", help="one train.py command per unfinished run")
    p.add_argument("--collect", action="store_true", help="record runs finished elsewhere, train nothing")
    p.add_argument("--fit", metavar="RESULTS", help="refit a results.jsonl (needs no training)")
    p.add_argument("--compare", nargs=2, metavar=("A.toml", "B.toml"), help="sweep two recipes, compare lines")
    args, rest = p.parse_known_args(argv)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    modes = [m for m in ("dry_run", "print_commands", "collect", "fit", "compare") if getattr(args, m)]
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

@dataclass
class Sweep:
    config: str  # base TOML path as given
    overrides: list[str]  # --key=value for train.py, as given
    out: Path
    model: object  # GPTConfig of the recipe (vocab_size from the dataset)
    train: object  # TrainConfig of the recipe
    points: list[dict] = field(default_factory=list)


def load_recipe(config: str, overrides: list[str]):
    """(GPTConfig, TrainConfig) of a base recipe, vocab_size read from its dataset as train.py does."""
    from model.config import GPTConfig, TrainConfig, build, parse_overrides, read_toml
    from model.training.data import ensure_dataset, load_meta
    values = read_toml(config)
    given = parse_overrides(overrides)
    for key in given:
        if key in LADDER_KEYS:
            raise ValueError(f"--{key} is set by the model family of the sweep (--aspect, --head-dim)")
        if key in OWN_KEYS:
            raise ValueError(f"--{key} is set by the sweep for each run" + (" (use --out)" if key == "out_dir" else ""))
    values.update(given)
    _, train = build((GPTConfig, TrainConfig), values, defaults={"vocab_size": 1})
    dataset = ensure_dataset(train.dataset)  # found as train.py finds it (cwd, then the repo root)
    model, train = build((GPTConfig, TrainConfig), values, defaults={"vocab_size": load_meta(dataset)["vocab_size"]})
    return model, replace(train, dataset=str(dataset))


def make_sweep(config: str, overrides: list[str], args, budgets, sizes: int, out: str | None) -> Sweep:
    """The plan of one recipe: every point with its train.py arguments (schedule stretched to its steps)."""
    from model.flops.scaling import Family, plan, point_id, schedule
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


def command(p: dict, resume: bool) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *p["args"], *(["--resume"] if resume else [])]


def shell_command(p: dict, resume: bool) -> str:
    train_py = os.path.relpath(ROOT / "train.py")
    return shlex.join(["python", train_py, *p["args"], *(["--resume"] if resume else [])])


def public(p: dict) -> dict:
    from model.flops.scaling import POINT_KEYS
    return {k: p[k] for k in POINT_KEYS}


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
# State of each point on disk: recorded, finished elsewhere (checkpoint at its last step), interrupted, new

def read_results(path: Path) -> list[dict]:
    """The records of a results.jsonl; ValueError naming the line that is not a JSON object."""
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object")
        out.append(rec)
    return out


def point_state(p: dict, out_dir: Path, records: dict[str, dict]) -> str:
    """"recorded", "finished" (final checkpoint, no record), "interrupted" (an earlier checkpoint) or "new".
    A record or checkpoint of a different plan under the same id is a ValueError (never overwritten)."""
    rec = records.get(p["id"])
    if rec is not None:
        if rec.get("args") != p["args"] or any(rec.get(k) != v for k, v in public(p).items()):
            raise ValueError(f"{out_dir / 'results.jsonl'}: run {p['id']} was recorded with another plan or "
                             f"recipe; use another --out to keep both")
        return "recorded"
    last = out_dir / "points" / p["id"] / "last.pt"
    if not last.exists():
        return "new"
    from model.training.checkpoint import load_checkpoint
    ckpt = load_checkpoint(last)
    planned = {"n_layer": p["n_layer"], "n_embd": p["n_embd"], "max_iters": p["steps"]}
    model_cfg, train_cfg = ckpt.get("model_config") or {}, ckpt.get("train_config") or {}
    found = {"n_layer": model_cfg.get("n_layer"), "n_embd": model_cfg.get("n_embd"),
             "max_iters": train_cfg.get("max_iters")}
    if found != planned:
        raise ValueError(f"{last}: a run of another plan ({found}, planned {planned}); use another --out")
    return "finished" if int(ckpt.get("step", -1)) == p["steps"] else "interrupted"


def val_loss(checkpoint: Path, dataset: str) -> float:
    """Mean cross-entropy over the whole validation split: contiguous non-overlapping windows of block_size
    (every target token once, except the last partial window's), eval mode, no sampling: deterministic."""
    import numpy as np
    import torch
    from model.training.checkpoint import load_model
    from model.training.data import open_split
    model, _ = load_model(checkpoint)
    T = model.config.block_size
    data = open_split(dataset, "val")
    n = (len(data) - 1) // T
    ids = torch.from_numpy(np.asarray(data[:n * T + 1]).astype(np.int64))  # (n·T + 1,)
    x, y = ids[:-1].view(n, T), ids[1:].view(n, T)  # (n, T) each: y is x shifted by one token
    total = 0.0
    with torch.inference_mode():
        for i in range(0, n, EVAL_BATCH):
            _, loss = model(x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH])
            total += loss.item() * len(x[i:i + EVAL_BATCH])
    return total / n


def record(sweep: Sweep, p: dict, wall_s: float | None, cpu_s: float | None = None) -> dict:
    """Evaluate a finished run and append its record to OUT/results.jsonl (one write, flushed to disk)."""
    ckpt = sweep.out / "points" / p["id"] / "last.pt"
    rec = {"id": p["id"], **public(p), "val_loss": val_loss(ckpt, sweep.train.dataset),
           "val_tokens": _val_tokens(sweep, p), "wall_s": wall_s, "cpu_s": cpu_s, "args": p["args"]}
    with (sweep.out / "results.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(rec, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return rec


def _val_tokens(sweep: Sweep, p: dict) -> int:
    from model.training.data import open_split
    T = p["block_size"]
    return (len(open_split(sweep.train.dataset, "val")) - 1) // T * T


# ----------------------------------------------------------------------------------------------------
# Running: N train.py processes at a time, threads divided among them

class Progress:
    """One line per finished run: runs done, ETA from the FLOP rate so far, best loss per budget."""

    def __init__(self, total: int, done: int, flops_left: int):
        self.total, self.done, self.flops_left = total, done, flops_left
        self.flops_done, self.start, self.best = 0, time.perf_counter(), {}

    def seed(self, rec: dict) -> None:
        b = self.best.get(rec["budget"])
        if b is None or rec["val_loss"] < b[0]:
            self.best[rec["budget"]] = (rec["val_loss"], rec["n_layer"])

    def finished(self, rec: dict, trained: bool) -> str:
        self.done += 1
        self.seed(rec)
        self.flops_left -= rec["flops"]
        if trained:
            self.flops_done += rec["flops"]
        elapsed = time.perf_counter() - self.start
        eta = self.flops_left * elapsed / self.flops_done if self.flops_done else float("nan")
        best = ", ".join(f"{b:.3g}: {v:.4f} (L{m})" for b, (v, m) in sorted(self.best.items()))
        wall = (f"{rec['wall_s']:.0f} s, CPU {_num(rec.get('cpu_s'), '.0f')} s" if rec.get("wall_s") is not None
                else "finished elsewhere")
        return (f"[{self.done}/{self.total}] {rec['id']}: val_loss {rec['val_loss']:.4f} ({wall}); "
                f"ETA {eta / 60:.1f} min; best per budget {best}")


def run_sweep(sweep: Sweep, jobs: int, train_new: bool = True) -> list[dict]:
    """Record what is finished, train the rest `jobs` at a time (unless train_new is False); returns all
    records of the plan. Interrupted: children save and stop; rerun the same command to resume."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    results = sweep.out / "results.jsonl"
    records = {r.get("id"): r for r in (read_results(results) if results.exists() else [])}
    states = {p["id"]: point_state(p, sweep.out, records) for p in sweep.points}
    from model.training.threads import set_threads
    threads = set_threads(max(1, (os.cpu_count() or 1) // jobs))
    todo = [p for p in sweep.points if states[p["id"]] in ("new", "interrupted")]
    prog = Progress(len(sweep.points), 0, sum(p["flops"] for p in sweep.points))
    for p in sweep.points:
        if states[p["id"]] == "recorded":
            prog.done += 1
            prog.flops_left -= p["flops"]
            prog.seed(records[p["id"]])
        elif states[p["id"]] == "finished":
            records[p["id"]] = record(sweep, p, None)
            print(prog.finished(records[p["id"]], False), file=sys.stderr)
    if todo and train_new:
        print(f"training {len(todo)} run(s), {jobs} at a time, {describe(threads)} each; logs in "
              f"{sweep.out / 'points'}/<run>/train.log", file=sys.stderr)
        _train_all(sweep, todo, states, jobs, threads, records, prog)
    return [records[p["id"]] for p in sweep.points if p["id"] in records]


def _reap(proc) -> tuple[int, float | None] | None:
    """(exit code, CPU seconds user+sys) of a child that has ended, None while it runs. os.wait4 gives each
    child's own CPU time (where the OS has it), which says what the run costs on an idle machine."""
    if not hasattr(os, "wait4"):
        return None if proc.poll() is None else (proc.returncode, None)
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return proc.returncode, usage.ru_utime + usage.ru_stime


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the sweep as Ctrl-C does: children save, records stay


def _train_all(sweep, todo, states, jobs, threads, records, prog) -> None:
    running: dict = {}
    queue, failed = list(todo), []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while queue or running:
            while queue and len(running) < jobs and not failed:
                p = queue.pop(0)
                run_dir = sweep.out / "points" / p["id"]
                run_dir.mkdir(parents=True, exist_ok=True)
                log = (run_dir / "train.log").open("a")
                proc = subprocess.Popen(command(p, states[p["id"]] == "interrupted"), stdout=log,
                                        stderr=subprocess.STDOUT, env=child_env(threads))  # model/training/threads.py
                running[proc] = (p, time.perf_counter(), log)
            if not running:
                break
            time.sleep(0.1)
            for proc, (code, cpu_s) in [(q, r) for q in list(running) if (r := _reap(q)) is not None]:
                p, t0, log = running.pop(proc)
                log.close()
                if code != 0:
                    failed.append(f"{p['id']} (exit {code}, see {sweep.out / 'points' / p['id']}/train.log)")
                    continue
                records[p["id"]] = record(sweep, p, time.perf_counter() - t0, cpu_s)
                print(prog.finished(records[p["id"]], True), file=sys.stderr)
    except KeyboardInterrupt:
        for proc in running:
            proc.send_signal(signal.SIGTERM)  # train.py finishes its step, saves last.pt, exits
        for proc in running:
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {'; '.join(failed)}; finished runs are recorded, "
                           f"rerun to retry")


# ----------------------------------------------------------------------------------------------------
# Fit, pictures, report

NAMES = {"exact": "exact FLOPs, N = all params", "6nd": "6ND, N = all params",
         "6n_nonembedding_d": "6·N_non-emb·D, N = non-emb"}


def render_fit(result: dict) -> str:
    by = result["by_convention"]
    top = max(p["budget"] for p in result["per_budget"])
    lines = [f"{'convention':<30} {'a (N_opt~C^a)':>13} {'b (D_opt~C^b)':>13} {'N_opt at ' + format(top, '.3g'):>16} "
             f"{'frontier slope':>14} {'intercept':>9}"]
    for conv, f in by.items():
        n_top = next((p["n_opt"] for p in f["per_budget"] if p["budget"] == top and p["in_range"]), None)
        lines.append(f"{NAMES[conv]:<30} {_num(f['a'], '13.3f')} {_num(f['b'], '13.3f')} {_num(n_top, '16.4g')} "
                     f"{_num(f['frontier']['slope'], '14.4f')} {_num(f['frontier']['intercept'], '9.4f')}")
    if result["a"] is None:
        lines.append("fewer than two budgets have their optimum inside the ladder: no power law or frontier under "
                     "exact FLOPs (larger budgets, or --tokens-per-param to move the ladders)")
    m = result["frontier_measured"]
    lines.append(f"frontier: L_opt = slope · log10(C) + intercept (nats/token); through the best measured run of "
                 f"each budget instead: slope {_num(m['slope'], '.4f')}, intercept {_num(m['intercept'], '.4f')}")
    lines.append(f"per budget, exact FLOPs:\n  {'budget':>9} {'C':>11} {'N_opt':>10} {'D_opt':>10} {'L_opt':>7} "
                 f"{'N_best':>8} {'L_best':>7}  vertex")
    for p in result["per_budget"]:
        where = "inside the ladder" if p["in_range"] else ("no minimum (parabola opens down)" if p["n_opt"] is None
                                                         else "OUTSIDE the ladder: extrapolated, not fitted")
        lines.append(f"  {p['budget']:9.3g} {p['compute']:11.4g} {_num(p['n_opt'], '10.4g')} "
                     f"{_num(p['d_opt'], '10.4g')} {_num(p['loss_opt'], '7.4f')} {p['n_best']:8.4g} "
                     f"{p['loss_best']:7.4f}  {where}")
    return "\n".join(lines)


def _num(v, spec: str) -> str:
    return format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0])


def write_fit(result: dict, records: list[dict], out_dir: Path) -> list[Path]:
    """fit.json (strict JSON) and the three pictures into out_dir; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fit.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return [out_dir / "fit.json", *plot_fit(result, records, out_dir)]


def fit_and_write(records: list[dict], out_dir: Path, as_json: bool) -> dict:
    """Fit, write fit.json and the pictures into out_dir, print the report (or the JSON)."""
    from model.flops.scaling import fit
    result = fit(records)
    paths = write_fit(result, records, out_dir)
    if as_json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        print(render_fit(result))
        print("wrote " + ", ".join(str(p) for p in paths))
    return result


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_fit(result: dict, records: list[dict], out_dir: Path) -> list[Path]:
    return [plot_isoflop(result, records, out_dir / "isoflop.png"), plot_optima(result, out_dir / "optima.png"),
            plot_frontiers({"exact FLOPs": result}, out_dir / "frontier.png", by_convention=True)]


def plot_isoflop(result: dict, records: list[dict], path: Path) -> Path:
    """Loss vs N (all parameters) per budget, the fitted parabolas, the optima marked."""
    import numpy as np
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, p in enumerate(result["per_budget"]):
        pts = sorted((r["params"], r["val_loss"]) for r in records if r["budget"] == p["budget"])
        color = f"C{i}"
        ax.plot([q[0] for q in pts], [q[1] for q in pts], "o", color=color, label=f"C = {p['budget']:.3g} FLOPs")
        if p.get("parabola"):
            x = np.linspace(math.log10(pts[0][0]) - 0.1, math.log10(pts[-1][0]) + 0.1, 100)
            ax.plot(10 ** x, np.polyval(p["parabola"], x), "-", color=color, alpha=0.7)
        if p["in_range"]:
            ax.plot([p["n_opt"]], [p["loss_opt"]], "*", color=color, ms=14, mec="k")
    _axes(ax, "parameters N (all, tied head once)", "validation loss (nats/token)",
          "IsoFLOP curves (exact training FLOPs); stars: optima inside the ladders")
    return _save(fig, path)


def _axes(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
    """Log x axis, labels, grid, and a legend when something carries a label (nothing fitted: none)."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    from matplotlib.ticker import NullFormatter
    for ax in fig.axes:  # labelled minor ticks on a log axis under a decade wide overlap
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_optima(result: dict, path: Path) -> Path:
    """N_opt and D_opt against C for each convention, with the fitted power laws."""
    import numpy as np
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
    for i, (conv, f) in enumerate(result["by_convention"].items()):
        ok = [p for p in f["per_budget"] if p["in_range"]]
        if not ok:  # no optimum inside a ladder under this convention: nothing to draw
            continue
        c = np.array([p["compute"] for p in ok])
        for ax, key, exp, coef in ((axes[0], "n_opt", "a", "a_log10_coef"), (axes[1], "d_opt", "b", "b_log10_coef")):
            ax.plot(c, [p[key] for p in ok], "o", color=f"C{i}")
            if f[exp] is not None:
                ax.plot(c, 10 ** (f[coef] + f[exp] * np.log10(c)), "-", color=f"C{i}",
                        label=f"{NAMES[conv]}: {exp} = {f[exp]:.3f}")
    for ax, name in ((axes[0], "N_opt (parameters)"), (axes[1], "D_opt (tokens)")):
        ax.set_yscale("log")
        _axes(ax, "compute C (FLOPs, by convention)", name)
    fig.suptitle("Compute-optimal size and tokens, three FLOP conventions")
    return _save(fig, path)


def plot_frontiers(fits: dict[str, dict], path: Path, by_convention: bool = False) -> Path:
    """L_opt (circles, solid line) and the best measured run (crosses, dashed line) against C: one colour per
    recipe, or (by_convention) per FLOP convention."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    items = (list(next(iter(fits.values()))["by_convention"].items()) if by_convention
             else [(name, f) for name, f in fits.items()])
    for i, (name, f) in enumerate(items):
        label = NAMES.get(name, name) if by_convention else name
        _frontier_line(ax, f["per_budget"], "loss_opt", f["frontier"], f"C{i}", "o", "-", f"{label}: L_opt")
        _frontier_line(ax, f["per_budget"], "loss_best", f["frontier_measured"], f"C{i}", "x", "--",
                       f"{label}: best run")
    _axes(ax, "compute C (FLOPs)", "validation loss (nats/token)", "The line: compute-optimal loss vs compute")
    return _save(fig, path)


def _frontier_line(ax, per_budget, key, line, color, marker, style, label) -> None:
    import numpy as np
    pts = [(p["compute"], p[key]) for p in per_budget if key == "loss_best" or p["in_range"]]
    if not pts:
        return
    c = np.array([q[0] for q in pts])
    ax.plot(c, [q[1] for q in pts], marker, color=color, ls="none")
    if line["slope"] is not None:
        x = np.linspace(np.log10(c.min()) - 0.1, np.log10(c.max()) + 0.1, 50)
        ax.plot(10 ** x, line["intercept"] + line["slope"] * x, style, color=color,
                label=f"{label}: {line['slope']:.4f}·log10 C + {line['intercept']:.3f}")


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
        raise ValueError("--fit takes a results file only (with --json, --out)")
    path = Path(args.fit)
    fit_and_write(read_results(path), Path(args.out) if args.out else path.parent, args.json)
    return 0


def do_compare(args, overrides, budgets, sizes) -> int:
    """Sweep both recipes at the same budgets; each line, and the compute multiplier at A's losses."""
    from model.flops.scaling import fit
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
        print(f"{tag.upper()} {name}: loss = {_num(f['slope'], '.4f')} · log10 C + {_num(f['intercept'], '.4f')}")
    for r in result["multiplier_at_a_budgets"]:
        print(f"to reach A's loss {r['loss']:.4f} (A at {r['budget']:.3g} FLOPs), A needs "
              f"{_num(r['multiplier'], '.2f')}x the compute B needs")
    print(f"wrote {out / 'compare.json'}, {png}")
    return 0


def compare_lines(fits: dict[str, dict], names: list[str], paths: list[str]) -> dict:
    """Both recipes' lines and the compute multiplier at A's loss at each budget. The line is the parabola
    frontier when every budget of both recipes has its vertex inside the ladder, else the best-run line."""
    from model.flops.scaling import compute_multiplier
    inside = all(p["in_range"] for n in names for p in fits[n]["per_budget"])
    kind, key = ("frontier", "loss_opt") if inside else ("frontier_measured", "loss_best")
    fa, fb = fits[names[0]][kind], fits[names[1]][kind]
    rows = [{"loss": p[key], "budget": p["budget"], "multiplier": compute_multiplier(fa, fb, p[key])}
            for p in fits[names[0]]["per_budget"]]
    return {"line": kind, "a": {"config": paths[0], "frontier": fa, "fit": fits[names[0]]},
            "b": {"config": paths[1], "frontier": fb, "fit": fits[names[1]]}, "multiplier_at_a_budgets": rows}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    set_wait_policy()  # before torch loads: OpenMP reads its wait policy once (model/training/threads.py)
    try:
        args, overrides = parse_args(argv)
        if args.fit:
            return do_fit(args, overrides)
        preset = PRESETS[args.preset or "default"]
        budgets = parse_budgets(args.budgets) if args.budgets else list(preset["budgets"])
        from model.flops.scaling import check_budgets
        check_budgets(budgets)  # before the dataset is looked for (or prepared)
        sizes = args.sizes if args.sizes is not None else preset["sizes"]
        if args.compare:
            if args.config:
                raise ValueError("--compare takes its two recipes instead of a base config")
            return do_compare(args, overrides, budgets, sizes)
        return do_sweep(args, overrides, budgets, sizes)
    except (ValueError, FileNotFoundError) as e:
        print(f"scaling.py: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"scaling.py: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("scaling.py: interrupted; finished runs are recorded, interrupted ones saved: rerun the same "
              "command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
