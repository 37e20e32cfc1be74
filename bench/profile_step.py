"""Where a training step's time goes: torch.profiler over the steps of bench/train_speed.py's runners.

    python bench/profile_step.py                     # recipe (a), flopgpt's step then the nanoGPT-style step
    python bench/profile_step.py --recipe=b --steps=2 --warmup=1 --which=flopgpt

For each step (each in its own process, with its program's process settings, as in train_speed.py) it prints:
the ops with the most self CPU time per step (torch.profiler) and the share of the step spent in the kernels
both steps run alike (mm, SDPA, GELU, LayerNorm); every matmul shape with its time per step and the GFLOP/s
of its median call (2 per multiply-add), timed in further steps around each call rather than by the
profiler, whose shape recording slowed some matmuls; and the same step at batch 1 and block 1, which leaves
almost only the per-step overhead (Python, dispatch, autograd, clipping, optimizer). Profiled times run a
little above unprofiled ones; compare within one run.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USAGE = ("usage: python bench/profile_step.py [--recipe=a|b] [--which=both|flopgpt|nanogpt] [--steps=N] "
         "[--warmup=N] [--threads=N] [--dataset=DIR]")
SHARED = ("aten::mm", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::gelu", "aten::gelu_backward",
          "aten::native_layer_norm", "aten::native_layer_norm_backward")


def parse_args(argv: list[str]) -> dict:
    opts = {"recipe": "a", "which": "both", "steps": 20, "warmup": 10, "threads": 0, "dataset": None}
    for arg in argv:
        key, eq, value = arg.partition("=")
        name = key.lstrip("-")
        if not key.startswith("--") or not eq or name not in opts:
            raise ValueError(f"unknown or malformed option {arg!r}; {USAGE}")
        if name in ("steps", "warmup", "threads"):
            try:
                opts[name] = int(value)
            except ValueError:
                raise ValueError(f"--{name} expects an integer, got {value!r}") from None
            if opts[name] < (1 if name == "steps" else 0):
                raise ValueError(f"--{name} must be {'positive' if name == 'steps' else 'non-negative'}, got {value}")
        elif name == "recipe" and value not in ("a", "b"):
            raise ValueError(f"--recipe: expected a or b, got {value!r}")
        elif name == "which" and value not in ("both", "flopgpt", "nanogpt"):
            raise ValueError(f"--which: expected both, flopgpt or nanogpt, got {value!r}")
        else:
            opts[name] = value
    return opts


def _matmul_timer_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulTimer(TorchDispatchMode):
        """Wall time of every aten.mm call, keyed by (m, k, n); every other op passes through untimed."""

        def __init__(self):
            super().__init__()
            self.calls: dict[tuple[int, int, int], list[float]] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is not torch.ops.aten.mm.default:
                return func(*args, **(kwargs or {}))
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            us = (time.perf_counter() - start) * 1e6
            (m, k), cols = args[0].shape, args[1].shape[1]
            self.calls.setdefault((m, k, cols), []).append(us)
            return out

    return MatmulTimer


def profile_one(opts: dict, dataset: Path, vocab: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from model import GPTConfig
    from train_speed import RECIPES, FlopgptRunner, NanoGPTRunner
    MatmulTimer = _matmul_timer_class()
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    flopgpt = opts["which"] == "flopgpt"
    if flopgpt:
        from model.training.runtime import cpu_process_settings
        cpu_process_settings()
    cls = FlopgptRunner if flopgpt else NanoGPTRunner
    shape, batch = RECIPES[opts["recipe"]]
    device = torch.device("cpu")
    runner = cls(GPTConfig(vocab_size=vocab, attention="sdpa", **shape), batch, dataset, device, "float32", False)
    for _ in range(opts["warmup"]):
        runner.step()
    n = opts["steps"]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            runner.step()
        wall = (time.perf_counter() - t0) / n * 1e3
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / n / 1e3
    print(f"\n== {'flopgpt' if flopgpt else 'nanoGPT-style'} step, recipe ({opts['recipe']}): {wall:.2f} ms/step "
          f"under the profiler ({n} steps), {total:.2f} ms/step of self CPU time")
    print(f"{'op':60s} {'ms/step':>8s} {'share':>7s} {'calls':>6s}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        ms = e.self_cpu_time_total / n / 1e3
        print(f"{e.key[:60]:60s} {ms:8.2f} {ms / total:7.1%} {e.count // n:6d}")
    shared = sum(e.self_cpu_time_total for e in events if e.key in SHARED) / n / 1e3
    print(f"kernels both steps run alike (mm, SDPA, GELU, LayerNorm): {shared:.2f} ms/step = {shared / total:.1%}")
    # matmul shapes: timed in separate steps by a dispatch mode around each aten.mm call, not by the profiler,
    # whose shape recording slowed some calls by half (c_fc forward: 690 us median unprofiled, 980 profiled)
    timer = MatmulTimer()
    with timer:
        for _ in range(n):
            runner.step()
    print(f"\n{'matmul (timed alone, no profiler)':34s} {'ms/step':>8s} {'median us':>9s} {'GFLOP/s':>8s} {'calls':>6s}")
    mm_total = 0.0
    for (m, k, cols), us in sorted(timer.calls.items(), key=lambda kv: -sum(kv[1])):
        mid = statistics.median(us)
        mm_total += sum(us) / n / 1e3
        print(f"{f'({m}x{k})@({k}x{cols})':34s} {sum(us) / n / 1e3:8.2f} {mid:9.1f} {2 * m * k * cols / mid / 1e3:8.1f} "
              f"{len(us) // n:6d}")
    print(f"{'all matmuls':34s} {mm_total:8.2f}")
    # the same step with one token: what is left is per-step overhead
    tiny = {**shape, "block_size": 1}
    small = cls(GPTConfig(vocab_size=vocab, attention="sdpa", **tiny), 1, dataset, device, "float32", False)
    for _ in range(10):
        small.step()
    times = []
    for _ in range(50):
        t = time.perf_counter()
        small.step()
        times.append(time.perf_counter() - t)
    print(f"\nthe same step at batch 1, block 1 (per-step overhead): {statistics.median(times) * 1e3:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    from train_speed import cli_start  # bench/ is on sys.path: this script's own folder
    argv = cli_start(argv, __doc__, USAGE)
    if argv is None:
        return 0
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        opts = parse_args(argv)
        from model.training.data import ensure_dataset, load_meta
        from train_speed import default_dataset
        dataset = ensure_dataset(opts["dataset"] or default_dataset())
        vocab = load_meta(dataset)["vocab_size"]
    except (ValueError, FileNotFoundError) as e:
        print(f"profile_step.py: error: {e}", file=sys.stderr)
        return 2
    if opts["which"] == "both":  # one process each: process settings differ, as in train_speed.py
        for which in ("flopgpt", "nanogpt"):
            args = [f"--{k}={v}" for k, v in opts.items() if k not in ("which", "dataset") and v is not None]
            code = subprocess.call([sys.executable, __file__, f"--which={which}", f"--dataset={dataset}", *args])
            if code:
                return code
        return 0
    profile_one(opts, Path(dataset), vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
