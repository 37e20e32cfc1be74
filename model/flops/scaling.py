"""IsoFLOP scaling sweeps (Hoffmann et al. 2022, approach 2) with exact FLOPs: planning and fitting.

Planning: a family of models with depth and width tied (n_embd = aspect · n_layer, head size fixed), and for
each compute budget C a ladder of consecutive family members around a first guess of the optimum; each member
trains for steps = round(C / step_flops), step_flops = train_step_flops(config, batch, T) · grad_accum, so its
exact training FLOPs are within half a step of C.

Fitting, per FLOP convention (compute C, parameter count N of each run; D = its training tokens):
    exact               C = exact matmul FLOPs (attention and lm_head included)   N = all parameters
    6nd                 C = 6 · N · D                                               N = all parameters
    6n_nonembedding_d   C = 6 · N · D                                               N = non-embedding parameters
Per budget: a parabola of loss against log10 N; its vertex gives N_opt and L_opt; D_opt = C_budget / (FLOPs
per token at N_opt), the FLOPs per token of the budget's runs interpolated log-log (exactly 6·N under the 6ND
conventions). C_budget is the mean of the convention's C over the budget's runs. Then least squares on logs:
N_opt ∝ C^a, D_opt ∝ C^b, and the frontier L_opt = slope · log10 C + intercept, over the budgets whose vertex
lies inside their ladder (outside, a parabola's vertex is an extrapolation). The best measured run of each
budget (N_best, L_best) gives `frontier_measured`, the same line through L_best: it needs no parabola, so it
exists where an optimum lies outside the ladder, and it bounds L_opt from above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..config import GPTConfig, check
from .formulas import params_non_embedding, params_total, train_step_flops

CONVENTIONS = ("exact", "6nd", "6n_nonembedding_d")
NAMES = {"exact": "exact FLOPs, N = all params", "6nd": "6ND, N = all params",
         "6n_nonembedding_d": "6·N_non-emb·D, N = non-emb"}  # each convention as reports and pictures name it
MIN_STEPS = 10  # fewer optimizer steps leave no room for warmup and decay
RECORD_KEYS = ("budget", "params", "params_nonembedding", "tokens", "flops", "flops_6nd", "val_loss")
POINT_KEYS = ("budget", "n_layer", "n_head", "n_embd", "vocab_size", "block_size", "batch_size", "grad_accum",
              "steps", "params", "params_nonembedding", "tokens", "flops", "flops_6nd")


@dataclass(frozen=True)
class Family:
    """n_layer = m, n_embd = aspect · m, n_head = n_embd / head_dim, for m = 1 .. max_layers."""

    aspect: int = 8
    head_dim: int = 8
    max_layers: int = 12

    def __post_init__(self) -> None:
        for name in ("aspect", "head_dim", "max_layers"):
            check(name, getattr(self, name), int, 1)
        if self.aspect % self.head_dim:
            raise ValueError(f"aspect={self.aspect} must be a multiple of head_dim={self.head_dim}")

    def config(self, base: GPTConfig, m: int) -> GPTConfig:
        d = self.aspect * m
        return replace(base, n_layer=m, n_embd=d, n_head=d // self.head_dim)


def check_budgets(budgets) -> list[int]:
    """At least two distinct positive budgets, as whole FLOPs in increasing order."""
    out = []
    for b in budgets:
        check("budget", b, float, 1)
        out.append(int(b))
    if len(set(out)) < 2:
        raise ValueError(f"need at least two distinct budgets to fit a power law, got "
                         f"{', '.join(format(b, 'g') for b in budgets) or 'none'}")
    return sorted(set(out))


def point(base: GPTConfig, family: Family, m: int, budget: int, batch_size: int, grad_accum: int) -> dict:
    """One run of the sweep: family member m trained for the whole number of steps closest to `budget`."""
    cfg = family.config(base, m)
    step_flops = train_step_flops(cfg, batch_size, cfg.block_size) * grad_accum
    steps = (2 * budget + step_flops) // (2 * step_flops)  # round half up, in integers
    params = params_total(cfg)
    tokens = steps * batch_size * cfg.block_size * grad_accum
    return {"budget": budget, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
            "vocab_size": cfg.vocab_size, "block_size": cfg.block_size, "batch_size": batch_size,
            "grad_accum": grad_accum, "steps": steps, "params": params,
            "params_nonembedding": params_non_embedding(cfg), "tokens": tokens, "flops": steps * step_flops,
            "flops_6nd": 6 * params * tokens}


def ladder(base: GPTConfig, family: Family, budget: int, sizes: int, batch_size: int = 1, grad_accum: int = 1,
           tokens_per_param: float = 20.0, min_steps: int = MIN_STEPS) -> list[dict]:
    """`sizes` consecutive family members for `budget`, centred on the member whose tokens per parameter is
    closest (on a log scale) to `tokens_per_param` (Chinchilla's ~20), shifted to stay within the members that
    get at least `min_steps` steps."""
    check("sizes", sizes, int, 3)  # a parabola needs three points
    if not (isinstance(tokens_per_param, (int, float)) and math.isfinite(tokens_per_param) and tokens_per_param > 0):
        raise ValueError(f"tokens_per_param must be a positive number, got {tokens_per_param!r}")
    members = [point(base, family, m, budget, batch_size, grad_accum) for m in range(1, family.max_layers + 1)]
    valid = [p for p in members if p["steps"] >= min_steps]
    if not valid:
        step_flops = train_step_flops(family.config(base, 1), batch_size, base.block_size) * grad_accum
        raise ValueError(f"budget {budget:.3g} FLOPs is too small for the smallest model (n_layer=1, "
                         f"n_embd={family.aspect}): {min_steps} steps of it take {min_steps * step_flops:.3g} FLOPs")
    if len(valid) < sizes:
        hint = f"; or --sizes {len(valid)}" if len(valid) >= 3 else ""
        raise ValueError(f"budget {budget:.3g} FLOPs gives only {len(valid)} model size(s) at least {min_steps} "
                         f"steps; {sizes} sizes need a larger budget{hint}")
    centre = min(range(len(valid)), key=lambda i: abs(math.log(valid[i]["tokens"] / valid[i]["params"]
                                                             / tokens_per_param)))
    start = min(max(centre - sizes // 2, 0), len(valid) - sizes)
    return valid[start:start + sizes]


def plan(base: GPTConfig, family: Family, budgets, sizes: int, batch_size: int, grad_accum: int = 1,
         tokens_per_param: float = 20.0, min_steps: int = MIN_STEPS) -> list[dict]:
    """Every point of the sweep, budget by budget (smallest first), each ladder smallest model first."""
    return [p for b in check_budgets(budgets)
            for p in ladder(base, family, b, sizes, batch_size, grad_accum, tokens_per_param, min_steps)]


def point_id(p: dict) -> str:
    """A folder name for the run: budget, depth and width (unique within one sweep)."""
    return f"C{p['budget']:.4g}_L{p['n_layer']}_d{p['n_embd']}".replace("+", "")


def schedule(steps: int, max_iters: int, warmup_iters: int, lr_decay_iters: int) -> dict:
    """The recipe's schedule stretched to `steps`: warmup and decay keep their fractions of the run
    (rounded), the decay ends at the last step when the recipe's does (lr_decay_iters 0 or = max_iters);
    min_lr, lr and the schedule's shape are the recipe's. Evaluation (and a checkpoint) every quarter."""
    decay = lr_decay_iters or max_iters
    return {"max_iters": steps,
            "warmup_iters": round(steps * warmup_iters / max_iters),
            "lr_decay_iters": steps if decay == max_iters else max(1, round(steps * decay / max_iters)),
            "eval_interval": max(steps // 4, 1)}


# ----------------------------------------------------------------------------------------------------
# Fitting

def check_records(records: list[dict]) -> None:
    for i, r in enumerate(records):
        missing = [k for k in RECORD_KEYS if k not in r]
        if missing:
            raise ValueError(f"record {i + 1} lacks {', '.join(missing)}")
        for k in RECORD_KEYS:
            check(f"record {i + 1}: {k}", r[k], float, None if k == "val_loss" else 0, open_low=True)


def compute_and_n(r: dict, convention: str) -> tuple[float, float]:
    """(C, N) of one record under a FLOP convention."""
    if convention == "exact":
        return float(r["flops"]), float(r["params"])
    if convention == "6nd":
        return 6.0 * r["params"] * r["tokens"], float(r["params"])
    if convention == "6n_nonembedding_d":
        return 6.0 * r["params_nonembedding"] * r["tokens"], float(r["params_nonembedding"])
    raise ValueError(f"unknown convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")


def fit_budget(records: list[dict], convention: str) -> dict:
    """The IsoFLOP parabola of one budget's runs: N_opt, D_opt, L_opt, and whether the vertex lies inside
    the sampled sizes (outside, it is an extrapolation). A parabola that opens downwards has no optimum: None."""
    cn = [compute_and_n(r, convention) for r in records]
    c = np.array([x[0] for x in cn])
    x = np.log10([x[1] for x in cn])
    loss = np.array([r["val_loss"] for r in records], dtype=float)
    tokens = np.array([r["tokens"] for r in records], dtype=float)
    c_budget = float(c.mean())
    best = int(np.argmin(loss))
    out = {"budget": records[0]["budget"], "compute": c_budget, "n_opt": None, "d_opt": None,
           "loss_opt": None, "in_range": False, "points": len(records),
           "n_best": round(cn[best][1]), "loss_best": float(loss[best])}  # a parameter count: an integer
    if len(set(x.tolist())) < 3:
        return out
    p2, p1, p0 = np.polyfit(x, loss, 2)
    if p2 <= 0:
        return out
    xv = -p1 / (2 * p2)
    per_token = np.polyfit(x, np.log10(c / tokens), 1)  # log10 FLOPs per token, linear in log10 N
    n_opt = 10.0 ** xv
    out.update(n_opt=float(n_opt), d_opt=float(c_budget / 10.0 ** np.polyval(per_token, xv)),
               loss_opt=float(p0 + p1 * xv + p2 * xv * xv), in_range=bool(x.min() <= xv <= x.max()))
    out["parabola"] = [float(p2), float(p1), float(p0)]
    return out


def power_law(c: list[float], y: list[float]) -> tuple[float | None, float | None]:
    """Least squares log10 y = k · log10 c + q: (k, q); (None, None) with fewer than two distinct c."""
    if len(set(c)) < 2:
        return None, None
    k, q = np.polyfit(np.log10(c), np.log10(y), 1)
    return float(k), float(q)


def fit_convention(records: list[dict], convention: str) -> dict:
    """Per-budget optima, a, b (with their log10 prefactors), and the frontier lines, under one convention."""
    budgets = sorted({r["budget"] for r in records})
    per_budget = [fit_budget([r for r in records if r["budget"] == b], convention) for b in budgets]
    ok = [p for p in per_budget if p["in_range"]]  # an extrapolated vertex can be anywhere: left out
    c = [p["compute"] for p in ok]
    a, a_q = power_law(c, [p["n_opt"] for p in ok])
    b, b_q = power_law(c, [p["d_opt"] for p in ok])
    return {"a": a, "b": b, "a_log10_coef": a_q, "b_log10_coef": b_q, "per_budget": per_budget,
            "frontier": line(c, [p["loss_opt"] for p in ok]),
            "frontier_measured": line([p["compute"] for p in per_budget], [p["loss_best"] for p in per_budget])}


def line(c: list[float], loss: list[float]) -> dict:
    """Least squares loss = slope · log10 c + intercept; None for both with fewer than two distinct c."""
    if len(set(c)) < 2:
        return {"slope": None, "intercept": None}
    slope, intercept = np.polyfit(np.log10(c), loss, 1)
    return {"slope": float(slope), "intercept": float(intercept)}


def fit(records: list[dict]) -> dict:
    """The whole fit: top-level a, b, per_budget, frontier under exact FLOPs, and by_convention for all three.

    ValueError for records that cannot be fitted (missing fields, fewer than two budgets, a budget with
    fewer than three sizes)."""
    check_records(records)
    budgets = sorted({r["budget"] for r in records})
    if len(budgets) < 2:
        raise ValueError(f"need runs at two or more budgets to fit a power law, got {len(budgets)}")
    for b in budgets:
        sizes = {r["params"] for r in records if r["budget"] == b}
        if len(sizes) < 3:
            raise ValueError(f"budget {b:.3g} has {len(sizes)} model size(s); a parabola needs three")
    by = {conv: fit_convention(records, conv) for conv in CONVENTIONS}
    return {"a": by["exact"]["a"], "b": by["exact"]["b"], "per_budget": by["exact"]["per_budget"],
            "frontier": by["exact"]["frontier"], "frontier_measured": by["exact"]["frontier_measured"],
            "by_convention": by}


def compute_multiplier(frontier_a: dict, frontier_b: dict, loss: float) -> float | None:
    """How many times more compute recipe A's frontier needs than B's to reach `loss` (> 1: B is cheaper).
    None when either line does not fall with compute."""
    sa, ia, sb, ib = (frontier_a["slope"], frontier_a["intercept"], frontier_b["slope"], frontier_b["intercept"])
    if None in (sa, sb) or sa >= 0 or sb >= 0:
        return None
    return float(10.0 ** ((loss - ia) / sa - (loss - ib) / sb))


def compare_lines(fits: dict[str, dict], names: list[str], paths: list[str]) -> dict:
    """Two recipes' lines and the compute multiplier at A's loss at each budget. The line is the parabola
    frontier when every budget of both recipes has its vertex inside the ladder, else the best-run line."""
    inside = all(p["in_range"] for n in names for p in fits[n]["per_budget"])
    kind, key = ("frontier", "loss_opt") if inside else ("frontier_measured", "loss_best")
    fa, fb = fits[names[0]][kind], fits[names[1]][kind]
    rows = [{"loss": p[key], "budget": p["budget"], "multiplier": compute_multiplier(fa, fb, p[key])}
            for p in fits[names[0]]["per_budget"]]
    return {"line": kind, "a": {"config": paths[0], "frontier": fa, "fit": fits[names[0]]},
            "b": {"config": paths[1], "frontier": fb, "fit": fits[names[1]]}, "multiplier_at_a_budgets": rows}
