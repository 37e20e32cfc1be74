"""Count the model's FLOPs three ways (analytic formulas, fvcore, torch FlopCounterMode) and audit the
famous approximations; plan the compute of a training run; reproduce the papers' own FLOP tables; time a
training step per component; show the peak FLOP/s behind MFU.

    python flops.py [CONFIG.toml] [--key=value ...] [--batch-size B] [--seq-len T] [--json] [--sweep OUT_DIR]
    python flops.py [CONFIG.toml] --plan --tokens N [--device NAME | --peak-flops F] [--mfu M] [--json]
    python flops.py --paper gpt3|chinchilla|kaplan|palm|megatron|nanogpt [--json]
    python flops.py [CONFIG.toml] --profile [--batch-size B] [--device cpu|cuda] [--out PNG] [--json]
    python flops.py --peak [--recalibrate] [--json]

FLOPs = 2 per multiply-add everywhere. No config = GPT-2 124M (GPTConfig defaults). Measurements run on
meta tensors: exact, and fast (no weights are allocated).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

USAGE = ("python flops.py [CONFIG.toml] [--key=value ...] [--batch-size B] [--seq-len T] [--json] "
         "[--sweep OUT_DIR] | --plan --tokens N [--device NAME | --peak-flops F] [--mfu M] | --paper NAME | "
         "--profile [--out PNG] | --peak [--recalibrate]")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse would print the usage too)
        raise ValueError(message)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if "-h" in args or "--help" in args:  # the help lists the model keys with this command's values
            known, overrides = super().parse_known_args([a for a in args if a not in ("-h", "--help")])
            self.epilog = model_keys_help(known.config, overrides)
        return super().parse_known_args(args, namespace)


def model_keys_help(path: str | None, overrides: list[str]) -> str:
    from model.config import GPTConfig, help_lines
    cfg, note = load_config(path, overrides)
    return "\n".join([f"model keys, --key=value (values of {path or 'the defaults'}; {note}; the training keys "
                       f"of a train.py config are read and ignored):", *help_lines(GPTConfig, asdict(cfg))])


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = _Parser(prog="flops.py", usage=USAGE, allow_abbrev=False, description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="TOML config (train.py's files work; train keys are ignored)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=1,
                   help="sequences per forward (default %(default)s)")
    p.add_argument("--seq-len", "--seq_len", type=int, default=None, help="tokens per sequence (default block_size)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--sweep", metavar="OUT_DIR", help="sweep width, depth and seq_len; write CSV + PNG plots")
    p.add_argument("--plan", action="store_true", help="training compute of --tokens tokens at seq_len")
    p.add_argument("--tokens", help="tokens to train on: 300e9, 300B, 1.4T, 2.5M, ...")
    p.add_argument("--device", help="planner device: cpu (this CPU's cores x max clock x FLOPs/cycle) or a GPU short name "
                                          "(h100, a100, ...)")
    p.add_argument("--peak-flops", "--peak_flops", type=float, help="planner peak FLOP/s (overrides --device)")
    p.add_argument("--mfu", type=float, default=None, help="planner model FLOPs utilization (default 0.4)")
    p.add_argument("--paper", metavar="NAME", help="a paper's own table reproduced: gpt3, chinchilla, kaplan, "
                                                   "palm, megatron, nanogpt")
    p.add_argument("--profile", action="store_true", help="time forward, backward and optimizer step per "
                                                          "component on this device (writes a PNG with --out)")
    p.add_argument("--peak", action="store_true", help="the peak FLOP/s MFU uses on this machine, and its source")
    p.add_argument("--recalibrate", action="store_true", help="--peak: measure the CPU calibration again "
                                                              "(best of 5 trials) and replace the cached one")
    p.add_argument("--threads", type=int, default=0, help="--profile: CPU threads; 0 = one per core, torch's "
                                                            "default (default 0)")
    p.add_argument("--out", metavar="PNG", help="--profile: where to write the FLOP-share vs time-share plot")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args, rest = p.parse_known_args(argv)
    for arg in rest:
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; usage: {USAGE}")
    return args, rest


def load_config(path: str | None, overrides: list[str]):
    """The model config: TOML + --key=value overrides, as train.py reads them (train keys are ignored).

    Without vocab_size, when the config names a dataset whose meta.json exists, vocab_size comes from it.
    Returns (GPTConfig, a note on where vocab_size came from).
    """
    from model import GPTConfig, TrainConfig
    from model.config import load, parse_overrides, read_toml
    from model.training.data import load_meta
    values = {**(read_toml(path) if path else {}), **parse_overrides(overrides)}
    defaults, note = {}, "vocab_size from the config" if "vocab_size" in values else "vocab_size: GPTConfig default"
    if "vocab_size" not in values and "dataset" in values:
        try:
            defaults["vocab_size"] = load_meta(str(values["dataset"]))["vocab_size"]
            note = f"vocab_size from {Path(str(values['dataset'])) / 'meta.json'}"
        except FileNotFoundError:
            note = f"vocab_size: GPTConfig default ({Path(str(values['dataset'])) / 'meta.json'} not found)"
    model_cfg, _ = load(path, overrides, classes=(GPTConfig, TrainConfig), defaults=defaults)
    return model_cfg, note


# ----------------------------------------------------------------------------------------------------
# Sizes the counters can measure: checked before any model is built

# fvcore and FlopCounterMode trace every block: 0.14 s a block on the shared 2-core Xeon (`python flops.py
# --n_layer=400`: 67 s); 128 covers GPT-3 175B (96) and Llama 3 405B (126)
MAX_TRACED_LAYERS = 128
MAX_ELEMENTS = (2**63 - 1) // 4  # a tensor's size in bytes must fit int64, meta tensors included (float32)


def check_sizes(cfg, batch: int, seq_len: int) -> None:
    """ValueError, before anything is built, for a depth the counters would take minutes to trace or a
    tensor whose size in bytes overflows int64 (the analytic formulas, --plan, take any size)."""
    if cfg.n_layer > MAX_TRACED_LAYERS:
        raise ValueError(f"n_layer={cfg.n_layer:,}: the counters trace every block and flops.py measures at most "
                         f"{MAX_TRACED_LAYERS} (python flops.py --plan --tokens N gives the exact analytic count at "
                         f"any depth)")
    d, h, V = cfg.n_embd, cfg.n_head, cfg.vocab_size
    largest = {"logits (batch, seq_len, vocab_size)": batch * seq_len * V,
               "attention scores (batch, n_head, seq_len, seq_len)": batch * h * seq_len ** 2,
               "MLP activations (batch, seq_len, 4 n_embd)": batch * seq_len * 4 * d,
               "token embedding (vocab_size, n_embd)": V * d, "position table (block_size, n_embd)": cfg.block_size * d,
               "MLP weight (4 n_embd, n_embd)": 4 * d * d}
    for name, n in largest.items():
        if n > MAX_ELEMENTS:
            raise ValueError(f"{name} would hold {n:.3e} elements, more than a float32 tensor can (2^63 bytes); "
                             f"use smaller sizes")


def check_sweep(cfg, batch: int, seq_len: int, out_dir: Path) -> None:
    """Every sweep point's sizes, and the output folder, before the first point is measured."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--sweep {out_dir}: exists and is not a folder")
    check_sizes(cfg, batch, cfg.block_size)  # the seq_len sweep goes up to block_size
    for _, c in sweep_points(cfg):
        check_sizes(c, batch, seq_len)


