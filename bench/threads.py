"""CPU threads on an idle and on a busy machine: the programs' default against one thread and two threads.

    python bench/threads.py                   # training steps and sampling, 5 repeats (a few minutes)
    python bench/threads.py --repeats 9 --workloads train

Variants, each a process of its own that stays up for the whole run:
  default      what train.py and sample.py do: torch's thread count (one per core), OMP_WAIT_POLICY=PASSIVE
               set before torch loads (model/training/threads.py)
  1 thread     --threads=1
  2 threads    two threads with OpenMP's default wait (idle threads spin before they sleep)
States: idle (nothing of this script's competes) and busy (a CPU-bound `python -c "while True: pass"`, the
way a browser keeps a laptop's core busy). Each repeat runs one block of every variant in both states, in a
rotating order; a block is --steps training steps of the default run's model (configs/default.toml: 4 x 128,
block 128, batch 16) or one sampling call (3 samples of --new-tokens tokens, sample.py's top-k and
temperature). Printed: the median ms per block of each variant and, per repeat, default / best of the three
in the same repeat and state, with their median.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

VARIANTS = {"default": (0, None), "1 thread": (1, None), "2 threads": (2, "spin")}
WORKLOADS = ("train", "sample")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="threads.py", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="blocks per variant and state (default 5)")
    p.add_argument("--steps", type=int, default=5, help="training steps per block (default 5)")
    p.add_argument("--new-tokens", type=int, default=100, help="tokens per sample in a block (default 100)")
    p.add_argument("--workloads", default="train,sample", help="train, sample or both (default train,sample)")
    p.add_argument("--child", nargs=2, metavar=("WORKLOAD", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workloads = args.workloads.split(",")
    if any(w not in WORKLOADS for w in args.workloads) or min(args.repeats, args.steps, args.new_tokens) < 1:
        p.error("--workloads takes train and/or sample; --repeats, --steps, --new-tokens must be >= 1")
    return args


# ---- a variant's process: reads a block size per line, answers with its milliseconds

def child(workload: str, threads: int, steps: int, new_tokens: int) -> None:
    from model.training.threads import set_wait_policy
    if os.environ.get("BENCH_WAIT") != "spin":
        set_wait_policy()
    import torch

    from model import GPT, GPTConfig
    from model.training.optim import adamw, clip_and_step
    from model.training.threads import set_threads
    set_threads(threads)
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=96, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(0)
    if workload == "train":
        opt = adamw(model, 2e-3, 0.1, (0.9, 0.99), "cpu")

        def block():
            for _ in range(steps):
                x = torch.randint(0, cfg.vocab_size, (16, cfg.block_size), generator=g)  # (B, T)
                _, loss = model(x, torch.roll(x, -1, 1))
                loss.backward()
                clip_and_step(opt, 1.0)
                opt.zero_grad(set_to_none=True)
                loss.item()
    else:
        model.eval()
        idx = torch.zeros((3, 1), dtype=torch.long)  # (3, 1): three samples from one token

        def block():
            model.generate(idx, new_tokens, temperature=0.8, top_k=200, generator=g)
    block()  # warm-up
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        block()
        print(json.dumps({"ms": (time.perf_counter() - start) * 1e3}), flush=True)


# ---- the parent

def start(workload: str, threads: int, wait: str | None, args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    if wait:
        env["BENCH_WAIT"] = wait
    proc = subprocess.Popen([sys.executable, __file__, "--child", workload, str(threads), "--steps", str(args.steps),
                             "--new-tokens", str(args.new_tokens)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    json.loads(proc.stdout.readline())  # warmed up
    return proc


def timed(proc: subprocess.Popen) -> float:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())["ms"]


def measure(workload: str, args) -> dict:
    """{state: {variant: [ms per block]}} over args.repeats rotations."""
    procs = {name: start(workload, threads, wait, args) for name, (threads, wait) in VARIANTS.items()}
    times = {state: {name: [] for name in procs} for state in ("idle", "busy")}
    try:
        for r in range(args.repeats):
            order = list(procs)[r % len(procs):] + list(procs)[:r % len(procs)]
            for state in ("idle", "busy"):
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if state == "busy" else None
                try:
                    if hog:
                        time.sleep(0.5)  # let it settle on a core
                    for name in order:
                        times[state][name].append(timed(procs[name]))
                finally:
                    if hog:
                        hog.kill()
                        hog.wait()
            print(f"  repeat {r + 1}/{args.repeats}: load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    return times


def report(workload: str, times: dict, args) -> None:
    unit = f"{args.steps} training steps" if workload == "train" else f"3 samples x {args.new_tokens} tokens"
    print(f"\n{workload}: ms per block of {unit}, median of {args.repeats} repeats")
    print(f"  {'state':6} " + " ".join(f"{n:>11}" for n in VARIANTS) + "   default / best of the three (per repeat)")
    for state, by_variant in times.items():
        medians = [statistics.median(v) for v in by_variant.values()]
        ratios = [by_variant["default"][i] / min(v[i] for v in by_variant.values()) for i in range(args.repeats)]
        print(f"  {state:6} " + " ".join(f"{m:11.1f}" for m in medians) +
              f"   median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}x)")
        others = {n: statistics.median([by_variant[n][i] / by_variant["default"][i] for i in range(args.repeats)])
                  for n in by_variant if n != "default"}
        print(f"  {'':6} time / default's: " + ", ".join(f"{n} {r:.2f}x" for n, r in others.items()))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.steps, args.new_tokens)
        return 0
    import torch
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at the start; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for workload in args.workloads:
        report(workload, measure(workload, args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
