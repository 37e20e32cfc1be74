"""Running a scaling sweep (scaling.py): train.py processes, N at a time with the CPU threads divided among
them, and OUT/results.jsonl, one record per finished run with its loss over the whole validation split. The
state of each point is read from disk, so a rerun skips recorded runs, resumes interrupted ones and records
runs finished elsewhere.

Safe as a run: one sweep per folder (its OutDirLock, held for the whole sweep); records unique by point id
when written and when read (a second record of an id is dropped with a note, a torn last line too, and the
file rewritten without them before the next append); each train.py child stops (SIGTERM: it saves and exits)
when the sweep dies, even by SIGKILL, so no orphan keeps a point's lock; a point whose previous train.py is
still saving is waited for."""
from __future__ import annotations

import ctypes
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
from .checkpoint import atomic_write, load_checkpoint
from .data import open_split
from .evaluate import split_loss
from .lock import OutDirLock

LOCK_WAIT_S = 120.0  # how long a point's previous train.py may take to save and exit
from .threads import child_env, describe_children, set_threads


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
    """The records of a results.jsonl, the first of each id; a torn last line or a second record of an id is
    dropped with a note on stderr (see _read_results)."""
    records, notes = _read_results(path)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return records


def _read_results(path: str | Path) -> tuple[list[dict], list[str]]:
    """(records, notes): the JSON objects of a results.jsonl, the first of each id kept. A last line that is
    not JSON is torn (dropped, with a note); any other bad line is a ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records, notes, seen = [], [], {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            if i == len(lines):
                notes.append(f"{path}:{i}: dropped a torn last line (a crash while writing it)")
                break
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            raise ValueError(f"{path}:{i}: expected a JSON object with a string 'id'")
        if rec["id"] in seen:
            notes.append(f"{path}:{i}: dropped a second record of run {rec['id']} (first on line {seen[rec['id']]})")
            continue
        seen[rec["id"]] = i
        records.append(rec)
    return records, notes


def repair_results(path: str | Path, records: list[dict]) -> None:
    """Rewrite results.jsonl as exactly `records` (atomically), so that appends follow a whole line."""
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode()), "results file")


def append_result(path: str | Path, rec: dict) -> None:
    """Append one record (one write, fsynced); a second record of the same id is a ValueError."""
    path = Path(path)
    if path.is_file() and any(r["id"] == rec["id"] for r in _read_results(path)[0]):
        raise ValueError(f"{path}: run {rec['id']} is recorded already")
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, f"could not write results file {path}: {e.strerror}") from None


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
    """Evaluate a finished run and append its record to OUT/results.jsonl (one write, fsynced, its id new)."""
    ckpt = sweep.out / "points" / p["id"] / "last.pt"
    rec = {"id": p["id"], **public(p), "val_loss": split_loss(ckpt, sweep.train.dataset),
           "val_tokens": _val_tokens(sweep, p), "wall_s": wall_s, "cpu_s": cpu_s, "args": p["args"]}
    append_result(sweep.out / "results.jsonl", rec)
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
    with OutDirLock(sweep.out, what="sweep") as lock:  # one sweep per folder: records unique, one child per point
        if lock.note:
            print(f"note: {lock.note}", file=sys.stderr)
        return _run_sweep(sweep, jobs, train_new)


def _run_sweep(sweep: Sweep, jobs: int, train_new: bool) -> list[dict]:
    results = sweep.out / "results.jsonl"
    found, notes = _read_results(results) if results.exists() else ([], [])
    if notes:  # a torn last line, a second record of a run: rewritten without them before appending
        print("\n".join(f"note: {n}" for n in notes), file=sys.stderr)
        repair_results(results, found)
    records = {r["id"]: r for r in found}
    states = {p["id"]: point_state(p, sweep.out, records) for p in sweep.points}
    free = set_threads(0)  # one per CPU less those other programs keep busy (model/training/threads.py)
    threads = set_threads(max(1, free // jobs))
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
        print(f"training {len(todo)} run(s), {jobs} at a time, {describe_children(threads, free)} each; "
              f"logs in {sweep.out / 'points'}/<run>/train.log", file=sys.stderr)
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
                # a train.py of a sweep killed just before may still be saving this point: let it finish
                OutDirLock(run_dir).acquire(wait_s=LOCK_WAIT_S).release()
                log = (run_dir / "train.log").open("a")
                proc = start_child(command(p, states[p["id"]] == "interrupted"), log, child_env(threads))
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


PR_SET_PDEATHSIG = 1


def _stop_with_parent(parent: int) -> None:
    """In the child, before exec: the kernel sends SIGTERM when the parent dies (Linux), so train.py saves
    and exits instead of running on as an orphan that holds its out_dir's lock."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(143)


def start_child(cmd: list[str], log, env: dict) -> subprocess.Popen:
    """Popen(cmd) with stdout and stderr to `log`, stopped (SIGTERM) when this process dies, even by
    SIGKILL."""
    parent = os.getpid()
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=lambda: _stop_with_parent(parent))