# ----------------------------------------------------------------------------------------------------
# The report: everything computed once, rendered as tables or JSON

def report(cfg, batch: int, seq_len: int) -> dict:
    from model.flops import approximations
    from model.flops import formulas as flops
    from model.flops.counters import build_model, fvcore_count, torch_count
    fwd = flops.forward(cfg, batch, seq_len)
    train = flops.train_step(cfg, batch, seq_len)
    model = build_model(cfg)  # meta: shared by the three measurements
    fv = fvcore_count(cfg, batch, seq_len, model=model)
    tt = torch_count(cfg, batch, seq_len, train=True, model=model)  # forward read before the backward
    components = {name: {"analytic": fwd.matmul[name], "fvcore": fv.matmul[name],
                         "torch": tt.components.get(name)} for name in flops.MATMUL_COMPONENTS}
    # aggregates overlap the components, so they live apart: the components alone sum to the total
    aggregates = {"attention": {"of": ["attn_scores", "attn_values"], "analytic": fwd.attention,
                                "fvcore": fv.matmul["attn_scores"] + fv.matmul["attn_values"],
                                "torch": tt.components["attention"]}}
    ops = [op for op in fwd.non_matmul] + [op for op in fv.non_matmul if op not in fwd.non_matmul]
    return {
        "config": asdict(cfg),
        "batch_size": batch,
        "seq_len": seq_len,
        "params": {"total": flops.params_total(cfg), "non_embedding": flops.params_non_embedding(cfg),
                   "kaplan_12Ld2": flops.params_kaplan(cfg)},
        "forward": {"analytic": fwd.total, "fvcore": fv.total, "fvcore_macs": fv.macs, "torch": tt.forward,
                    "causal": fwd.causal_total, "components": components, "aggregates": aggregates,
                    "non_matmul": {op: {"analytic": fwd.non_matmul.get(op), "fvcore": fv.non_matmul.get(op, 0)}
                                   for op in ops}},
        "train_step": {"analytic": train.total, "torch": tt.total, "causal": train.causal_total,
                       "non_matmul": train.non_matmul},
        "approximations": {name: {"flops": a.flops, "exact": a.exact, "ratio_to_exact": a.ratio,
                                  "compared_with": a.compared_with, "source": a.source}
                           for name, a in approximations.audit(cfg, batch, seq_len).items()},
        "fvcore_unsupported_ops": fv.unsupported,
    }


