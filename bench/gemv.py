"""Matrix-vector kernels on weights streamed from memory: how close torch's kernels come to the bandwidth.

    python bench/gemv.py [--threads N] [--repeats 5]

Each variant multiplies one input (1 or 4 rows) by every weight matrix of GPT-2 124M (12 layers of
768x2304, 768x768, 768x3072 and 3072x768, then the 50257x768 lm_head: 124M weights, far more than the
caches hold), one matrix after another, as a decoding step does. The variants take turns, one pass each per
round, so a neighbour's load hits them alike. Printed: the best time of --repeats passes, the weight bytes over
that time, and that over the STREAM bandwidth measured in the same run
(model/flops/peaks.py), for the kernels model/gpt/decode.py uses (torch's, and with kernels="avx512" those of
model/gpt/cpu_decode.py, built on first use) and the ones it does not.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from model.flops.peaks import measure_cpu_bandwidth  # noqa: E402
from model.gpt import cpu_decode  # noqa: E402

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]  # (out, in)
VARIANTS = {  # name: (dtype, rows, weight layout, the call)
    "fp32, 1 row, addmm on W^T (decode.py)": (torch.float32, 1, "t", lambda x, w, b: torch.addmm(b, x, w)),
    "fp32, 1 row, F.linear": (torch.float32, 1, "", lambda x, w, b: F.linear(x, w, b)),
    "fp32, 4 rows, addmm on W^T (decode.py)": (torch.float32, 4, "t", lambda x, w, b: torch.addmm(b, x, w)),
    "bf16, 1 row, addmv (decode.py)": (torch.bfloat16, 1, "", lambda x, w, b: torch.addmv(b, w, x.view(-1))),
    "bf16, 1 row, F.linear": (torch.bfloat16, 1, "", lambda x, w, b: F.linear(x, w, b)),
    "bf16, 1 row, addmm on W^T": (torch.bfloat16, 1, "t", lambda x, w, b: torch.addmm(b, x, w)),
    "bf16, 4 rows, F.linear (decode.py)": (torch.bfloat16, 4, "", lambda x, w, b: F.linear(x, w, b)),
}
AVX512 = {  # kernels="avx512" (model/gpt/cpu_decode.py), where it runs
    "fp32, 1 row, avx512 kernel": (torch.float32, 1, "", lambda x, w, b: cpu_decode.linear(x, w, b)),
    "fp32, 4 rows, avx512 kernel": (torch.float32, 4, "", lambda x, w, b: cpu_decode.linear(x, w, b)),
    "bf16, 1 row, avx512 kernel": (torch.bfloat16, 1, "", lambda x, w, b: cpu_decode.linear(x, w, b)),
    "bf16, 4 rows, avx512 kernel": (torch.bfloat16, 4, "", lambda x, w, b: cpu_decode.linear(x, w, b)),
}


def timed(variants: dict, repeats: int) -> dict:
    """{name: (best seconds of one pass over every matrix, the weight bytes of a pass)}. The variants take
    turns, one pass each per round, so a neighbour's load on a shared machine hits them alike."""
    weights, passes = {}, {}
    for name, (dtype, rows, layout, call) in variants.items():
        if (dtype, layout) not in weights:  # one set of matrices per dtype and layout, shared by its variants
            ws = [torch.randn(o, i).to(dtype) for o, i in SHAPES]  # (out, in)
            weights[dtype, layout] = ([w.t().contiguous() for w in ws] if layout == "t" else ws,  # (in, out)
                                      [torch.randn(o).to(dtype) for o, _ in SHAPES])
        ws, biases = weights[dtype, layout]
        inputs = {i: torch.randn(rows, i).to(dtype) for _, i in SHAPES}  # (rows, in)
        passes[name] = (lambda ws=ws, biases=biases, inputs=inputs, call=call:
                        [call(inputs[i], w, b) for (_, i), w, b in zip(SHAPES, ws, biases)])
    best = dict.fromkeys(variants, float("inf"))
    with torch.no_grad():
        for one_pass in passes.values():
            one_pass()  # warm-up
        for _ in range(repeats):
            for name, one_pass in passes.items():
                start = time.perf_counter()
                one_pass()
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], sum(w.numel() * w.element_size() for w in weights[v[0], v[2]][0]))
            for name, v in variants.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gemv.py", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per variant, best kept (default 5)")
    args = p.parse_args(argv)
    if args.threads < 0 or args.repeats < 1:
        p.error("--threads must be >= 0 and --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = measure_cpu_bandwidth()  # best of 3 copies and triads
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; STREAM bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(this run)")
    variants = dict(VARIANTS)
    for name, spec in AVX512.items():
        reason = cpu_decode.unavailable(spec[0])
        if reason is None:
            variants[name] = spec
        else:
            print(f"  {name}: skipped, {reason}")
    for name, (sec, nbytes) in timed(variants, args.repeats).items():
        print(f"  {name:42} {nbytes / 1e6:5.0f} MB  {sec * 1e3:6.1f} ms  {nbytes / sec / 1e9:5.1f} GB/s  "
              f"{nbytes / sec / bandwidth:6.1%} of STREAM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
