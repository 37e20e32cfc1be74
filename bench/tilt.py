"""Tilt the line: how many training tokens a recipe needs to reach a validation loss.

    python bench/tilt.py configs/shakespeare_char_cpu.toml configs/shakespeare_char_fast.toml
    python bench/tilt.py configs/shakespeare_char_cpu.toml "configs/shakespeare_char_cpu.toml --lr=2e-3"

Each positional argument is one run: a config file followed by --key=value overrides (quote it). Every run
trains with train.py's single-process step (same model, optimizer, batches, lr_at, gradient clipping) and is
evaluated on the WHOLE validation split in consecutive non-overlapping windows of block_size tokens, so the
number is deterministic and the same for every recipe (train.py's eval draws random windows). The target is
the first run's final loss unless --target is given; the table says at which step, i.e. after how many
tokens, each run first evaluated at or below it, and the saving against the first run.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USAGE = ('usage: python bench/tilt.py "CONFIG.toml [--key=value ...]" [...] [--target=LOSS] [--eval-every=N] '
         '[--json=PATH] [--threads=N]')


def parse_run(spec: str):
    """'CONFIG.toml --k=v ...' -> (label, GPTConfig, TrainConfig) with vocab_size from the dataset."""
    from model.training.recipe import load_recipe
    parts = shlex.split(spec)
    if not parts or parts[0].startswith("--"):
        raise ValueError(f"run {spec!r} must start with a config file")
    model_cfg, cfg = load_recipe(parts[0], parts[1:])
    label = Path(parts[0]).stem + ("" if len(parts) == 1 else " " + " ".join(parts[1:]))
    return label, model_cfg, cfg


def run_recipe(model_cfg, cfg, eval_every: int, log=print) -> dict:
    """Train like train.py's single-process loop (no checkpoints), at the run's float32 matmul precision;
    full-val loss every eval_every steps."""
    from model.training.runtime import matmul_precision
    if cfg.grad_accum != 1 or cfg.device not in ("cpu", "auto"):
        raise ValueError("bench/tilt.py runs single-process CPU recipes with grad_accum=1")
    with matmul_precision(cfg.matmul_precision, "cpu"):
        return _run(model_cfg, cfg, eval_every, log)


def _run(model_cfg, cfg, eval_every: int, log) -> dict:
    import torch
    from model import GPT
    from model.gpt.speed import use_cpu_kernels
    from model.training.data import Batches, open_split
    from model.training.evaluate import full_split_loss
    from model.training.optim import adamw, clip_and_step, lr_at
    from model.training.runtime import resolve_matmul_precision
    torch.manual_seed(cfg.seed)
    precision = resolve_matmul_precision(cfg.matmul_precision, "cpu")
    model = GPT(model_cfg, cpu_kernels=use_cpu_kernels("cpu", model_cfg.dropout, precision, False))  # train.py's
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), "cpu")
    batches = Batches(cfg.dataset, "train", model_cfg.block_size, cfg.batch_size, seed=cfg.seed)
    val = open_split(cfg.dataset, "val")
    tokens_per_step = cfg.batch_size * model_cfg.block_size
    curve, t0 = [], time.perf_counter()
    for step in range(cfg.max_iters + 1):
        if step and (step % eval_every == 0 or step == cfg.max_iters):
            loss = full_split_loss(model, val)
            curve.append({"step": step, "tokens": step * tokens_per_step, "val_loss": loss})
            log(f"  step {step:5d}  tokens {step * tokens_per_step:>10,}  full-val loss {loss:.4f}  "
                f"({time.perf_counter() - t0:.0f} s)")
        if step == cfg.max_iters:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = batches.next()
        _, loss = model(x, y)
        loss.backward()
        clip_and_step(optimizer, cfg.grad_clip)  # train.py's step
        optimizer.zero_grad(set_to_none=True)
    return {"curve": curve, "seconds": time.perf_counter() - t0, "tokens": cfg.max_iters * tokens_per_step}


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((c for c in curve if c["val_loss"] <= target), None)


def main(argv: list[str] | None = None) -> int:
    from train_speed import cli_start  # bench/ is on sys.path: this script's own folder
    argv = cli_start(argv, __doc__, USAGE)
    if argv is None:
        return 0
    try:
        opts = {a[2:].partition("=")[0]: a.partition("=")[2] for a in argv if a.startswith("--")}
        unknown = set(opts) - {"target", "eval-every", "json", "threads"}
        if unknown:
            raise ValueError(f"unknown option --{sorted(unknown)[0]}; {USAGE}")
        specs = [a for a in argv if not a.startswith("--")]
        if not specs:
            raise ValueError(f"no runs given; {USAGE}")
        target = float(opts["target"]) if opts.get("target") else None
        eval_every = int(opts.get("eval-every") or 100)
        if eval_every <= 0:
            raise ValueError(f"--eval-every must be positive, got {eval_every}")
        runs = [parse_run(s) for s in specs]
    except (ValueError, FileNotFoundError) as e:
        print(f"tilt.py: error: {e}", file=sys.stderr)
        return 2
    import torch
    if opts.get("threads"):
        torch.set_num_threads(int(opts["threads"]))
    results = []
    for label, model_cfg, cfg in runs:
        print(f"{label}: {cfg.max_iters} steps x {cfg.batch_size} x {model_cfg.block_size} tokens", flush=True)
        res = run_recipe(model_cfg, cfg, eval_every, log=lambda s: print(s, flush=True))
        res["label"] = label
        results.append(res)
    goal = target if target is not None else results[0]["curve"][-1]["val_loss"]
    base = first_reaching(results[0]["curve"], goal)
    print(f"\ntarget: full-val loss <= {goal:.4f}" + ("" if target is not None else " (the first run's final loss)"))
    print(f"{'run':4s} {'final loss':>10s} {'tokens to target':>17s} {'vs first':>9s} {'time':>7s}  recipe")
    for i, res in enumerate(results, 1):
        hit = first_reaching(res["curve"], goal)
        tok = f"{hit['tokens']:,}" if hit else "not reached"
        saving = f"{hit['tokens'] / base['tokens']:.2f}x" if hit and base else ""  # < 1: fewer tokens
        print(f"#{i:<3d} {res['curve'][-1]['val_loss']:10.4f} {tok:>17s} {saving:>9s} {res['seconds']:6.0f}s  "
              f"{res['label']}")
    if opts.get("json"):
        Path(opts["json"]).write_text(json.dumps({"target": goal, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
