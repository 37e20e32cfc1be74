"""What flops.py reports, counted once: the formulas, fvcore and FlopCounterMode side by side for one shape
(report) or for a sweep of widths, depths and sequence lengths around a config (sweep, a CSV and two pictures).
FLOPs = 2 per multiply-add; measurements run on meta tensors (exact, nothing allocated)."""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, replace
from pathlib import Path

from . import approximations, formulas
from .counters import build_model, check_sizes, fvcore_count, torch_count
from .plots import plot_sweep


def counts(cfg, batch: int, seq_len: int):
    """(forward formula, train-step formula, fvcore count, FlopCounterMode count of a training step) of one
    shape; both counters measure the same meta model."""
    model = build_model(cfg)  # meta: shared by the measurements
    fv = fvcore_count(cfg, batch, seq_len, model=model)
    tt = torch_count(cfg, batch, seq_len, train=True, model=model)  # forward read before the backward
    return formulas.forward(cfg, batch, seq_len), formulas.train_step(cfg, batch, seq_len), fv, tt


def report(cfg, batch: int, seq_len: int) -> dict:
    """Everything `python flops.py` prints: the counts per component, the non-matmul ops, the training step,
    the parameters and the approximation audit, as one JSON-ready dict."""
    fwd, train, fv, tt = counts(cfg, batch, seq_len)
    components = {name: {"analytic": fwd.matmul[name], "fvcore": fv.matmul[name],
                         "torch": tt.components.get(name)} for name in formulas.MATMUL_COMPONENTS}
    # aggregates overlap the components, so they live apart: the components alone sum to the total
    aggregates = {"attention": {"of": ["attn_scores", "attn_values"], "analytic": fwd.attention,
                                "fvcore": fv.matmul["attn_scores"] + fv.matmul["attn_values"],
                                "torch": tt.components["attention"]}}
    ops = [op for op in fwd.non_matmul] + [op for op in fv.non_matmul if op not in fwd.non_matmul]
    return {
        "config": asdict(cfg),
        "batch_size": batch,
        "seq_len": seq_len,
        "params": {"total": formulas.params_total(cfg), "non_embedding": formulas.params_non_embedding(cfg),
                   "kaplan_12Ld2": formulas.params_kaplan(cfg)},
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


def check_sweep(cfg, batch: int, seq_len: int, out_dir: Path) -> None:
    """Every sweep point's sizes, and the output folder, before the first point is measured."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--sweep {out_dir}: exists and is not a folder")
    check_sizes(cfg, batch, cfg.block_size)  # the seq_len sweep goes up to block_size
    for _, c in sweep_points(cfg):
        check_sizes(c, batch, seq_len)


def sweep(cfg, batch: int, seq_len: int, out_dir: Path) -> list[Path]:
    """Every sweep point counted three ways, written to out_dir/flops_sweep.csv with the two pictures of
    plots.plot_sweep; returns the paths written."""
    rows = []
    runs = [(name, c, seq_len) for name, c in sweep_points(cfg)]
    runs += [("seq_len", cfg, T) for T in seq_lens(cfg.block_size)]
    for name, c, T in runs:
        fwd, train, fv, tt = counts(c, batch, T)
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
