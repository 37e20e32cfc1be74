"""Running a scaling sweep (scaling.py): train.py processes, N at a time with the CPU threads divided among
them, and OUT/results.jsonl, one record per finished run with its loss over the whole validation split. The
state of each point is read from disk, so a rerun skips recorded runs, resumes interrupted ones and records
runs finished elsewhere."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import ROOT, fmt
from ..flops.scaling import POINT_KEYS
from .checkpoint import load_checkpoint
from .data import open_split
from .evaluate import split_loss
from .threads import child_env, describe, set_threads


@dataclass
class Sweep:
    """One recipe's plan: every point (scaling.py's make_sweep) with its train.py arguments, and its folder."""

    config: str  # base TOML path as given
    overrides: list[str]  # --key=value for train.py, as given
    out: Path
    model: object  # GPTConfig of the recipe (vocab_size from the dataset)
    train: object  # TrainConfig of the recipe
    points: list[dict] = field(default_factory=list)


def command(p: dict, resume: bool) -> list[str]:
    """The train.py process of one point (resumed from its checkpoint when interrupted)."""
    return [sys.executable, str(ROOT / "train.py"), *p["args"], *(["--resume"] if resume else [])]


def public(p: dict) -> dict:
    """A point's planned figures: what a record repeats and a rerun checks."""
    return {k: p[k] for k in POINT_KEYS}


# ----------------------------------------------------------------------------------------------------
# State of each point on disk: recorded, finished elsewhere (checkpoint at its last step), interrupted, new

def read_results(path: Path) -> list[dict]:
    """The records of a results.jsonl; ValueError naming the line that is not a JSON object."""
    from ..flops.fit_report import read_jsonl
    return [rec for _, rec in read_jsonl(path)]


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
    ckpt = load_checkpoint(last)
    planned = {"n_layer": p["n_layer"], "n_embd": p["n_embd"], "max_iters": p["steps"]}
    model_cfg, train_cfg = ckpt.get("model_config") or {}, ckpt.get("train_config") or {}
    found = {"n_layer": model_cfg.get("n_layer"), "n_embd": model_cfg.get("n_embd"),
             "max_iters": train_cfg.get("max_iters")}
    if found != planned:
        raise ValueError(f"{last}: a run of another plan ({found}, planned {planned}); use another --out")
    return "finished" if int(ckpt.get("step", -1)) == p["steps"] else "interrupted"


def record(sweep: Sweep, p: dict, wall_s: float | None, cpu_s: float | None = None) -> dict:
    """Evaluate a finished run and append its record to OUT/results.jsonl (one write, flushed to disk)."""
    ckpt = sweep.out / "points" / p["id"] / "last.pt"
    rec = {"id": p["id"], **public(p), "val_loss": split_loss(ckpt, sweep.train.dataset),
           "val_tokens": _val_tokens(sweep, p), "wall_s": wall_s, "cpu_s": cpu_s, "args": p["args"]}
    with (sweep.out / "results.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(rec, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return rec


def _val_tokens(sweep: Sweep, p: dict) -> int:
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
        wall = (f"{rec['wall_s']:.0f} s, CPU {fmt(rec.get('cpu_s'), '.0f')} s" if rec.get("wall_s") is not None
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
                                        stderr=subprocess.STDOUT, env=child_env(threads))
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
