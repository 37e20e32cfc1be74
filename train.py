"""Train a GPT: `python train.py [CONFIG.toml] [--key=value ...]`.

With no arguments: prepare the embedded default corpus if needed, train the small char-level model of
configs/default.toml on the CPU, write checkpoints, metrics.jsonl and loss.png to out/default.
Data parallel: `torchrun --nproc_per_node=N train.py ...` (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "default.toml"
RECALIBRATE_S = 30.0  # CPU peak: the least time between calibrations at evaluations
USAGE = "usage: python train.py [CONFIG.toml] [--key=value ...]   (python train.py --help lists the keys)"


class TrainingStopped(Exception):
    """Training ended early on purpose (signal) or by a numerical failure; carries the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------------
# Pieces of the loop, each small and testable.

def lr_at(step: int, cfg) -> float:
    """Linear warmup from 0 to lr over warmup_iters, then decay to min_lr at lr_decay_iters: a half cosine
    (cfg.lr_schedule == "cosine") or a straight line ("linear")."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    if getattr(cfg, "lr_schedule", "cosine") == "linear":
        return cfg.lr + progress * (cfg.min_lr - cfg.lr)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def resolve_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use --device=cpu")
    return device


def resolve_dtype(name: str, device) -> str:
    import torch
    if name == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name == "bfloat16" and device.type == "cpu":
        return "bfloat16"  # CPU bf16 autocast works, just rarely faster
    return name


class Distributed:
    """Rank bookkeeping for torchrun; a single process is rank 0 of 1."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.master = self.rank == 0

    def setup(self, device):
        import torch
        import torch.distributed as dist
        if not self.enabled:
            return device
        if device.type == "cuda":
            device = torch.device(f"cuda:{self.local_rank}")
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return device

    def mean(self, value: float, device) -> float:
        if not self.enabled:
            return value
        import torch
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item() / self.world

    def any(self, flag: bool, device) -> bool:
        if not self.enabled:
            return flag
        import torch
        import torch.distributed as dist
        t = torch.tensor([int(flag)], device=device)  # nccl reduces only CUDA tensors
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def teardown(self):
        """Destroy the process group. Call it after dropping the DDP wrapper: its reducer holds the gloo group,
        and if the reducer's deallocation (GIL held) is what frees the group, the group's destructor joins a
        worker thread that waits for the GIL to free a tensor: a deadlock at exit, seen in about 1 of 4
        two-rank CPU runs. Here the group is shut down by destroy_process_group instead."""
        if self.enabled:
            import gc
            import torch.distributed as dist
            gc.collect()  # the wrapper sits in reference cycles (module hooks)
            if dist.is_initialized():
                dist.destroy_process_group()


