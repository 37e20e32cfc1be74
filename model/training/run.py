"""The state the steps of one training run share (train.py's setup, loop, evaluation, checkpoints and
teardown), and the helpers that read it: the MFU/MBU of a step against the run's peaks, the CPU peak's
recalibration, and the last good checkpoint a stopped run names."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from ..config import GPTConfig, TrainConfig
from ..flops import peaks
from ..gpt.gpt import GPT
from .data import Batches
from .distributed import Distributed

RECALIBRATE_S = 30.0  # CPU peak: the least time between calibrations at evaluations


@dataclass
class Run:
    """What the steps of one training run share; the fields after `meta` are filled in by setup()."""

    model_cfg: GPTConfig
    cfg: TrainConfig
    dist: Distributed
    device: torch.device
    dtype: str
    meta: dict
    autocast: Any = None
    raw_model: GPT | None = None
    model: Any = None  # what a training step calls: raw_model, compiled and/or wrapped in DDP
    eval_model: Any = None  # never the DDP wrapper: evaluation needs no gradient sync
    optimizer: Any = None
    train_batches: Batches | None = None
    eval_loaders: dict[str, Batches] = field(default_factory=dict)
    step: int = 0
    best_val: float = float("inf")
    resumed_at: int = -1  # the step resumed from when its evaluation is in the checkpoint already
    saved_step: int | None = None  # the step of the last.pt on disk: the last good checkpoint
    replaced: list[str] = field(default_factory=list)  # the old run's files, set aside until the first save
    stop_flag: dict = field(default_factory=dict)  # {"signal": name} once SIGINT/SIGTERM arrived
    peak: Any = None  # a peaks.Peak for all ranks together: value, source, raised by any faster reading
    calibrated_at: float = 0.0
    bandwidth: Any = None  # a peaks.Peak in B/s for MBU, all ranks together (None: an unknown GPU's)
    bytes_per_step: int = 0  # minimum bytes of one optimizer step, all ranks together (model/flops/bytes.py)
    metrics: TextIO | None = None
    bar: Any = None
    last_losses: dict[str, float] = field(default_factory=dict)
    step_times: list[float] = field(default_factory=list)
    threads: Any = None  # a ThreadGovernor while the CPU thread count follows the load (training/threads.py)
    tokens_per_step: int = 0
    flops_per_step: int = 0  # exact training FLOPs of one optimizer step, all ranks together
    start_step: int = 0
    started: float = 0.0

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def local_accum(self) -> int:
        return self.cfg.grad_accum // self.dist.world

    @property
    def my_micro(self) -> range:
        """The global indices of the micro-batches this rank computes."""
        return range(self.dist.rank * self.local_accum, (self.dist.rank + 1) * self.local_accum)

    @property
    def peak_total(self) -> float:
        return self.peak.flops


def last_good(run: Run) -> str:
    """The last.pt this run saved or resumed from (saves refuse non-finite states, so it is finite)."""
    return f"{run.last_path} (step {run.saved_step})" if run.saved_step is not None else "none"


def progress_mfu(run: Run, seconds: float, bandwidth: bool = False) -> float | None:
    """MFU of a step that took `seconds`, against the peak of all ranks (the progress line and step records):
    never above 1, since a faster step raises the peak, and rank 0 says so. bandwidth=True: MBU, the minimum
    bytes against the bandwidth peak (None where the GPU's bandwidth is unknown)."""
    peak = run.bandwidth if bandwidth else run.peak
    if peak is None:
        return None
    mfu = peak.mfu((run.bytes_per_step if bandwidth else run.flops_per_step) / seconds)
    while peak.messages:
        message = peak.messages.pop(0)
        if run.dist.master:
            (run.bar.write if run.bar is not None else print)(message, file=sys.stderr)
    return mfu


def recalibrate_peak(run: Run) -> None:
    """On a CPU without a given peak: measure it again, at most every RECALIBRATE_S, and keep the highest
    reading; one busy moment at start-up would otherwise read it low for the whole run (MFU over 100%)."""
    if run.device.type == "cpu" and not run.cfg.peak_flops and \
            time.perf_counter() - run.calibrated_at >= RECALIBRATE_S:
        run.peak.raise_to(peaks.measure_cpu_peak() * run.dist.world)  # a faster reading proves the peak low
        run.calibrated_at = time.perf_counter()
