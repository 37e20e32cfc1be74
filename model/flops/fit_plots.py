"""Pictures of the parametric fit and of the Porian et al. ladder (matplotlib, Agg backend, files only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import parametric as pm
from .plots import pyplot, save


def plot_surface(fit: dict, points: dict, path: Path, isoflop: dict | None = None) -> Path:
    """Iso-loss contours of the fitted L(N, D) in the (N, D) plane, the runs as points coloured by their
    loss, the compute-optimal line (6ND, and exact FLOPs where the file has them), and approach 2's optima."""
    plt = pyplot()
    p = fit["params"]
    n, d = points["n"], points["tokens"]
    lo_n, hi_n = np.log10(n.min()) - 0.5, np.log10(n.max()) + 0.5
    lo_d, hi_d = np.log10(d.min()) - 0.5, np.log10(d.max()) + 0.5
    gn, gd = np.meshgrid(np.logspace(lo_n, hi_n, 200), np.logspace(lo_d, hi_d, 200))
    surface = p["E"] + p["A"] / gn ** p["alpha"] + p["B"] / gd ** p["beta"]
    from matplotlib.colors import Normalize
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=100)
    order = np.argsort(points["loss"], kind="stable")
    used, dropped = order[:len(order) - fit["excluded"]], order[len(order) - fit["excluded"]:]
    norm = Normalize(points["loss"][used].min(), points["loss"][used].max())  # one scale: contours and runs
    levels = np.quantile(points["loss"][used], np.linspace(0.02, 0.98, 12))
    cs = ax.contour(gn, gd, surface, levels=np.unique(np.round(levels, 3)), cmap="viridis", norm=norm,
                    linewidths=0.8)
    ax.clabel(cs, fontsize=7, fmt="%.3g")
    sc = ax.scatter(n[used], d[used], c=points["loss"][used], cmap="viridis", norm=norm, s=18, edgecolors="k",
                    linewidths=0.4, zorder=3)
    if len(dropped):
        ax.plot(n[dropped], d[dropped], "kx", ms=6, zorder=3, label=f"excluded: the {len(dropped)} highest losses")
    fig.colorbar(sc, ax=ax, label="measured loss")
    c_lo = 6 * 10 ** (lo_n + lo_d)
    c_hi = 6 * 10 ** (hi_n + hi_d)
    cc = np.logspace(np.log10(c_lo), np.log10(c_hi), 60)
    n6, d6 = pm.optimal_6nd(p, cc)
    ax.plot(n6, d6, "r-", lw=1.5, label=f"compute-optimal, 6ND (a = {fit['a']:.3f})")
    if points.get("flops") is not None:
        ne, de = pm.optimal_measured(p, cc, n, points["flops"] / d)
        ax.plot(ne, de, "m--", lw=1.5, label="compute-optimal, exact FLOPs"
                + (f" (a = {fit['a_exact']:.3f})" if fit.get("a_exact") is not None else ""))
    if isoflop:
        opt = [b for b in isoflop["per_budget"] if b["in_range"]]
        ax.plot([b["n_opt"] for b in opt], [b["d_opt"] for b in opt], "*", color="orange", ms=15, mec="k",
                zorder=4, label=f"IsoFLOP optima (approach 2, a = {isoflop['a']:.3f})"
                if isoflop["a"] is not None else "IsoFLOP optima (approach 2)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(10 ** lo_n, 10 ** hi_n)
    ax.set_ylim(10 ** lo_d, 10 ** hi_d)
    ax.set_xlabel("parameters N")
    ax.set_ylabel("training tokens D")
    ax.set_title("Fitted L(N, D) = E + A/N^α + B/D^β: iso-loss contours, runs, compute-optimal line", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return save(fig, path)


def plot_ladder(steps: list[dict], path: Path) -> Path:
    """a (with its 95% interval) after each step of the ladder, Kaplan's 0.73 and Chinchilla's 0.5 marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    xs = np.arange(len(steps))
    for i, s in enumerate(steps):
        if s["a"] is None:
            continue
        lo, hi = s["a_ci95"] or (s["a"], s["a"])
        ax.errorbar([i], [s["a"]], yerr=[[s["a"] - lo], [hi - s["a"]]], fmt="o", color="C0", capsize=4)
    ax.axhline(0.73, color="C3", ls="--", lw=1, label="Kaplan et al. 2020: 0.73")
    ax.axhline(0.5, color="C2", ls="--", lw=1, label="Hoffmann et al. 2022: ~0.5")
    ax.set_xticks(xs)
    ax.set_xticklabels([s["label"] for s in steps], fontsize=7, rotation=12)
    ax.set_ylabel("a in N_opt ∝ C^a (95% bootstrap interval)")
    ax.set_title("Porian et al.'s ladder at toy scale: one change per step", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)
