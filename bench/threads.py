"""CPU threads on an idle and on a busy machine: the programs' own choice against fixed settings.

    python bench/threads.py                       # training and sampling, 3 repeats (about 10 minutes)
    python bench/threads.py --repeats 5 --workloads train
    python bench/threads.py --workloads sample --kernels avx512

Each block is a fresh process of the real program, as a user runs it:
  train   python train.py --max_iters=S --eval_interval=1000 --progress=false (the default run's model and
          data, configs/default.toml): the median ms per step of its metrics.jsonl, the first WARM steps left
          out
  sample  python sample.py --ckpt=<the first training block's run> --max-new-tokens=N --kernels=K: the whole
          process's wall time, start-up included (what a user waits for)
Variants:
  default            no setting: the program reads the load and chooses (model/training/threads.py)
  1 thread           --threads=1
  2 spinning         --threads=2, GOMP_SPINCOUNT=300000 (libgomp's spin when no wait policy is set: what
                     torch does when nobody chooses)
  2 sleeping         --threads=2, OMP_WAIT_POLICY=PASSIVE
States: idle (nothing of this script's competes); busy (a CPU-bound `python -c "while True: pass"` from
before the program starts, the way a browser keeps a laptop's core busy); and, for training, arriving (the
same competitor starts ARRIVE_S seconds into 3x as many training steps, timed over the last third: the
default's governor must notice; '2 spinning' is left out there, its seconds per step show in the busy state).
Each repeat runs every variant once per state in a rotating order. Printed: the median of each variant and,
per state, the default's time over that of the fixed setting with the lowest median, paired within each
repeat (median and range of the pairs), then every time measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
VARIANTS = {"default": ([], {}), "1 thread": (["--threads=1"], {}),
            "2 spinning": (["--threads=2"], {"GOMP_SPINCOUNT": "300000"}),
            "2 sleeping": (["--threads=2"], {"OMP_WAIT_POLICY": "PASSIVE"})}
WARM = 3  # steps left out of a training block's median
ARRIVE_S = 3.0


def parse_args(argv):
    p = argparse.ArgumentParser(prog="threads.py", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="blocks per variant and state (default 3)")
    p.add_argument("--steps", type=int, default=30, help="training steps per block (default 30; 12 for "
                                                         "'2 spinning' beside a busy core, where a step takes seconds)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens per sample, 3 samples (default 200)")
    p.add_argument("--workloads", default="train,sample", help="train, sample or both (default train,sample)")
    p.add_argument("--kernels", default="torch", choices=("torch", "avx512"),
                   help="sample.py's --kernels (default torch; avx512: each decoding step one C++ call)")
    args = p.parse_args(argv)
    args.workloads = args.workloads.split(",")
    if any(w not in ("train", "sample") for w in args.workloads) or min(args.repeats, args.new_tokens) < 1 \
            or args.steps <= WARM + 2:
        p.error(f"--workloads takes train and/or sample; --repeats, --new-tokens >= 1; --steps > {WARM + 2}")
    return args


def hog() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def env_of(extra: dict) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in KEYS}, **extra}


def train_block(variant: str, state: str, steps: int, out: Path) -> tuple[float, str]:
    """(median ms per step, the thread lines the run printed)."""
    args, extra = VARIANTS[variant]
    if state == "busy" and variant == "2 spinning":
        steps = WARM + 9
    elif state == "arriving":  # long enough for the competitor to come and the governor to answer
        steps *= 3
    cmd = [sys.executable, "train.py", f"--max_iters={steps}", "--eval_interval=1000", "--progress=false",
           f"--out_dir={out}", "--overwrite=true", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_of(extra), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    competitor = None
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if state == "arriving" and line.startswith("step 0:") and competitor is None:
                time.sleep(ARRIVE_S)
                competitor = hog()
        if proc.wait():
            raise SystemExit(f"train.py failed:\n{''.join(lines[-5:])}")
    finally:
        if competitor:
            competitor.kill()
            competitor.wait()
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    dts = [r["dt_ms"] for r in records if "dt_ms" in r][WARM:]
    if state == "arriving":  # the steps after the competitor came and the governor's answer: the last third
        dts = dts[-len(dts) // 3:]
    said = "; ".join(ln.split(": ", 1)[1].strip() for ln in lines if "CPU thread" in ln and ln.startswith("step "))
    return statistics.median(dts), said


def sample_block(variant: str, ckpt: Path, new_tokens: int, kernels: str) -> tuple[float, str]:
    args, extra = VARIANTS[variant]
    start = time.perf_counter()
    subprocess.run([sys.executable, "sample.py", f"--ckpt={ckpt}", f"--max-new-tokens={new_tokens}",
                    f"--kernels={kernels}", *args], cwd=ROOT, env=env_of(extra), check=True, capture_output=True)
    return (time.perf_counter() - start) * 1e3, ""


def measure(workload: str, args, tmp: Path) -> dict:
    """{state: {variant: [ms]}}, and the lines the default printed when it changed its count."""
    states = ("idle", "busy", "arriving") if workload == "train" else ("idle", "busy")
    times = {s: {v: [] for v in VARIANTS} for s in states}
    for r in range(args.repeats):
        order = list(VARIANTS)[r % len(VARIANTS):] + list(VARIANTS)[:r % len(VARIANTS)]
        for state in states:
            competitor = hog() if state == "busy" else None
            try:
                time.sleep(0.5 if competitor else 0)  # let it settle on a core
                for variant in order:
                    if state == "arriving" and variant == "2 spinning":
                        continue  # seconds per step once the competitor comes: see the busy state
                    if workload == "train":
                        ms, said = train_block(variant, state, args.steps, tmp / "run")
                    else:
                        ms, said = sample_block(variant, tmp / "run", args.new_tokens, args.kernels)
                    times[state][variant].append(ms)
                    if said and variant == "default":
                        print(f"  {state}, default: {said}", file=sys.stderr)
            finally:
                if competitor:
                    competitor.kill()
                    competitor.wait()
        print(f"  {workload}: repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    return times


def report(workload: str, times: dict, args) -> None:
    unit = "ms per training step" if workload == "train" else \
        f"ms per `python sample.py --kernels={args.kernels}` (3 samples x {args.new_tokens} tokens, start-up " \
        "included)"
    print(f"\n{workload}: {unit}, median of {args.repeats} repeats")
    print(f"  {'state':9} " + " ".join(f"{n:>11}" for n in VARIANTS) + "   default / the best fixed setting")
    for state, by_variant in times.items():
        medians = {n: statistics.median(v) if v else float("nan") for n, v in by_variant.items()}
        best = min((n for n in VARIANTS if n != "default" and by_variant[n]), key=medians.get)
        ratios = [d / b for d, b in zip(by_variant["default"], by_variant[best])]  # pairs from one repeat
        print(f"  {state:9} " + " ".join(f"{m:11.1f}" for m in medians.values()) +
              f"   {statistics.median(ratios):.2f}x vs {best} (range {min(ratios):.2f}-{max(ratios):.2f}x)")
    print("  raw: " + json.dumps(times))


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "sample" in args.workloads and "train" not in args.workloads:
            train_block("default", "idle", WARM + 3, tmp / "run")  # a checkpoint to sample from
        for workload in ("train", "sample"):
            if workload in args.workloads:
                report(workload, measure(workload, args, tmp), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
