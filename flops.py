"""Count the model's FLOPs three ways (analytic formulas, fvcore, torch FlopCounterMode) and audit the
famous approximations; plan the compute of a training run; reproduce the papers' own FLOP tables; time a
training step per component; show the peak FLOP/s behind MFU; count the bytes and draw the roofline.

    python flops.py [CONFIG.toml] [--key=value ...] [--batch-size B] [--seq-len T] [--json] [--sweep OUT_DIR]
    python flops.py [CONFIG.toml] --plan --tokens N [--device NAME | --peak-flops F] [--mfu M] [--json]
    python flops.py --paper gpt3|chinchilla|kaplan|palm|megatron|nanogpt [--json]
    python flops.py [CONFIG.toml] --profile [--batch-size B] [--device cpu|cuda] [--out PNG] [--json]
    python flops.py [CONFIG.toml] --tools [--batch-size B] [--seq-len T] [--attention=manual] [--out PNG] [--json]
    python flops.py --peak [--recalibrate] [--json]
    python flops.py [CONFIG.toml] --roofline [--batch-size B] [--context S] [--device cpu|h100|...] [--out PNG]

FLOPs = 2 per multiply-add everywhere. No config = GPT-2 124M (GPTConfig defaults). Measurements run on
meta tensors: exact, and fast (no weights are allocated).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

from model.cli import OneLineParser, duration, human, report_errors, resolve_device
from model.config import GPTConfig, help_lines
from model.flops.formulas import (ADD, ATTN_SCALE, BACKWARD_ELEMENTWISE, CROSS_ENTROPY_PER_LOGIT, CROSS_ENTROPY_PER_ROW,
                                  GELU_TANH, LAYER_NORM_CORE, SOFTMAX)
from model.flops.papers import paper_table, render_table
from model.flops.peaks import device_peak, peak_report, resolve_peak, step_bandwidth
from model.flops.planner import DEFAULT_MFU, parse_tokens, plan_run
from model.flops.plots import plot_profile
from model.training.recipe import load_model_config
from model.training.threads import cpu_threads, describe as describe_threads, set_wait_policy

USAGE = ("python flops.py [CONFIG.toml] [--key=value ...] [--batch-size B] [--seq-len T] [--json] "
         "[--sweep OUT_DIR] | --plan --tokens N [--device NAME | --peak-flops F] [--mfu M] | --paper NAME | "
         "--profile [--out PNG] | --tools [--out PNG] | --peak [--recalibrate]")


def model_keys_help(path: str | None, overrides: list[str]) -> str:
    cfg, note = load_model_config(path, overrides)
    return "\n".join([f"model keys, --key=value (values of {path or 'the defaults'}; {note}; the training keys "
                       f"of a train.py config are read and ignored):", *help_lines(GPTConfig, asdict(cfg))])


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = OneLineParser(prog="flops.py", usage=USAGE, allow_abbrev=False, description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="TOML config (train.py's files work; train keys are ignored)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=None,
                   help="sequences per forward (default %(default)s)")
    p.add_argument("--seq-len", "--seq_len", type=int, default=None, help="tokens per sequence (default block_size)")
    p.add_argument("--context", type=int, default=None, help="decode step's keys for bytes and --roofline "
                                                              "(default block_size)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="bytes and --roofline: the weights' dtype (default float32; bfloat16 for a GPU --device)")
    p.add_argument("--roofline", action="store_true", help="training and decode step against the FLOP and "
                                                           "bandwidth roofs (writes a PNG with --out)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--sweep", metavar="OUT_DIR", help="sweep width, depth and seq_len; write CSV + PNG plots")
    p.add_argument("--plan", action="store_true", help="training compute of --tokens tokens at seq_len")
    p.add_argument("--tokens", help="tokens to train on: 300e9, 300B, 1.4T, 2.5M, ...")
    p.add_argument("--device", help="planner device: cpu (calibrated) or a GPU short name (h100, a100, ...)")
    p.add_argument("--peak-flops", "--peak_flops", type=float, help="planner peak FLOP/s (overrides --device)")
    p.add_argument("--mfu", type=float, default=None, help="planner model FLOPs utilization (default 0.4)")
    p.add_argument("--paper", metavar="NAME", help="a paper's own table reproduced: gpt3, chinchilla, kaplan, "
                                                   "palm, megatron, nanogpt")
    p.add_argument("--profile", action="store_true", help="time forward, backward and optimizer step per "
                                                          "component on this device (writes a PNG with --out)")
    p.add_argument("--tools", action="store_true", help="run every installed FLOP counter (fvcore, FlopCounterMode, "
                   "ptflops, thop, calflops, DeepSpeed) on this GPT beside the exact count (PNG: --out)")
    p.add_argument("--peak", action="store_true", help="the peak FLOP/s MFU uses on this machine, and its source")
    p.add_argument("--recalibrate", action="store_true", help="--peak: measure the CPU calibration again "
                                                              "(best of 5 trials) and replace the cached one")
    p.add_argument("--threads", type=int, default=0, help="--profile: CPU threads; 0 = one per core less those "
                                                            "other programs keep busy (default %(default)s)")
    p.add_argument("--out", metavar="PNG", help="--profile / --tools: where to write the picture (--profile's "
                                                   "default: out/profile_<config>.png)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    if "-h" in argv or "--help" in argv:  # the help lists the model keys with this command's values
        known, overrides = p.parse_known_args([a for a in argv if a not in ("-h", "--help")])
        p.epilog = model_keys_help(known.config, overrides)
    args, rest = p.parse_known_args(argv)
    for arg in rest:
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; usage: {USAGE}")
    return args, rest


# ----------------------------------------------------------------------------------------------------
# The report: everything computed once, rendered as tables or JSON

def dump_json(obj) -> str:
    """Strict JSON: a NaN or an infinity is an error here, never a token other parsers reject."""
    return json.dumps(obj, indent=2, allow_nan=False)


def _n(x) -> str:
    return "—" if x is None else f"{x:,}"


def _diff(row: dict) -> str:
    measured = [v for k, v in row.items() if k != "analytic" and v is not None]
    return _n(max(abs(v - row["analytic"]) for v in measured)) if measured else "—"


def render(rep: dict, note: str) -> str:
    c, f, t = rep["config"], rep["forward"], rep["train_step"]
    B, T = rep["batch_size"], rep["seq_len"]
    lines = [f"model: n_layer={c['n_layer']} n_head={c['n_head']} n_embd={c['n_embd']} vocab_size={c['vocab_size']} "
             f"block_size={c['block_size']} bias={c['bias']} pos_encoding={c['pos_encoding']} "
             f"attention={c['attention']}  ({note})",
             f"input: batch {B} x seq_len {T} = {B * T:,} tokens; FLOPs = 2 per multiply-add",
             "",
             "forward, matmul FLOPs (attention on the full T x T square, as dense kernels and both counters do it)",
             f"{'component':<26}{'analytic':>20}{'fvcore (2 x MACs)':>20}{'torch':>20}{'max diff':>12}"]
    rows = [(name, row) for name, row in f["components"].items()]
    rows += [(f"{name} ({'+'.join(p.split('_')[1] for p in row['of'])})", row) for name, row in f["aggregates"].items()]
    for label, row in rows:
        row = {k: v for k, v in row.items() if k != "of"}
        lines.append(f"{label:<26}{_n(row['analytic']):>20}{_n(row['fvcore']):>20}{_n(row['torch']):>20}"
                     f"{_diff(row):>12}")
    total = {"analytic": f["analytic"], "fvcore": f["fvcore"], "torch": f["torch"]}
    lines += [f"{'total':<26}{_n(f['analytic']):>20}{_n(f['fvcore']):>20}{_n(f['torch']):>20}{_diff(total):>12}",
              f"fvcore raw figure: {f['fvcore_macs']:,} multiply-adds (fvcore calls them flops); torch cannot "
              f"split q@kᵀ from p@v",
              f"causal-only attention (lower triangle): forward {f['causal']:,} FLOPs "
              f"({f['causal'] / f['analytic']:.3f} of the dense count)",
              "",
              "training step (forward + backward; every matmul's backward = dX and dW, 2 x forward):",
              f"  analytic {t['analytic']:,}   torch {t['torch']:,}   diff {abs(t['analytic'] - t['torch']):,}"
              f"   (causal-only {t['causal']:,})",
              "",
              "non-matmul ops, forward (FLOPs by per-element conventions; NOT in the totals above)",
              f"{'op':<16}{'analytic':>18}{'fvcore handles':>18}  convention"]
    conventions = {"layer_norm": f"{LAYER_NORM_CORE}/element + 1 scale + 1 shift (bias)",
                   "attn_scale": f"{ATTN_SCALE}/score", "softmax": f"{SOFTMAX}/score (full square)",
                   "gelu": f"{GELU_TANH}/element (tanh form)", "residual_add": f"{ADD}/element, 2 per block",
                   "position_add": f"{ADD}/element", "bias_add": f"{ADD}/output element of each biased Linear",
                   "embedding": "lookup = gather: 0"}
    for op, row in f["non_matmul"].items():
        lines.append(f"{op:<16}{_n(row['analytic']):>18}{_n(row['fvcore']):>18}  {conventions.get(op, '')}")
    nm_fwd = sum(row["analytic"] or 0 for row in f["non_matmul"].values())
    nm_train = sum(t["non_matmul"].values())
    lines += [f"{'sum':<16}{nm_fwd:>18,}{'':>18}  = {nm_fwd / f['analytic']:.2%} of the forward matmul FLOPs",
              f"training step non-matmul: {nm_train:,} (cross-entropy {CROSS_ENTROPY_PER_LOGIT}/logit + "
              f"{CROSS_ENTROPY_PER_ROW}/row; backward {BACKWARD_ELEMENTWISE} x forward per op, embedding "
              f"scatter-add 1/element: conventions, not measured)",
              "",
              f"parameters: total {rep['params']['total']:,} (= GPT.num_params()); non-embedding (Kaplan) "
              f"{rep['params']['non_embedding']:,}; 12·L·d² = {rep['params']['kaplan_12Ld2']:,}",
              "",
              "approximations audited against the exact count",
              f"{'name':<17}{'FLOPs':>22}{'exact':>22}{'ratio':>9}  compared with / source"]
    for name, a in rep["approximations"].items():
        lines.append(f"{name:<17}{_n(a['flops']):>22}{_n(a['exact']):>22}{a['ratio_to_exact']:>9.3f}  "
                     f"{a['compared_with']}: {a['source']}")
    if rep["fvcore_unsupported_ops"]:
        lines.append(f"fvcore ops without a rule: {rep['fvcore_unsupported_ops']}")
    from model.flops.roofline import render_bytes
    return "\n".join(lines + ["", render_bytes(rep["bytes"])])

# ----------------------------------------------------------------------------------------------------
# --plan

def plan(cfg, seq_len: int, args) -> dict:
    if args.tokens is None:
        raise ValueError("--plan needs --tokens N (e.g. --tokens 300e9)")
    tokens = parse_tokens(args.tokens)
    mfu = DEFAULT_MFU if args.mfu is None else args.mfu
    peak, desc = resolve_peak(args.device, args.peak_flops)
    result = plan_run(cfg, tokens, seq_len, peak, mfu)
    return {"config": asdict(cfg), "device": desc, **result}


def render_plan(p: dict) -> str:
    c = p["config"]
    g = p["per_generated_token"]
    return "\n".join([
        f"plan: n_layer={c['n_layer']} n_head={c['n_head']} n_embd={c['n_embd']} vocab_size={c['vocab_size']}, "
        f"{p['tokens']:,} tokens at seq_len {p['seq_len']}",
        f"  {p['sequences']:,} sequences (rounded up to whole sequences: {p['tokens_trained']:,} tokens trained), "
        f"{p['flops_per_sequence']:,} FLOPs each (forward + backward matmuls)",
        f"  exact training compute  {human(p['flops'])}   {p['scale']}",
        f"  6ND                     {human(p['flops_6nd'])}   ratio {p['ratio_6nd']:.3f}",
        f"  PaLM (6N + 12LHQT)·D    {human(p['flops_palm'])}   ratio {p['ratio_palm']:.3f}",
        f"  peak {human(p['peak_flops'], 'FLOP/s')} ({p['device']}); at MFU {p['mfu']:.0%}: "
        f"{duration(p['seconds'])} ({p['seconds']:.4g} s)",
        f"  per generated token at context {p['seq_len']}: {g['cached']:,} FLOPs with a KV cache, "
        f"{g['uncached']:,} without ({g['uncached'] / g['cached']:.1f}x)",
    ])


# ----------------------------------------------------------------------------------------------------
# --paper

def run_paper(args) -> int:
    if args.plan or args.profile or args.sweep:
        raise ValueError("--paper takes no --plan, --profile or --sweep")
    table = paper_table(args.paper)
    print(dump_json(table) if args.json else render_table(table))
    return 0


# ----------------------------------------------------------------------------------------------------
# --peak

def run_peak(args) -> int:
    if not args.peak:
        raise ValueError("--recalibrate goes with --peak")
    result = peak_report(resolve_device(args.device or "auto", "--device"), args.peak_flops or 0.0, args.recalibrate)
    if args.json:
        print(dump_json(result))
        return 0
    lines = [f"{k}: {v}" for k, v in result.items() if k not in ("peak_messages",) and v is not None]
    print("\n".join(lines + result["peak_messages"]))
    return 0


# ----------------------------------------------------------------------------------------------------
# --profile

def run_profile(cfg, args, seq_len: int) -> int:
    from model.flops.counters import check_sizes
    from model.flops.profile import profile_step, render_profile  # torch loads here: after --help and usage errors
    if args.plan or args.sweep or args.tokens is not None or args.mfu is not None:
        raise ValueError("--profile takes no --plan, --sweep, --tokens or --mfu")
    check_sizes(cfg, args.batch_size, seq_len)
    device = resolve_device(args.device or "auto", "--device")
    name = Path(args.config).stem if args.config else "GPT-2 124M" if cfg == GPTConfig() else "GPTConfig"
    with cpu_threads(args.threads) as threads:  # the caller's count comes back afterwards
        result = {"model": f"{name} ({cfg.n_layer} layers x {cfg.n_embd})", "threads": describe_threads(threads)}
        result |= profile_step(cfg, args.batch_size, seq_len, device, device_peak(device, args.peak_flops or 0.0),
                               bandwidth=step_bandwidth(device))
    out = Path(args.out or Path("out") / f"profile_{re.sub(r'[^A-Za-z0-9.]+', '_', name)}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_profile(result, out)
    result["png"] = str(out)
    print(dump_json(result) if args.json else render_profile(result) + f"\nwrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------------
# --roofline

def run_roofline(cfg, args, seq_len: int, context: int) -> int:
    from model.flops.roofline import machine_roofline, plot_roofline, render_roofline  # torch loads here
    if args.plan or args.sweep or args.profile or args.tokens is not None or args.mfu is not None:
        raise ValueError("--roofline takes no --plan, --sweep, --profile, --tokens or --mfu")
    gpu = args.device not in (None, "cpu")
    result = machine_roofline(cfg, args.batch_size, seq_len, context, args.dtype or ("bfloat16" if gpu else "float32"),
                              args.device)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        plot_roofline(result, args.out, f"roofline on {result['device']}, {result['dtype']}: components at their "
                                        f"unfused bytes, the step at both conventions")
        result["png"] = args.out
    print(dump_json(result) if args.json else render_roofline(result) + (f"\nwrote {args.out}" if args.out else ""))
    return 0


def config_batch_size(path: str | None) -> int:
    """The training batch_size a config file sets (TrainConfig's default without one): --profile's default."""
    from model.config import TrainConfig, read_toml
    return int((read_toml(path) if path else {}).get("batch_size", TrainConfig().batch_size))


# ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    set_wait_policy()  # before torch loads: OpenMP reads its wait policy once (model/training/threads.py)
    return report_errors("flops.py", lambda: run(*parse_args(argv), start), debug="--debug" in argv)


def run(args, overrides: list[str], start: float) -> int:
    cfg, note = load_model_config(args.config, overrides)
    T = cfg.block_size if args.seq_len is None else args.seq_len
    if not 0 < T <= cfg.block_size:
        raise ValueError(f"--seq-len={T} must be in [1, block_size={cfg.block_size}]")
    if args.batch_size is None:
        args.batch_size = config_batch_size(args.config) if args.profile else 1
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
    if args.peak or args.recalibrate:
        return run_peak(args)
    if args.paper is not None:
        return run_paper(args)
    if args.plan:
        result = plan(cfg, T, args)
        print(dump_json(result) if args.json else render_plan(result))
        return 0
    context = cfg.block_size if args.context is None else args.context
    if not 0 < context <= cfg.block_size:
        raise ValueError(f"--context={context} must be in [1, block_size={cfg.block_size}]")
    if args.roofline:
        return run_roofline(cfg, args, T, context)
    if args.profile:
        return run_profile(cfg, args, T)
    if args.tools:  # model/flops/tools.py
        from model.flops.tools_report import run_tools
        device = resolve_device(args.device or "cpu", "--device")
        return run_tools(cfg, args.batch_size, T, as_json=args.json, out=args.out, device=str(device))
    if args.tokens is not None or args.device is not None or args.peak_flops is not None or args.mfu is not None:
        raise ValueError("--tokens, --device, --peak-flops and --mfu need --plan")
    from model.flops import report  # torch loads here: --help and usage errors come before it
    if args.sweep:
        report.check_sweep(cfg, args.batch_size, T, Path(args.sweep))
        for path in report.sweep(cfg, args.batch_size, T, Path(args.sweep)):
            print(f"wrote {path}")
        return 0
    report.check_sizes(cfg, args.batch_size, T)
    rep = report.report(cfg, args.batch_size, T, context, args.dtype or "float32")
    rep["vocab_source"] = note
    rep["seconds"] = round(time.perf_counter() - start, 3)
    print(dump_json(rep) if args.json else render(rep, note) +
          f"\n\ncounted in {rep['seconds']:.2f} s (after Python started; FLOPs on meta tensors, bytes on fake ones)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
