"""A sweep's results.jsonl (scaling.py), read and appended safely.

results.jsonl holds one JSON record per finished run, unique by its point id. A last line cut short (a crash
while appending it) is dropped with a note, and repaired on the next sweep's start; a record of an id seen
before is dropped with a note on read and never written. One sweep per folder: the caller holds the folder's
OutDirLock (model/training/lock.py) while it writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import atomic_write


def read_results(path: str | Path) -> tuple[list[dict], list[str]]:
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
    if path.is_file() and any(r["id"] == rec["id"] for r in read_results(path)[0]):
        raise ValueError(f"{path}: run {rec['id']} is recorded already")
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, f"could not write results file {path}: {e.strerror}") from None
