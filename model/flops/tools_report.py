"""`python flops.py --tools`: the counters audit (model/flops/tools.py) as a table, JSON and a picture."""
from __future__ import annotations

import json
from pathlib import Path

from .tools import COMPONENTS


def label(entry: dict) -> str:
    return entry["tool"] if entry["backend"] is None else f"{entry['tool']} ({entry['backend']})"


def _ratio(got, want) -> str:
    if got is None:
        return "—"
    return "0" if got == 0 else (f"{got / want:.3f}" if want else f"+{got:,}")


def render(rep: dict) -> str:
    c, ex = rep["config"], rep["exact"]
    lines = [f"FLOP counters on one GPT: n_layer={c['n_layer']} n_head={c['n_head']} n_embd={c['n_embd']} "
             f"vocab_size={c['vocab_size']} attention={c['attention']}, batch {rep['batch_size']} x seq_len "
             f"{rep['seq_len']}",
             f"exact (matmuls, FLOPs = 2 per multiply-add): forward {ex['forward']:,}, training step "
             f"{ex['train_step']:,}",
             "",
             f"{'tool':<19}{'version':<21}{'mode':<11}{'raw figure':>24}{'FLOPs':>20}{'ratio':>8}  misses"]
    for e in rep["tools"]:
        raw = f"{e['raw']:,.0f} {e['raw_unit']}"
        lines.append(f"{label(e):<19}{e['version'][:20]:<21}{e['mode']:<11}{raw:>24}{e['flops']:>20,}"
                     f"{e['ratio']:>8.3f}  {', '.join(e['missing']) or '—'}")
    exact = rep["exact_components"]["forward"]
    lines += ["", "forward per component: tool / exact (0 = missed, — = not reported per module; layer_norm, gelu "
                  "and other against this project's per-element conventions)",
              f"{'tool':<19}" + "".join(f"{k:>17}" for k in COMPONENTS),
              f"{'exact FLOPs':<19}" + "".join(f"{exact[k]:>17,}" for k in COMPONENTS)]
    for e in rep["tools"]:
        if e["mode"] == "forward":
            comps = e["components"]
            lines.append(f"{label(e):<19}" + "".join(f"{_ratio(comps.get(k), exact[k]):>17}" for k in COMPONENTS))
    lines += ["", "why (each tool's convention, then each gap with its source):"]
    for e in rep["tools"]:
        lines += [f"  {label(e)}, {e['mode']}:"] + [f"    - {n}" for n in e["notes"]]
    if rep["not_installed"]:
        lines.append(f"not installed (pip install -e \".[tools]\"): {', '.join(rep['not_installed'])}")
    for err in rep["errors"]:
        lines.append(f"failed: {err['tool']} {err['version']}: {err['error']}")
    return "\n".join(lines)


def plot(rep: dict, out: Path) -> Path:
    """Left: each tool's total / exact, forward and training step. Right: per-component ratio heat map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fwd = [e for e in rep["tools"] if e["mode"] == "forward"]
    train = {label(e): e["ratio"] for e in rep["tools"] if e["mode"] == "train_step"}
    names = [label(e) for e in fwd]
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(16, 0.55 * len(fwd) + 2.8), gridspec_kw={"width_ratios": [1, 1.7]})
    y = np.arange(len(fwd))
    ax.barh(y - 0.2, [e["ratio"] for e in fwd], 0.4, label="forward", color="C0")
    ax.barh(y + 0.2, [train.get(n, 0) for n in names], 0.4, label="training step (where the tool claims one)",
            color="C1")
    for i, n in enumerate(names):
        ax.text(fwd[i]["ratio"], i - 0.2, f" {fwd[i]['ratio']:.3f}", va="center", fontsize=8)
        if n in train:
            ax.text(train[n], i + 0.2, f" {train[n]:.3f}", va="center", fontsize=8)
    ax.axvline(1.0, color="gray", ls="--", lw=1)
    ax.set(yticks=y, yticklabels=names, xlabel="tool's FLOPs / exact matmul FLOPs", title="total vs exact")
    ax.invert_yaxis()
    ax.set_xlim(0, 1.18 * max([1.0, *(e["ratio"] for e in rep["tools"])]))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    exact = rep["exact_components"]["forward"]
    grid = np.full((len(fwd), len(COMPONENTS)), np.nan)
    for i, e in enumerate(fwd):
        for j, k in enumerate(COMPONENTS):
            got = e["components"].get(k)
            if got is not None and exact[k]:
                grid[i, j] = got / exact[k]
    shown = np.log2(np.clip(np.nan_to_num(grid, nan=1.0), 1 / 8, 8))
    cmap = matplotlib.colormaps["RdYlGn"].copy()
    hm.imshow(np.where(np.isnan(grid), np.nan, -np.abs(shown)), cmap=cmap, vmin=-3, vmax=0, aspect="auto")
    for i in range(len(fwd)):
        for j in range(len(COMPONENTS)):
            v = grid[i, j]
            text = "n/a" if np.isnan(v) else ("0" if v == 0 else (f"{v:.2f}" if v >= 0.01 else f"{v:.0e}"))
            hm.text(j, i, text, ha="center", va="center",
                    fontsize=8, color="dimgray" if np.isnan(v) else "black")
    hm.set(xticks=range(len(COMPONENTS)), xticklabels=COMPONENTS, yticks=range(len(fwd)), yticklabels=names,
           title="forward per component: tool / exact (red: missed or far off; n/a: not reported per module)")
    hm.tick_params(axis="x", rotation=30)
    c = rep["config"]
    fig.suptitle(f"FLOP counters on GPT n_layer={c['n_layer']} n_embd={c['n_embd']} vocab={c['vocab_size']}, "
                 f"attention={c['attention']}, batch {rep['batch_size']} x T={rep['seq_len']} (CPU)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_tools(cfg, batch: int, seq_len: int, *, as_json: bool, out: str | None, device: str = "cpu") -> int:
    """flops.py --tools: run the audit, print the table (or strict JSON) and write the picture."""
    from .counters import check_sizes
    from .tools import audit
    check_sizes(cfg, batch, seq_len)
    rep = audit(cfg, batch, seq_len, device=device)
    path = plot(rep, Path(out or "flops_tools.png"))
    print(json.dumps(rep, indent=2, allow_nan=False) if as_json else render(rep) + f"\nwrote {path}")
    return 0