def dump_json(obj) -> str:
    """Strict JSON: a NaN or an infinity is an error here, never a token other parsers reject."""
    return json.dumps(obj, indent=2, allow_nan=False)


def _n(x) -> str:
    return "—" if x is None else f"{x:,}"


def _diff(row: dict) -> str:
    measured = [v for k, v in row.items() if k != "analytic" and v is not None]
    return _n(max(abs(v - row["analytic"]) for v in measured)) if measured else "—"


def render(rep: dict, note: str) -> str:
    from model.flops.formulas import (ADD, ATTN_SCALE, BACKWARD_ELEMENTWISE, CROSS_ENTROPY_PER_LOGIT, CROSS_ENTROPY_PER_ROW,
                             GELU_TANH, LAYER_NORM_CORE, SOFTMAX)
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
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# --sweep

def sweep_points(cfg) -> list[tuple[str, object]]:
    """(sweep name, config) pairs: widths ~ d/4..2d (multiples of n_head), depths 1..2L, seq lens 1..block."""
    points = []
    h = cfg.n_head
    widths = sorted({max(h, round(cfg.n_embd * k / h) * h) for k in (0.25, 0.5, 1, 2)})
    points += [("width", replace(cfg, n_embd=w)) for w in widths]
    depths = sorted({1, max(1, cfg.n_layer // 2), cfg.n_layer, 2 * cfg.n_layer})
    points += [("depth", replace(cfg, n_layer=n)) for n in depths]
    return points


def seq_lens(block_size: int) -> list[int]:
    lens = [2 ** i for i in range(int(math.log2(block_size)) + 1)]
    return lens if lens[-1] == block_size else lens + [block_size]


def run_sweep(cfg, batch: int, seq_len: int, out_dir: Path) -> list[Path]:
    import csv
    from model.flops import approximations
    from model.flops import formulas as flops
    from model.flops.counters import build_model, fvcore_count, torch_count
    rows = []
    runs = [(name, c, seq_len) for name, c in sweep_points(cfg)]
    runs += [("seq_len", cfg, T) for T in seq_lens(cfg.block_size)]
    for name, c, T in runs:
        model = build_model(c)
        fwd, train = flops.forward(c, batch, T), flops.train_step(c, batch, T)
        fv = fvcore_count(c, batch, T, model=model)
        tt = torch_count(c, batch, T, train=True, model=model)
        row = {"sweep": name, "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "seq_len": T,
               "batch_size": batch, "analytic_forward": fwd.total, "fvcore_forward": fv.total,
               "torch_forward": tt.forward, "analytic_train": train.total, "torch_train": tt.total,
               "causal_forward": fwd.causal_total, "non_matmul_forward": fwd.non_matmul_total}
        row.update({f"ratio_{k}": a.ratio for k, a in approximations.audit(c, batch, T).items()})
        rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "flops_sweep.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return [csv_path, *plot_sweep(rows, cfg, out_dir)]


def plot_sweep(rows: list[dict], cfg, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, n_head={cfg.n_head}, vocab={cfg.vocab_size}"
    # measured vs analytic, and their difference
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    markers = {"width": "o", "depth": "s", "seq_len": "^"}
    for sweep, marker in markers.items():
        pts = [r for r in rows if r["sweep"] == sweep]
        ax.scatter([r["analytic_forward"] for r in pts], [r["fvcore_forward"] for r in pts], marker=marker,
                   s=60, facecolors="none", edgecolors="C0", label=f"fvcore forward ({sweep} sweep)")
        ax.scatter([r["analytic_train"] for r in pts], [r["torch_train"] for r in pts], marker=marker, s=25,
                   color="C1", label=f"torch train step ({sweep} sweep)")
    lo = min(r["analytic_forward"] for r in rows)
    hi = max(r["analytic_train"] for r in rows)
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--", label="measured = analytic")
    ax.set(xscale="log", yscale="log", xlabel="analytic FLOPs", ylabel="measured FLOPs",
           title="measured vs analytic")
    ax.legend(fontsize=7)
    diffs = {"fvcore - analytic (forward)": [r["fvcore_forward"] - r["analytic_forward"] for r in rows],
             "torch - analytic (forward)": [r["torch_forward"] - r["analytic_forward"] for r in rows],
             "torch - analytic (train step)": [r["torch_train"] - r["analytic_train"] for r in rows]}
    for i, (label, values) in enumerate(diffs.items()):
        ax2.plot([j + 0.25 * (i - 1) for j in range(len(rows))], values, marker="os^"[i], ls="", label=label)
    ax2.set(xlabel="sweep point (CSV row)", ylabel="FLOPs difference", title="difference: exactly 0 everywhere")
    ax2.set_ylim(-1, 1)
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    p1 = out_dir / "measured_vs_analytic.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    return [p1, plot_ratios(rows, title, out_dir)]


def plot_ratios(rows: list[dict], title: str, out_dir: Path) -> Path:
    """approximation / exact as T grows: training formulas (near 1) and generation formulas (far off)."""
    import matplotlib.pyplot as plt
    pts = [r for r in rows if r["sweep"] == "seq_len"]
    T = [r["seq_len"] for r in pts]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 5.5))
    styles = {"6N": "-", "6N_nonembedding": "-", "kaplan_forward": "-", "kaplan_train": ":", "palm": "-",
              "chinchilla": "-", "chinchilla_table": "--"}
    for k, ls in styles.items():
        ax.plot(T, [r[f"ratio_{k}"] for r in pts], marker="o", ms=3, ls=ls, lw=2.5 if ls == ":" else 1.5,
                label=k + (" (= kaplan_forward)" if k == "kaplan_train" else ""))
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    ax.set(xscale="log", xlabel="sequence length T", ylabel="approximation / exact",
           title="training (vs train step) and forward (vs forward) formulas")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for k in ("blog_per_token", "blog_next_token", "2NS_cached", "2NS_uncached"):
        ax2.plot(T, [r[f"ratio_{k}"] for r in pts], marker="o", ms=3, label=k)
    ax2.axhline(1.0, color="gray", lw=1, ls="--")
    ax2.set(xscale="log", yscale="log", xlabel="sequence length (context) T", ylabel="approximation / exact",
            title="blog formulas vs forward / next-token steps (log)")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    p2 = out_dir / "approximation_ratios.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return p2


# ----------------------------------------------------------------------------------------------------
# --plan

def resolve_peak(device: str | None, peak: float | None) -> tuple[float, str]:
    from model.flops.peaks import device_peak, peak_by_key
    if peak is not None:
        if not (math.isfinite(peak) and peak > 0):
            raise ValueError(f"--peak-flops must be a positive FLOP/s, got {peak!r}")
        return peak, "given (--peak-flops)"
    name = device or "cpu"
    if name.lower() == "cpu":
        cpu = device_peak("cpu")
        return cpu.flops, cpu.source
    entry = peak_by_key(name)
    return entry.flops, entry.note


def plan(cfg, seq_len: int, args) -> dict:
    from model.flops.planner import DEFAULT_MFU, parse_tokens, plan_run
    if args.tokens is None:
        raise ValueError("--plan needs --tokens N (e.g. --tokens 300e9)")
    tokens = parse_tokens(args.tokens)
    mfu = DEFAULT_MFU if args.mfu is None else args.mfu
    peak, desc = resolve_peak(args.device, args.peak_flops)
    result = plan_run(cfg, tokens, seq_len, peak, mfu)
    return {"config": asdict(cfg), "device": desc, **result}


def render_plan(p: dict) -> str:
    from model.cli import duration, human
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

def _g(x) -> str:
    if x is None:
        return "—"
    return f"{x:,}" if isinstance(x, int) and abs(x) < 10 ** 12 else f"{x:.4g}"


def render_paper(table: dict) -> str:
    rows = table["rows"]
    lines = [f"{table['paper']}: {table['source']}",
             f"{'row':<50}{'published':>16}{'ours':>16}{'exact':>16}{'ours/pub':>10}{'exact/pub':>10}"]
    notes = []
    for i, r in enumerate(rows):
        ratio = "—" if r["exact_over_published"] is None else f"{r['exact_over_published']:.4f}"
        lines.append(f"{r['name'][:49]:<50}{_g(r['published']):>16}{_g(r['ours']):>16}{_g(r['exact']):>16}"
                     f"{r['ours_over_published']:>10.4f}{ratio:>10}")
        if i == 0 or r["convention"] != rows[i - 1]["convention"]:  # a run of rows sharing one is listed once
            notes.append(f"  {r['name']}: {r['convention']}")
    return "\n".join(lines + ["", "conventions (ours = the paper's convention applied to our formulas; exact = "
                                   "this project's matmul count):"] + notes)


def run_paper(args) -> int:
    from model.flops.papers import paper_table
    if args.plan or args.profile or args.sweep:
        raise ValueError("--paper takes no --plan, --profile or --sweep")
    table = paper_table(args.paper)
    print(dump_json(table) if args.json else render_paper(table))
    return 0


# ----------------------------------------------------------------------------------------------------
# --peak

def run_peak(args) -> int:
    import torch
    from model.flops.peaks import cache_path, calibrated_cpu_peak, device_peak, hardware_cpu_peak
    if not args.peak:
        raise ValueError("--recalibrate goes with --peak")
    device = profile_device(args.device)
    result = {"device": str(device)}
    if device.type == "cpu":
        precision = torch.get_float32_matmul_precision()
        hardware = hardware_cpu_peak(precision=precision)
        calibrated = calibrated_cpu_peak(recalibrate=args.recalibrate, measure=args.recalibrate or hardware is None)
        result.update({"hardware_flops": hardware and hardware.flops, "hardware_source": hardware and hardware.source,
                       "calibrated_flops": calibrated and calibrated.flops,
                       "calibrated_source": calibrated and calibrated.source, "cache": str(cache_path())})
    peak = device_peak(device, args.peak_flops or 0.0)
    result.update({"peak_flops": peak.flops, "peak_source": peak.source, "peak_messages": peak.messages})
    if args.json:
        print(dump_json(result))
        return 0
    lines = [f"{k}: {v}" for k, v in result.items() if k not in ("peak_messages",) and v is not None]
    print("\n".join(lines + peak.messages))
    return 0


# ----------------------------------------------------------------------------------------------------
# --profile

def profile_device(name: str | None):
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"--profile runs on this machine: --device must be cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return torch.device(name)


def render_profile(r: dict) -> str:
    lines = [f"profile: {r['device']}, batch {r['batch_size']} x seq_len {r['seq_len']}, mean of {r['steps']} "
             f"profiled training steps (forward + backward + clip + AdamW); attention: {r['attention']}; "
             f"{r['threads']}",
             f"{'component':<17}{'FLOPs':>18}{'ms':>10}{'GFLOP/s':>10}{'FLOPs %':>9}{'time %':>8}"]
    for row in r["rows"]:
        rate = "—" if row["flops_per_s"] is None else f"{row['flops_per_s'] / 1e9:,.1f}"
        lines.append(f"{row['component']:<17}{row['flops']:>18,}{row['seconds'] * 1e3:>10.2f}{rate:>10}"
                     f"{row['flop_share']:>9.1%}{row['time_share']:>8.1%}")
    lines += [f"{'step (profiled)':<17}{r['all_flops']:>18,}{r['step_seconds'] * 1e3:>10.2f}",
              f"unprofiled step {r['unprofiled_step_seconds'] * 1e3:.2f} ms: {r['model_flops']:,} matmul FLOPs "
              f"(the MFU count) at {r['flops_per_s'] / 1e9:,.1f} GFLOP/s = MFU {r['mfu']:.1%} of "
              f"{r['peak_flops'] / 1e9:,.1f} GFLOP/s ({r['peak_source']})",
              "FLOPs of non-matmul rows follow formulas.py's per-element conventions; 'other' is the step time no "
              "component claims (residual adds, embedding, Python, the per-op timer)"]
    return "\n".join(lines + r["peak_messages"])


def run_profile(cfg, args, seq_len: int) -> int:
    from model.flops.peaks import device_peak
    from model.flops.profile import plot_profile, profile_step
    if args.plan or args.sweep or args.tokens is not None or args.mfu is not None:
        raise ValueError("--profile takes no --plan, --sweep, --tokens or --mfu")
    from model.training.threads import describe, set_threads
    device = profile_device(args.device)
    result = {"threads": describe(set_threads(args.threads))}
    result |= profile_step(cfg, args.batch_size, seq_len, device, device_peak(device, args.peak_flops or 0.0))
    out = Path(args.out or "flops_profile.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_profile(result, out)
    result["png"] = str(out)
    print(dump_json(result) if args.json else render_profile(result) + f"\nwrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, overrides = parse_args(argv)  # before importing torch: --help stays fast
    except ValueError as e:
        print(f"flops.py: error: {e}", file=sys.stderr)
        return 2
    from model.training.threads import set_wait_policy
    set_wait_policy()  # before torch loads: OpenMP reads its wait policy once (model/training/threads.py)
    from model.cli import report_errors
    return report_errors("flops.py", lambda: run(args, overrides, start), debug=args.debug)


def run(args, overrides: list[str], start: float) -> int:
    cfg, note = load_config(args.config, overrides)
    T = cfg.block_size if args.seq_len is None else args.seq_len
    if not 0 < T <= cfg.block_size:
        raise ValueError(f"--seq-len={T} must be in [1, block_size={cfg.block_size}]")
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
    if args.profile:
        check_sizes(cfg, args.batch_size, T)
        return run_profile(cfg, args, T)
    if args.tokens is not None or args.device is not None or args.peak_flops is not None or args.mfu is not None:
        raise ValueError("--tokens, --device, --peak-flops and --mfu need --plan")
    if args.sweep:
        check_sweep(cfg, args.batch_size, T, Path(args.sweep))
        for path in run_sweep(cfg, args.batch_size, T, Path(args.sweep)):
            print(f"wrote {path}")
        return 0
    check_sizes(cfg, args.batch_size, T)
    rep = report(cfg, args.batch_size, T)
    rep["vocab_source"] = note
    rep["seconds"] = round(time.perf_counter() - start, 3)
    print(dump_json(rep) if args.json else render(rep, note) +
          f"\n\ncounted in {rep['seconds']:.2f} s (after Python started; meta tensors)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
