"""A run's outputs in its out_dir, never discarded before the run that replaces them has saved.

A folder holding any run artefact (last.pt, best.pt, metrics.jsonl) is a run: starting there needs --resume
(continue it) or --overwrite (replace it). --overwrite moves the old run's files into out_dir/.replaced/,
last.pt first, and deletes them only once the new run's first last.pt is saved (discard_replaced). Until
then the old run is whole on disk. A new run that fails before its first save puts the old one back
(restore_replaced); one killed meanwhile leaves .replaced/, and the next start in that folder settles it
(recover): with a last.pt in out_dir the new run had saved, so .replaced/ goes; without, the old files come
back. Call these under the out_dir lock (model/training/lock.py): no other run moves files meanwhile.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .checkpoint import atomic_write

ARTEFACTS = ("last.pt", "best.pt", "metrics.jsonl")  # any of them makes a folder a run
REPLACED_FILES = ("last.pt", "best.pt", "metrics.jsonl", "loss.png")  # last.pt first: see recover
REPLACED = ".replaced"
MANIFEST = "names"


def check_artefacts(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """ValueError when out_dir holds a run and neither resume nor overwrite says what to do with it."""
    out = Path(out_dir)
    found = [name for name in ARTEFACTS if (out / name).exists()]
    if found and not resume and not overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it or "
                         f"--overwrite to replace it")


def recover(out_dir: str | Path) -> str:
    """Settle a .replaced/ that a run killed before its first save (or before cleaning up) left behind;
    returns a note saying what was done, "" when there was nothing to do."""
    out = Path(out_dir)
    old = out / REPLACED
    if not old.is_dir():
        return ""
    names = _manifest(old)
    if (out / "last.pt").exists() and ("last.pt" not in names or (old / "last.pt").exists()):
        discard_replaced(out)  # this last.pt is the new run's: it saved
        return f"removed {old}: the run that replaced it had saved {out / 'last.pt'}"
    restore_replaced(out)
    return f"{out}: put back the previous run's files from {old} (the run that was to replace them never saved)"


def set_aside(out_dir: str | Path) -> list[str]:
    """--overwrite: move the old run's files into out_dir/.replaced/ (last.pt first), after writing their
    names there (MANIFEST, atomically): what a restore must put back; returns the names."""
    out = Path(out_dir)
    names = [name for name in REPLACED_FILES if (out / name).is_file()]
    if not names:
        return []
    (out / REPLACED).mkdir(exist_ok=True)
    atomic_write(out / REPLACED / MANIFEST, lambda f: f.write("".join(n + "\n" for n in names).encode()),
                 "list of replaced files")
    for name in names:
        os.replace(out / name, out / REPLACED / name)
    _fsync_dir(out)
    return names


def restore_replaced(out_dir: str | Path) -> None:
    """Put the set-aside files back (over the new run's), delete the new run's others, remove .replaced/."""
    out = Path(out_dir)
    old = out / REPLACED
    names = _manifest(old)
    for name in REPLACED_FILES:
        if (old / name).is_file():
            os.replace(old / name, out / name)
        elif name not in names and (out / name).is_file():  # the new run's: the old run had none
            (out / name).unlink()
    _fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)


def _manifest(old: Path) -> list[str]:
    """The names set_aside listed; none when it was killed before the list was in place (nothing moved)."""
    try:
        return [n for n in (old / MANIFEST).read_text().split() if n in REPLACED_FILES]
    except FileNotFoundError:
        return []


def discard_replaced(out_dir: str | Path) -> None:
    """The new run has saved its first last.pt: the old run's files go."""
    shutil.rmtree(Path(out_dir) / REPLACED, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
