"""metrics.jsonl, the record of a run (one JSON object per optimizer step and per evaluation), and loss.png,
its picture. Rank 0 writes it; a resume trims it back to the checkpoint's step."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TextIO

from .checkpoint import atomic_write

TRIM_PAUSE_ENV = "FLOPGPT_TEST_TRIM_PAUSE_S"  # tests: seconds the metrics trim waits before its rename


def write_record(out: TextIO | None, record: dict, flush: bool = False) -> None:
    """One line of metrics.jsonl: a step record, or an evaluation's (kind "eval"); nothing when out is None
    (ranks other than 0)."""
    if out is not None:
        # strict JSON: a non-finite number (a NaN loss, the grad norm without clipping) is written as null
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        out.write(json.dumps(clean, allow_nan=False) + "\n")
        if flush:
            out.flush()


def read_metrics(path: Path) -> tuple[list[str], str]:
    """The lines of metrics.jsonl, each checked to be a JSON record with an integer step. A last line that
    is blank or cut short (a crash while writing it) is dropped, with a note; any other bad line is a
    ValueError naming the file and line."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last record
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError as e:
            if i == len(lines):
                return lines[:-1], f"{path}:{i}: dropped a torn last line (a crash while writing it)"
            raise ValueError(f"{path}:{i}: not a JSON record ({e})") from None
        step = rec.get("step") if isinstance(rec, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"{path}:{i}: not a metrics record (expected an object with an integer 'step')")
    return lines, ""


def trim_metrics(path: Path, step: int) -> str:
    """On resume: drop the records after `step`, which the resumed steps will write again. The file is
    replaced atomically (a kill at any moment leaves the old file or the trimmed one); returns a note."""
    if not path.exists():
        return ""
    lines, note = read_metrics(path)
    keep = "".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= step)
    atomic_write(path, lambda f: f.write(keep.encode()), "metrics file", pause_env=TRIM_PAUSE_ENV)
    return note


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """loss.png: per-step training loss (light), evaluated train and val losses (markers)."""
    from ..flops.plots import pyplot, save
    plt = pyplot()
    steps, losses, evals = [], [], []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval":
            evals.append(rec)
        else:
            steps.append(rec["step"])
            losses.append(float("nan") if rec["loss"] is None else rec["loss"])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=0.8, label="train (each step)")
    if evals:
        ax.plot([e["step"] for e in evals], [e["train_loss"] for e in evals], "o-", color="tab:blue",
                label="train (eval)")
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "s-", color="tab:orange",
                label="val (eval)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"{metrics_path.parent.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, png_path)
