"""Every picture of FLOP accounting and scaling sweeps, and the one place matplotlib is set up: pyplot() selects
the Agg backend (files only, no display) and save() writes a figure. loss.png (model/training/metrics.py)
uses them too.

    flops.py --sweep     measured_vs_analytic.png, approximation_ratios.png   (plot_sweep, plot_ratios)
    flops.py --profile   FLOP share beside time share per component            (plot_profile)
    scaling.py           isoflop.png, optima.png, frontier.png, compare.png    (plot_fit, plot_frontiers)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .scaling import NAMES


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: it costs a second at start-up)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path, dpi: float | None = None) -> Path:
    """Lay out, write and close a figure; returns its path. Minor ticks of log axes carry no labels (under a
    decade wide they would overlap the major ones)."""
    from matplotlib.ticker import NullFormatter
    for ax in fig.axes:
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")  # "tight": legends placed beside the axes included
    pyplot().close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# flops.py --sweep and --profile

def plot_sweep(rows: list[dict], cfg, out_dir: Path) -> list[Path]:
    """measured_vs_analytic.png (both counters against the formulas, and their differences) and
    approximation_ratios.png, from flops.py --sweep's rows."""
    plt = pyplot()
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
    return [save(fig, out_dir / "measured_vs_analytic.png", dpi=110), plot_ratios(rows, title, out_dir)]


def plot_ratios(rows: list[dict], title: str, out_dir: Path) -> Path:
    """approximation / exact as T grows: training formulas (near 1) and generation formulas (far off)."""
    plt = pyplot()
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
    return save(fig, out_dir / "approximation_ratios.png", dpi=110)


def plot_profile(result: dict, path: Path) -> Path:
    """FLOP share beside time share, one pair of bars per component (matplotlib, Agg)."""
    plt = pyplot()
    rows = result["rows"]
    names = [r["component"] for r in rows]
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ax.barh([i - 0.2 for i in y], [100 * r["flop_share"] for r in rows], height=0.4, label="share of FLOPs")
    ax.barh([i + 0.2 for i in y], [100 * r["time_share"] for r in rows], height=0.4, label="share of time")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("% of the training step")
    ax.set_title(f"{result.get('model', 'model')} on {result['device']}, batch {result['batch_size']} x {result['seq_len']}: step "
                 f"{result['step_seconds'] * 1e3:.1f} ms profiled, MFU {result['mfu']:.1%} of "
                 f"{result['peak_flops'] / 1e9:,.0f} GFLOP/s", fontsize=9)
    ax.legend()
    save(fig, path, dpi=110)


# ----------------------------------------------------------------------------------------------------
# scaling.py

def plot_fit(result: dict, records: list[dict], out_dir: Path) -> list[Path]:
    """isoflop.png, optima.png and frontier.png of one sweep's fit into out_dir."""
    return [plot_isoflop(result, records, out_dir / "isoflop.png"), plot_optima(result, out_dir / "optima.png"),
            plot_frontiers({"exact FLOPs": result}, out_dir / "frontier.png", by_convention=True)]


def plot_isoflop(result: dict, records: list[dict], path: Path) -> Path:
    """Loss vs N (all parameters) per budget, the fitted parabolas, the optima marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, p in enumerate(result["per_budget"]):
        pts = sorted((r["params"], r["val_loss"]) for r in records if r["budget"] == p["budget"])
        color = f"C{i}"
        ax.plot([q[0] for q in pts], [q[1] for q in pts], "o", color=color, label=f"C = {p['budget']:.3g} FLOPs")
        if p.get("parabola"):
            x = np.linspace(math.log10(pts[0][0]) - 0.1, math.log10(pts[-1][0]) + 0.1, 100)
            ax.plot(10 ** x, np.polyval(p["parabola"], x), "-", color=color, alpha=0.7)
        if p["in_range"]:
            ax.plot([p["n_opt"]], [p["loss_opt"]], "*", color=color, ms=14, mec="k")
    axes_style(ax, "parameters N (all, tied head once)", "validation loss (nats/token)",
          "IsoFLOP curves (exact training FLOPs); stars: optima inside the ladders")
    return save(fig, path)


def axes_style(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
    """Log x axis, labels, grid, and a legend when something carries a label (nothing fitted: none)."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # beside the axes: it never covers a line
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)


