"""Train a GPT: `python train.py [CONFIG.toml] [--key=value ...]`.

With no arguments: prepare the embedded default corpus if needed, train the small char-level model of
configs/default.toml on the CPU, write checkpoints, metrics.jsonl and loss.png to out/default.
Data parallel: `torchrun --nproc_per_node=N train.py ...` (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import signal

if __name__ == "__main__":  # until its handlers are installed (after imports), Ctrl-C ends it quietly
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import math  # noqa: E402
import sys
import time
from contextlib import nullcontext

from model.training.threads import cpu_threads, describe as describe_threads, governor, set_wait_policy

set_wait_policy()  # before torch loads: OpenMP reads its wait policy once (model/training/threads.py)

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model.cli import duration, human, pop_debug, report_errors, resolve_device
from model.config import to_dict
from model.flops import peaks
from model.flops.bytes import train_minimum_bytes
from model.flops.formulas import train_step_flops
from model.flops.planner import plan_run
from model.gpt.gpt import GPT
from model.gpt.speed import use_cpu_kernels
from model.training.checkpoint import NonFiniteStateError, rng_state, save_checkpoint, set_rng_state
from model.training.data import Batches, load_meta
from model.training.distributed import Distributed
from model.training.evaluate import evaluate
from model.training.lock import OutDirLock
from model.training.memory import check_fits, training_bytes
from model.training.metrics import plot_losses, trim_metrics, write_record
from model.training.outputs import discard_replaced, recover, restore_replaced, set_aside
from model.training.optim import adamw, clip_and_step, lr_at
from model.training.recipe import keys_help, load_recipe, split_argv
from model.training.resume import (check_unfinished, checkpoint_state, open_resume_checkpoint, restore,
                                   resume_changes)
from model.training.run import Run, last_good, progress_mfu, recalibrate_peak
from model.training.runtime import cpu_process_settings, describe_matmul_precision, matmul_precision, resolve_dtype
from model.training.signals import TrainingStopped, exit_code, install_signal_handlers, stop_before_training

USAGE = ("usage: python train.py [CONFIG.toml] [--key=value ...] [--debug]   (python train.py --help lists the keys;"
         " --debug shows tracebacks instead of one-line errors)")


# ----------------------------------------------------------------------------------------------------
# One run: setup (devices, checks, model, data), resume, the loop (one step at a time), evaluation and
# checkpoints, teardown. The state they share is a Run (model/training/run.py).

def train(model_cfg, cfg, *, stop_flag: dict | None = None) -> dict:
    """Run training; returns a summary dict. Raises ValueError/FileNotFoundError for bad setups and
    TrainingStopped when a signal or a non-finite loss ends it early (after saving what can be saved).

    Float32 matmuls run at cfg.matmul_precision for the run (on CUDA: those left outside autocast). torch keeps
    that setting process-wide, so it is put back afterwards for callers in the same process; so is the CPU
    thread count (cfg.threads; model/training/threads.py). Rank 0 holds out_dir/.lock for the whole run: a
    second run on the same out_dir is refused (model/training/lock.py).
    """
    lock = OutDirLock(cfg.out_dir) if Distributed().master else nullcontext()
    with lock, matmul_precision(cfg.matmul_precision, resolve_device(cfg.device).type), \
            cpu_threads(cfg.threads):
        for note in (getattr(lock, "note", ""), Distributed().master and recover(cfg.out_dir)):
            if note:
                print(f"note: {note}", file=sys.stderr)
        return _train(model_cfg, cfg, stop_flag=stop_flag)


def _train(model_cfg, cfg, *, stop_flag: dict | None = None) -> dict:
    stop_flag = stop_flag if stop_flag is not None else {}
    run = setup(model_cfg, cfg, stop_flag)
    try:
        start_outputs(run)
        try:
            loop(run, stop_flag)
        finally:
            teardown(run)
    finally:
        if run.replaced:  # --overwrite, and this run ended before its first last.pt: the old run comes back
            restore_replaced(run.out_dir)
    return summarize(run)


# ---- setup and resume

def setup(model_cfg, cfg, stop_flag: dict) -> Run:
    """Devices and processes, the checks that need the dataset, its batches, the memory the config needs,
    then model and optimizer; resumed from out_dir/last.pt when cfg.resume. A signal meanwhile stops the run
    between these stages, before training, with nothing to save."""
    dist = Distributed()
    device = dist.setup(resolve_device(cfg.device))
    if cfg.grad_accum % dist.world:
        raise ValueError(f"grad_accum={cfg.grad_accum} must be divisible by the number of processes ({dist.world})")
    meta = load_meta(cfg.dataset)
    if model_cfg.vocab_size < meta["vocab_size"]:
        raise ValueError(f"vocab_size={model_cfg.vocab_size} is smaller than the dataset's {meta['vocab_size']} "
                         f"({cfg.dataset}/meta.json)")
    run = Run(model_cfg, cfg, dist, device, resolve_dtype(cfg.dtype, device), meta, stop_flag=stop_flag)
    open_batches(run)  # the dataset's own errors first
    check_fits(training_bytes(model_cfg, cfg.batch_size, 2 if run.dtype == "bfloat16" else 4),
               f"training (batch_size={cfg.batch_size}, block_size={model_cfg.block_size})", device)
    T = model_cfg.block_size
    run.tokens_per_step = cfg.batch_size * T * cfg.grad_accum
    run.flops_per_step = train_step_flops(model_cfg, cfg.batch_size, T) * cfg.grad_accum
    run.bytes_per_step = dist.world * train_minimum_bytes(model_cfg, cfg.batch_size, T, "float32",
                                                          cfg.grad_accum // dist.world)["total"]
    ckpt = open_resume_checkpoint(run.cfg, to_dict(model_cfg), meta)
    if ckpt is not None:
        run.cfg, notes = resume_changes(ckpt.get("train_config", {}), run.cfg, int(ckpt["step"]))
        if dist.master and notes:
            print("\n".join(notes), file=sys.stderr)
        check_unfinished(ckpt, run.cfg)
    stop_before_training(stop_flag)
    build_model(run)
    stop_before_training(stop_flag)
    if ckpt is not None:
        restore(run, ckpt)
    run.peak = peaks.device_peak(device, cfg.peak_flops).scaled(dist.world)
    run.calibrated_at = time.perf_counter()
    run.bandwidth = peaks.step_bandwidth(device, dist.world)
    run.threads = governor() if device.type == "cpu" else None  # None when the count is pinned
    return run


def open_batches(run: Run) -> None:
    """The train and eval batches, from the dataset checked against its meta.json (data.open_split)."""
    cfg, T = run.cfg, run.model_cfg.block_size
    # every rank draws every micro-batch's offsets and gathers only its own: N ranks x accum/N see the same
    # data as one process with the full accumulation
    run.train_batches = Batches(cfg.dataset, "train", T, cfg.batch_size, seed=cfg.seed, device=run.device)
    run.eval_loaders = {split: Batches(cfg.dataset, split, T, cfg.batch_size, seed=cfg.seed + 1, device=run.device)
                        for split in ("train", "val")}


def build_model(run: Run) -> None:
    """Seeded model (compiled, DDP-wrapped as configured) and its optimizer."""
    cfg, device = run.cfg, run.device
    torch.manual_seed(cfg.seed)
    if device.type == "cpu":
        cpu_process_settings()  # keep freed activations for reuse (glibc); see model/training/runtime.py
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = True
    run.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if run.dtype == "bfloat16"
                    else nullcontext())
    precision = torch.get_float32_matmul_precision()  # set by train() for this run
    kernels = use_cpu_kernels(device.type, run.model_cfg.dropout, precision, cfg.compile)  # model/gpt/speed.py
    run.raw_model = GPT(run.model_cfg, cpu_kernels=kernels).to(device)
    run.eval_model = torch.compile(run.raw_model) if cfg.compile else run.raw_model
    run.model = run.eval_model
    if run.dist.enabled:
        run.model = DDP(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    run.optimizer = adamw(run.raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type)


def start_outputs(run: Run) -> None:
    """The model and plan lines, out_dir and metrics.jsonl (trimmed on resume; new otherwise, with --overwrite
    the old run's files moved aside, model/training/outputs.py), the bar."""
    dist = run.dist
    # the plan checks the peak: every argument is checked before an output is touched
    plan = plan_run(run.model_cfg, max(1, run.cfg.max_iters - run.step) * run.tokens_per_step,
                    run.model_cfg.block_size, run.peak_total)
    if dist.master:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        if run.saved_step is not None:  # resumed
            note = trim_metrics(run.metrics_path, run.step)  # every record checked first
            if note:
                print(f"note: {note}", file=sys.stderr)
        else:
            run.replaced = set_aside(run.out_dir) if run.cfg.overwrite else []  # deleted after the first save
            run.metrics_path.write_text("")
        announce(run, plan)
        run.metrics = run.metrics_path.open("a", buffering=1)  # line-buffered: a hard exit loses no record
    run.bar = tqdm(total=run.cfg.max_iters, initial=run.step, disable=not (dist.master and run.cfg.progress),
                   dynamic_ncols=True, file=sys.stderr)
    run.start_step, run.started = run.step, time.perf_counter()
    run.model.train()


def announce(run: Run, plan: dict) -> None:
    """The model line and, when steps remain, the plan line: exact compute and estimated time."""
    m, precision = run.raw_model, torch.get_float32_matmul_precision()  # set by train() for this run
    print(f"model: {m.num_params():,} parameters ({m.num_params(True):,} non-embedding); {run.dist.world} "
          f"process(es) on {run.device}, {run.dtype}; {describe_matmul_precision(precision, run.device.type)}; "
          f"{describe_threads()}", file=sys.stderr)
    remaining = run.cfg.max_iters - run.step
    if remaining > 0:
        print(f"plan: {remaining} steps x {run.tokens_per_step:,} tokens = {plan['tokens']:,} tokens; exact "
              f"training compute {plan['flops']:.4g} FLOPs ({plan['scale']}; 6ND would say "
              f"{plan['flops_6nd']:.4g}); estimated {duration(plan['seconds'])} at {plan['mfu']:.0%} MFU of "
              f"{human(run.peak_total, 'FLOP/s')} ({run.peak.source})", file=sys.stderr)


# ---- the loop

def loop(run: Run, stop_flag: dict) -> None:
    """Evaluate (and checkpoint) every eval_interval steps and at the end; a step between evaluations."""
    cfg = run.cfg
    while True:
        last_step = run.step == cfg.max_iters
        if due_for_eval(run) and run.step != run.resumed_at:
            evaluate_and_checkpoint(run)
        if last_step:
            return
        record = train_step(run)
        check_finite(run, record["loss"])
        write_record(run.metrics, record)
        if run.dist.master:
            run.bar.set_postfix_str(f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                                    f"{record['tokens_per_s']:,.0f} tok/s mfu {record['mfu']:.1%}", refresh=False)
            run.bar.update(1)
        if run.threads:
            follow_load(run)
        check_stop(run, stop_flag)


def follow_load(run: Run) -> None:
    """A new CPU thread count when other programs' load has moved (model/training/threads.py), said in one
    line; the peaks behind MFU and MBU then count the cores in use."""
    line = run.threads.check()
    if line:
        run.peak = peaks.device_peak(run.device, run.cfg.peak_flops).scaled(run.dist.world)
        run.bandwidth = peaks.step_bandwidth(run.device, run.dist.world)
        if run.dist.master:
            run.bar.write(f"step {run.step}: {line}", file=sys.stderr)


def due_for_eval(run: Run) -> bool:
    return run.step % run.cfg.eval_interval == 0 or run.step == run.cfg.max_iters


def train_step(run: Run) -> dict:
    """One optimizer step over grad_accum micro-batches (this rank's share of them); returns its record."""
    cfg, dist = run.cfg, run.dist
    t0 = time.perf_counter()
    lr = lr_at(run.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=run.device)
    my_micro = run.my_micro
    start = (run.train_batches.state_dict(), rng_state()) if run.local_accum > 1 else None  # see abandon_step
    for micro in range(cfg.grad_accum):
        if micro not in my_micro:
            run.train_batches.skip()
            continue
        if micro != my_micro[0] and run.dist.any(bool(run.stop_flag.get("signal")), run.device):
            abandon_step(run, start)  # every rank asks at the same local micro-batch
        x, y = run.train_batches.next()
        sync = nullcontext() if (micro == my_micro[-1] or not dist.enabled) else run.model.no_sync()
        with sync:
            with run.autocast:
                _, loss = run.model(x, y)
            (loss / run.local_accum).backward()
        loss_sum += loss.detach()
    # the norm stays a tensor until after the step: an .item() here would make the host wait for the
    # GPU before it can queue the optimizer kernels
    grad_norm = clip_and_step(run.optimizer, cfg.grad_clip)  # clipping rides in the fused AdamW kernel
    run.optimizer.zero_grad(set_to_none=True)
    grad_norm = grad_norm.item() if grad_norm is not None else float("nan")
    loss_value = dist.mean(loss_sum.item() / run.local_accum, run.device)
    dt = time.perf_counter() - t0
    run.step += 1
    run.step_times.append(dt)
    return {"step": run.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "dt_ms": dt * 1e3,
            "tokens_per_s": run.tokens_per_step / dt, "mfu": progress_mfu(run, dt), "flops": run.flops_per_step,
            "flops_per_s": run.flops_per_step / dt,  # MFU against any other peak: flops_per_s / that peak
            "bytes_per_s": run.bytes_per_step / dt, "mbu": progress_mfu(run, dt, bandwidth=True)}


def abandon_step(run: Run, start: tuple) -> None:
    """A signal between micro-batches: drop the partial step (its gradients; the sampler and RNG go back to
    where the step began), save the last completed step and stop, so a long accumulation stops promptly and
    the resume replays the whole step, bit-exact."""
    run.optimizer.zero_grad(set_to_none=True)
    run.train_batches.load_state_dict(start[0])
    set_rng_state(start[1])
    name = run.stop_flag.get("signal", "SIGTERM")
    save_checkpoints(run)  # this step's evaluation, when due, ran before the step began
    raise TrainingStopped(f"{name} received: stopped after step {run.step}, dropping the part of step "
                          f"{run.step + 1} done; checkpoint saved to {run.last_path} (resume with --resume)",
                          exit_code(name))


def check_finite(run: Run, loss: float) -> None:
    """A non-finite loss ends the run (exit code 1), naming the last good checkpoint."""
    if not math.isfinite(loss):
        raise TrainingStopped(f"loss is {loss} at step {run.step}; stopping. Last good checkpoint: "
                              f"{last_good(run)}", 1)


def check_stop(run: Run, stop_flag: dict) -> None:
    """After a signal (see install_signal_handlers): save last.pt and stop, every rank at the same step."""
    if run.dist.any(bool(stop_flag.get("signal")), run.device):
        name = stop_flag.get("signal", "SIGTERM")
        save_checkpoints(run, evaluated=not due_for_eval(run))  # a due evaluation runs on resume
        raise TrainingStopped(f"{name} received: stopped after step {run.step}; checkpoint saved to "
                              f"{run.last_path} (resume with --resume)", exit_code(name))


# ---- evaluation and checkpoints

def evaluate_and_checkpoint(run: Run) -> None:
    """Evaluate both splits, record and print the losses, save last.pt (and best.pt on a new best val loss),
    then give the CPU peak another reading. A signal during it abandons it: last.pt is saved as not yet
    evaluated, and --resume runs this evaluation first."""
    stop = lambda: run.dist.any(bool(run.stop_flag.get("signal")), run.device)  # noqa: E731
    losses = evaluate(run.eval_model, run.eval_loaders, run.cfg.eval_iters, run.autocast, run.dist, run.device,
                      stop)
    if losses is None:
        name = run.stop_flag.get("signal", "SIGTERM")
        save_checkpoints(run, evaluated=False)
        raise TrainingStopped(f"{name} received during the evaluation of step {run.step}: stopped; checkpoint "
                              f"saved to {run.last_path}, the evaluation runs again on --resume", exit_code(name))
    run.last_losses = losses
    if run.dist.master:
        write_record(run.metrics, {"kind": "eval", "step": run.step, "train_loss": losses["train"],
                           "val_loss": losses["val"]}, flush=True)
        run.bar.write(f"step {run.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}",
                      file=sys.stderr)  # stdout stays clean
        save_checkpoints(run, new_best=losses["val"] < run.best_val)
    recalibrate_peak(run)


def save_checkpoints(run: Run, new_best: bool = False, evaluated: bool = True) -> None:
    """Rank 0 saves last.pt; with new_best, the val loss just evaluated becomes the best and best.pt too.
    Weights or moments gone non-finite are never saved: the run stops (exit code 1) naming the last good
    checkpoint."""
    if not run.dist.master:
        return
    try:
        if new_best:
            run.best_val = run.last_losses["val"]
            save_checkpoint(checkpoint_state(run, evaluated), run.best_path)
        save_checkpoint(checkpoint_state(run, evaluated), run.last_path)
    except NonFiniteStateError as e:
        raise TrainingStopped(f"{e}; stopping. Last good checkpoint: {last_good(run)}", 1) from None
    run.saved_step = run.step
    if run.replaced:  # the new run has its last.pt: the run it replaces can go
        discard_replaced(run.out_dir)
        run.replaced = []


# ---- teardown

def teardown(run: Run) -> None:
    """Close the bar and metrics.jsonl, plot loss.png, and leave the process group (after the DDP wrapper)."""
    run.bar.close()
    if run.metrics is not None:
        run.metrics.close()
        if run.metrics_path.stat().st_size:
            plot_losses(run.metrics_path, run.out_dir / "loss.png")
    run.model = None  # the DDP wrapper must be gone before the process group is: see Distributed.teardown
    run.dist.teardown()


def summarize(run: Run) -> dict:
    """The summary train() returns; rank 0 prints it as the done line."""
    done, elapsed = run.step - run.start_step, time.perf_counter() - run.started
    timed = sorted(run.step_times[1:] or run.step_times)  # the first step pays for allocation/compilation
    median_dt = timed[len(timed) // 2] if timed else float("nan")
    summary = {"step": run.step, "train_loss": run.last_losses.get("train"),
               "val_loss": run.last_losses.get("val"), "best_val_loss": run.best_val,
               "tokens": done * run.tokens_per_step, "flops": done * run.flops_per_step, "seconds": elapsed,
               "median_step_s": median_dt,
               "tokens_per_s": run.tokens_per_step / median_dt if timed else float("nan"),
               "mfu": progress_mfu(run, median_dt) if timed else float("nan"), "peak_flops": run.peak_total,
               "mbu": progress_mfu(run, median_dt, bandwidth=True) if timed else float("nan"),
               "out_dir": str(run.out_dir)}
    if run.dist.master:
        print(f"done: {done} steps, {summary['tokens']:,} tokens, {summary['flops']:.4g} FLOPs achieved in "
              f"{duration(elapsed)} (median {median_dt * 1e3:.1f} ms/step, {summary['tokens_per_s']:,.0f} tok/s, "
              f"MFU {summary['mfu']:.1%} of {human(run.peak_total, 'FLOP/s')}, {run.peak.source}; "
              f"{peaks.mbu_text(summary['mbu'], run.bandwidth)}); best val loss "
              f"{run.best_val:.4f}; "
              f"checkpoints in {run.out_dir}", file=sys.stderr)
    return summary


# ----------------------------------------------------------------------------------------------------
# The command line

def print_help(argv: list[str]) -> None:
    """The keys with the values the same command without --help would use, and what each one means."""
    print(__doc__.strip() + "\n\n" + USAGE + "\n")
    print(keys_help(*split_argv([a for a in argv if a not in ("-h", "--help")])))


def run_cli(argv: list[str]) -> int:
    stop_flag: dict = {}
    with install_signal_handlers(stop_flag):  # before the dataset is prepared or anything is built
        try:
            model_cfg, train_cfg = load_recipe(*split_argv(argv))
            stop_before_training(stop_flag)
            train(model_cfg, train_cfg, stop_flag=stop_flag)
        except TrainingStopped as e:
            print(f"train.py: {e}", file=sys.stderr)
            return e.code
    return 0


def main(argv: list[str] | None = None) -> int:
    argv, debug = pop_debug(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        return report_errors("train.py", lambda: print_help(argv) or 0, debug=debug)
    return report_errors("train.py", lambda: run_cli(argv), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