def evaluate(model, loaders, eval_iters: int, autocast, dist: Distributed, device) -> dict[str, float]:
    """Mean loss over the same eval_iters batches per split every time (their sampler restarts from its seed)."""
    import torch
    out = {}
    model.eval()
    with torch.inference_mode():
        for split, batches in loaders.items():
            batches.restart()
            total, count = 0.0, 0
            for i in range(eval_iters):
                if i % dist.world != dist.rank:
                    batches.skip()
                    continue
                x, y = batches.next()
                with autocast:
                    _, loss = model(x, y)
                total += loss.item()
                count += 1
            out[split] = dist.mean(total, device) * dist.world / eval_iters if dist.enabled else total / count
    model.train()
    return out


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """loss.png: per-step training loss (light), evaluated train and val losses (markers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, losses, evals = [], [], []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval":
            evals.append(rec)
        else:
            steps.append(rec["step"])
            losses.append(rec["loss"])
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
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"),
                          (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suffix}{unit}"
    return f"{n:.3g} {unit}"


def seconds_str(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


# ----------------------------------------------------------------------------------------------------

def train(model_cfg, cfg, *, stop_flag: dict | None = None) -> dict:
    """Run training; returns a summary dict. Raises ValueError/FileNotFoundError for bad setups and
    TrainingStopped when a signal or a non-finite loss ends it early (after saving what can be saved).

    Float32 matmuls run at cfg.matmul_precision for the run (on CUDA: those left outside autocast). torch keeps
    that setting process-wide, so it is put back afterwards for callers in the same process.
    """
    from model.training.runtime import matmul_precision
    with matmul_precision(cfg.matmul_precision, resolve_device(cfg.device).type):
        return _train(model_cfg, cfg, stop_flag=stop_flag)


def _train(model_cfg, cfg, *, stop_flag: dict | None = None) -> dict:
    import torch
    from tqdm import tqdm

    from model import GPT
    from model.gpt.speed import use_cpu_kernels
    from model.training.checkpoint import (FORMAT, load_checkpoint, load_weights, rng_state, save_checkpoint,
                                  set_rng_state)
    from model.config import to_dict
    from model.training.data import Batches, load_meta
    from model.flops.formulas import train_step_flops
    from model.training.optim import adamw, clip_and_step
    from model.flops.peaks import measure_cpu_peak, mfu, peak_flops
    from model.flops.planner import plan_run
    from model.training.runtime import describe_matmul_precision

    stop_flag = stop_flag if stop_flag is not None else {}
    dist = Distributed()
    device = dist.setup(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.grad_accum % dist.world:
        raise ValueError(f"grad_accum={cfg.grad_accum} must be divisible by the number of processes ({dist.world})")
    local_accum = cfg.grad_accum // dist.world
    my_micro = range(dist.rank * local_accum, (dist.rank + 1) * local_accum)  # global micro-batch indices
    out_dir = Path(cfg.out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    metrics_path = out_dir / "metrics.jsonl"

    meta = load_meta(cfg.dataset)
    if model_cfg.vocab_size < meta["vocab_size"]:
        raise ValueError(f"vocab_size={model_cfg.vocab_size} is smaller than the dataset's {meta['vocab_size']} "
                         f"({cfg.dataset}/meta.json)")

    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(last_path)
        if ckpt.get("format") != FORMAT:
            raise ValueError(f"{last_path}: not a flopgpt checkpoint")
        if ckpt["model_config"] != to_dict(model_cfg):
            diff = {k: (v, to_dict(model_cfg).get(k)) for k, v in ckpt["model_config"].items()
                    if to_dict(model_cfg).get(k) != v}
            raise ValueError(f"{last_path}: checkpoint is from a different model config "
                             f"(checkpoint vs now: {diff})")
        if ckpt.get("meta") != meta:
            raise ValueError(f"{last_path}: checkpoint was trained on a different dataset than {cfg.dataset}")
    elif last_path.exists() and not cfg.overwrite:
        raise ValueError(f"{out_dir} already holds a checkpoint ({last_path.name}); pass --resume to continue "
                         f"it or --overwrite to start afresh")

    torch.manual_seed(cfg.seed)
    if device.type == "cpu":
        from model.training.runtime import cpu_process_settings
        cpu_process_settings()  # keep freed activations for reuse (glibc); see model/runtime.py
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = True
    precision = torch.get_float32_matmul_precision()  # set by train() for this run
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else nullcontext())

    kernels = use_cpu_kernels(device.type, model_cfg.dropout, precision, cfg.compile)  # see model/gpt/speed.py
    raw_model = GPT(model_cfg, cpu_kernels=kernels).to(device)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    eval_model = model  # never the DDP wrapper: evaluation needs no gradient sync
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = adamw(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type)

    T = model_cfg.block_size
    # every rank draws every micro-batch's offsets and gathers only its own: N ranks x accum/N see the same
    # data as one process with the full accumulation
    train_batches = Batches(cfg.dataset, "train", T, cfg.batch_size, seed=cfg.seed, device=device)
    eval_loaders = {split: Batches(cfg.dataset, split, T, cfg.batch_size, seed=cfg.seed + 1, device=device)
                    for split in ("train", "val")}

    step, best_val = 0, float("inf")
    if ckpt is not None:
        load_weights(raw_model, ckpt["model"], last_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        train_batches.load_state_dict(ckpt["batches"])
        set_rng_state(ckpt["rng"])
        step, best_val = int(ckpt["step"]), float(ckpt["best_val_loss"])
        if step > cfg.max_iters:
            raise ValueError(f"{last_path} is at step {step}, beyond max_iters={cfg.max_iters}")

    def state(at_step: int) -> dict:
        return {"format": FORMAT, "step": at_step, "best_val_loss": best_val,
                "model": raw_model.state_dict(), "model_config": to_dict(model_cfg),
                "train_config": to_dict(cfg), "optimizer": optimizer.state_dict(), "rng": rng_state(),
                "batches": train_batches.state_dict(), "meta": meta, "dataset": str(cfg.dataset)}

    tokens_per_step = cfg.batch_size * T * cfg.grad_accum
    flops_per_step = train_step_flops(model_cfg, cfg.batch_size, T) * cfg.grad_accum  # all ranks together
    peak, peak_desc = peak_flops(device, cfg.peak_flops)
    peak_total = peak * dist.world
    # one busy moment at start-up would read the CPU peak low for the whole run (MFU over 100% was seen):
    # calibrate again at evaluations, at most every RECALIBRATE_S, and keep the highest reading
    recalibrate = device.type == "cpu" and not cfg.peak_flops
    calibrated_at = time.perf_counter()

    remaining = cfg.max_iters - step
    if dist.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is not None and metrics_path.exists():  # drop records the resumed steps will write again
            keep = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            metrics_path.write_text("".join(ln + "\n" for ln in keep))
        elif ckpt is None:
            metrics_path.write_text("")
        print(f"model: {raw_model.num_params():,} parameters ({raw_model.num_params(True):,} non-embedding); "
              f"{dist.world} process(es) on {device}, {dtype}; {describe_matmul_precision(precision, device.type)}",
              file=sys.stderr)
    if dist.master and remaining > 0:
        plan = plan_run(model_cfg, remaining * tokens_per_step, T, peak_total)
        print(f"plan: {remaining} steps x {tokens_per_step:,} tokens = {plan['tokens']:,} tokens; exact training "
              f"compute {plan['flops']:.4g} FLOPs ({plan['scale']}; 6ND would say {plan['flops_6nd']:.4g}); "
              f"estimated {seconds_str(plan['seconds'])} at {plan['mfu']:.0%} MFU of "
              f"{human(peak_total, 'FLOP/s')} ({peak_desc})", file=sys.stderr)

    metrics = metrics_path.open("a") if dist.master else None
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not (dist.master and cfg.progress),
               dynamic_ncols=True, file=sys.stderr)
    last_losses: dict[str, float] = {}
    step_times: list[float] = []
    start_step, t_run = step, time.perf_counter()
    resumed_at = step if ckpt is not None else -1
    model.train()
    try:
        while True:
            last_step = step == cfg.max_iters
            if (step % cfg.eval_interval == 0 or last_step) and step != resumed_at:
                last_losses = evaluate(eval_model, eval_loaders, cfg.eval_iters,
                                       autocast, dist, device)
                if dist.master:
                    metrics.write(json.dumps({"kind": "eval", "step": step, "train_loss": last_losses["train"],
                                              "val_loss": last_losses["val"]}) + "\n")
                    metrics.flush()
                    bar.write(f"step {step}: train loss {last_losses['train']:.4f}, val loss "
                              f"{last_losses['val']:.4f}", file=sys.stderr)  # stdout stays clean
                    if last_losses["val"] < best_val:
                        best_val = last_losses["val"]
                        save_checkpoint(state(step), best_path)
                    save_checkpoint(state(step), last_path)
                if recalibrate and time.perf_counter() - calibrated_at >= RECALIBRATE_S:
                    peak = max(peak, measure_cpu_peak())
                    peak_total, calibrated_at = peak * dist.world, time.perf_counter()
            if last_step:
                break

            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                if micro not in my_micro:
                    train_batches.skip()
                    continue
                x, y = train_batches.next()
                last_micro = micro == my_micro[-1]
                sync = nullcontext() if (last_micro or not dist.enabled) else model.no_sync()
                with sync:
                    with autocast:
                        _, loss = model(x, y)
                    (loss / local_accum).backward()
                loss_sum += loss.detach()
            # the norm stays a tensor until after the step: an .item() here would make the host wait for the
            # GPU before it can queue the optimizer kernels
            grad_norm = clip_and_step(optimizer, cfg.grad_clip)  # clipping rides in the fused AdamW kernel
            optimizer.zero_grad(set_to_none=True)
            grad_norm = grad_norm.item() if grad_norm is not None else float("nan")
            loss_value = dist.mean(loss_sum.item() / local_accum, device)
            dt = time.perf_counter() - t0
            step += 1
            if not math.isfinite(loss_value):
                kept = f"{last_path} (step {load_checkpoint(last_path)['step']})" if last_path.exists() else "none"
                raise TrainingStopped(f"loss is {loss_value} at step {step}; stopping. Last good checkpoint: "
                                      f"{kept}", 1)
            step_times.append(dt)
            tok_s = tokens_per_step / dt
            step_mfu = mfu(flops_per_step, dt, peak_total)
            if dist.master:
                metrics.write(json.dumps({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                                          "dt_ms": dt * 1e3, "tokens_per_s": tok_s, "mfu": step_mfu,
                                          "flops": flops_per_step}) + "\n")
                bar.set_postfix_str(f"loss {loss_value:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s mfu {step_mfu:.1%}",
                                    refresh=False)
                bar.update(1)
            if dist.any(bool(stop_flag.get("signal")), device):  # every rank stops at the same step
                name = stop_flag.get("signal", "SIGTERM")
                if dist.master:
                    save_checkpoint(state(step), last_path)
                raise TrainingStopped(f"{name} received: stopped after step {step}; checkpoint saved to "
                                      f"{last_path} (resume with --resume)", 130 if name == "SIGINT" else 143)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
            if metrics_path.stat().st_size:
                plot_losses(metrics_path, out_dir / "loss.png")
        model = None  # the DDP wrapper must be gone before the process group is: see Distributed.teardown
        dist.teardown()

    done = step - start_step
    elapsed = time.perf_counter() - t_run
    timed = sorted(step_times[1:] or step_times)  # the first step pays for allocation/compilation
    median_dt = timed[len(timed) // 2] if timed else float("nan")
    summary = {"step": step, "train_loss": last_losses.get("train"), "val_loss": last_losses.get("val"),
               "best_val_loss": best_val, "tokens": done * tokens_per_step, "flops": done * flops_per_step,
               "seconds": elapsed, "median_step_s": median_dt,
               "tokens_per_s": tokens_per_step / median_dt if timed else float("nan"),
               "mfu": mfu(flops_per_step, median_dt, peak_total) if timed else float("nan"),
               "peak_flops": peak_total,
               "out_dir": str(out_dir)}
    if dist.master:
        print(f"done: {done} steps, {summary['tokens']:,} tokens, {summary['flops']:.4g} FLOPs achieved "
              f"in {seconds_str(elapsed)} (median {median_dt * 1e3:.1f} ms/step, "
              f"{summary['tokens_per_s']:,.0f} tok/s, MFU {summary['mfu']:.1%} of {human(peak_total, 'FLOP/s')}); "
              f"best val loss {best_val:.4f}; "
              f"checkpoints in {out_dir}", file=sys.stderr)
    return summary


def configs_from_argv(argv: list[str]):
    """[CONFIG.toml] [--key=value ...] -> (GPTConfig, TrainConfig); vocab_size comes from the dataset."""
    from model.config import GPTConfig, TrainConfig, build, parse_overrides, read_toml
    from model.training.data import ensure_dataset, load_meta

    path = None
    if argv and not argv[0].startswith("--"):
        path = argv[0]
        argv = argv[1:]
    elif not argv or all(a.startswith("--") for a in argv):
        path = DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None
    values = read_toml(path) if path else {}
    values.update(parse_overrides(argv))
    _, train_cfg = build((GPTConfig, TrainConfig), values, defaults={"vocab_size": 1})
    dataset = ensure_dataset(train_cfg.dataset)
    train_cfg = replace(train_cfg, dataset=str(dataset))
    meta = load_meta(dataset)
    model_cfg, train_cfg = build((GPTConfig, TrainConfig), {**values, "dataset": str(dataset)},
                                 defaults={"vocab_size": meta["vocab_size"]})
    return model_cfg, train_cfg


def print_help() -> None:
    from model.config import GPTConfig, TrainConfig
    print(__doc__.strip() + "\n\n" + USAGE + "\n")
    for cls in (GPTConfig, TrainConfig):
        print(f"{cls.__name__} keys (default):")
        for f in cls.__dataclass_fields__.values():
            print(f"  --{f.name}={f.default!r}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print_help()
        return 0
    sys.path.insert(0, str(ROOT))
    try:
        model_cfg, train_cfg = configs_from_argv(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2

    stop_flag: dict = {}
    handlers = {}

    def on_signal(signum, frame):
        stop_flag["signal"] = signal.Signals(signum).name  # finish the step, save, exit

    for sig in (signal.SIGINT, signal.SIGTERM):
        handlers[sig] = signal.signal(sig, on_signal)
    try:
        train(model_cfg, train_cfg, stop_flag=stop_flag)
    except (ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"train.py: {e}", file=sys.stderr)
        return e.code
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