def plot_optima(result: dict, path: Path) -> Path:
    """N_opt and D_opt against C for each convention, with the fitted power laws."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(7, 7.5), dpi=100)
    drawn = 0
    for i, (conv, f) in enumerate(result["by_convention"].items()):
        ok = [p for p in f["per_budget"] if p["in_range"]]
        drawn += len(ok)
        if not ok:  # no optimum inside a ladder under this convention: nothing to draw
            continue
        c = np.array([p["compute"] for p in ok])
        for ax, key, exp, coef in ((axes[0], "n_opt", "a", "a_log10_coef"), (axes[1], "d_opt", "b", "b_log10_coef")):
            ax.plot(c, [p[key] for p in ok], "o", color=f"C{i}", label=f"{NAMES[conv]}: optimum of a budget")
            if f[exp] is not None:
                ax.plot(c, 10 ** (f[coef] + f[exp] * np.log10(c)), "-", color=f"C{i}",
                        label=f"{NAMES[conv]}: power law, {exp} = {f[exp]:.3f}")
    for ax, name in ((axes[0], "N_opt (parameters)"), (axes[1], "D_opt (tokens)")):
        ax.set_yscale("log")
        axes_style(ax, "compute C (FLOPs, by convention)", name)
        if not drawn:
            ax.tick_params(which="both", bottom=False, left=False, labelbottom=False, labelleft=False)
            ax.text(0.5, 0.5, "nothing to draw: no budget's fitted optimum lies inside\nits ladder of sizes "
                    "(see isoflop.png); widen --sizes,\nor move the ladders with --tokens-per-param",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9)
    fig.suptitle("Compute-optimal size and tokens, three FLOP conventions")
    return save(fig, path)


def plot_frontiers(fits: dict[str, dict], path: Path, by_convention: bool = False) -> Path:
    """L_opt (circles, solid line) and the best measured run (crosses, dashed line) against C: one colour per
    recipe, or (by_convention) per FLOP convention."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    items = (list(next(iter(fits.values()))["by_convention"].items()) if by_convention
             else [(name, f) for name, f in fits.items()])
    for i, (name, f) in enumerate(items):
        label = NAMES.get(name, name) if by_convention else name
        _frontier_line(ax, f["per_budget"], "loss_opt", f["frontier"], f"C{i}", "o", "-", label)
        _frontier_line(ax, f["per_budget"], "loss_best", f["frontier_measured"], f"C{i}", "x", "--", label)
    axes_style(ax, "compute C (FLOPs)", "validation loss (nats/token)", "The line: compute-optimal loss vs compute")
    return save(fig, path)


def _frontier_line(ax, per_budget, key, line, color, marker, style, name) -> None:
    pts = [(p["compute"], p[key]) for p in per_budget if key == "loss_best" or p["in_range"]]
    if not pts:
        return
    c = np.array([q[0] for q in pts])
    what, points = ("L_opt", "dots: fitted optimum of a budget") if key == "loss_opt" else \
        ("best run", "crosses: best run of a budget")
    ax.plot(c, [q[1] for q in pts], marker, color=color, ls="none", label=f"{name}: {points}")
    if line["slope"] is not None:
        x = np.linspace(np.log10(c.min()) - 0.1, np.log10(c.max()) + 0.1, 50)
        ax.plot(10 ** x, line["intercept"] + line["slope"] * x, style, color=color,
                label=f"{name}: {what} line, {line['slope']:.4f}·log10 C + {line['intercept']:.3f}")
