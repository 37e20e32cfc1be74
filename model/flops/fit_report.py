"""Fitting a file of runs both ways: the parametric surface (approach 3, model/flops/parametric.py) with its
bootstrap, and the IsoFLOP parabolas (approach 2, model/flops/scaling.py) with a bootstrap over the runs.

A file is scaling.py's results.jsonl (params, tokens, val_loss, and the exact training `flops` of each run) or
a CSV whose header names N (`Model Size`, `N`, `params`, `parameters`), the loss (`loss`, `val_loss`) and the
tokens (`Training Tokens`, `tokens`, `D`) or the training FLOPs (`Training FLOP`, `flops`, `C`; then tokens
= FLOPs / 6N, as Besiroglu et al. derive them for Chinchilla's Figure 4). Names are matched ignoring case,
spaces, underscores and hyphens.
"""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import parametric as pm

COLUMNS = {"n": ("modelsize", "n", "params", "parameters", "numparams"),
           "tokens": ("trainingtokens", "tokens", "d", "traintokens"),
           "flops": ("trainingflop", "trainingflops", "flops", "flop", "c", "compute"),
           "loss": ("loss", "valloss", "validationloss")}
CHINCHILLA_COLUMNS = ("Model Size", "Training FLOP", "loss")  # Besiroglu et al.'s svg_extracted_data.csv


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def load_points(path) -> dict:
    """{"n", "tokens", "loss" (arrays), "flops" (exact training FLOPs of each run, or None), "budget" (or
    None), "records" (results.jsonl records, or None), "chinchilla" (the file has Chinchilla's columns)}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fit file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{path}: empty file")
    out = _load_jsonl(path, text) if text.lstrip().startswith("{") else _load_csv(path, text)
    for key in ("n", "tokens", "loss"):
        bad = np.flatnonzero(~(np.isfinite(out[key]) & (out[key] > 0)))
        if bad.size:
            raise ValueError(f"{path}: point {bad[0] + 1} has {key} = {float(out[key][bad[0]])!r}; it must be a "
                             f"positive number")
    return out


def read_jsonl(path: Path, text: str | None = None) -> list[tuple[int, dict]]:
    """(line number, record) for each JSON object of a JSON-lines file, as scaling.py's sweeps read it: a torn
    last line (a crash while writing it) and a second record of a run id are dropped with a note on stderr;
    ValueError naming any other bad line, FileNotFoundError for a missing file."""
    path = Path(path)
    if text is None:
        if not path.is_file():
            raise FileNotFoundError(f"results file not found: {path}")
        text = path.read_text(encoding="utf-8")
    lines = text.rstrip().splitlines()
    out, seen = [], {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                print(f"note: {path}:{i}: dropped a torn last line (a crash while writing it)", file=sys.stderr)
                break
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object")
        if isinstance(rec.get("id"), str) and rec["id"] in seen:
            print(f"note: {path}:{i}: dropped a second record of run {rec['id']} (first on line "
                  f"{seen[rec['id']]})", file=sys.stderr)
            continue
        seen[rec.get("id")] = i
        out.append((i, rec))
    return out


def _load_jsonl(path: Path, text: str) -> dict:
    recs = []
    for i, rec in read_jsonl(path, text):
        missing = [k for k in ("params", "tokens", "val_loss") if not isinstance(rec.get(k), (int, float))]
        if missing:
            raise ValueError(f"{path}:{i}: lacks a number for {', '.join(missing)} (a scaling.py results.jsonl "
                             f"has params, tokens, val_loss, flops)")
        recs.append(rec)
    has_flops = all(isinstance(r.get("flops"), (int, float)) for r in recs)
    return {"n": np.array([r["params"] for r in recs], float), "tokens": np.array([r["tokens"] for r in recs], float),
            "loss": np.array([r["val_loss"] for r in recs], float),
            "flops": np.array([r["flops"] for r in recs], float) if has_flops else None,
            "budget": np.array([r.get("budget", np.nan) for r in recs], float), "records": recs, "chinchilla": False}


def _load_csv(path: Path, text: str) -> dict:
    rows = list(csv.reader(text.splitlines()))
    header = [h.strip() for h in rows[0]]
    keys = [_key(h) for h in header]
    col = {name: next((keys.index(a) for a in alias if a in keys), None) for name, alias in COLUMNS.items()}
    need = [label for name, label in (("n", "N (model size)"), ("loss", "the loss")) if col[name] is None]
    if col["tokens"] is None and col["flops"] is None:
        need.append("tokens or training FLOPs")
    if need:
        raise ValueError(f"{path}: no column for {', '.join(need)} among the header's {', '.join(header)} "
                         f"(expected e.g. 'Model Size', 'Training FLOP' or 'tokens', 'loss')")
    values = {name: [] for name in col if col[name] is not None}
    for i, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        for name, j in col.items():
            if j is None:
                continue
            cell = row[j].strip() if j < len(row) else ""
            try:
                values[name].append(float(cell))
            except ValueError:
                raise ValueError(f"{path}:{i}: column {header[j]!r} is not a number: {cell!r}") from None
    arr = {k: np.array(v, float) for k, v in values.items()}
    tokens = arr["tokens"] if "tokens" in arr else arr["flops"] / (6.0 * arr["n"])  # C = 6ND
    return {"n": arr["n"], "tokens": tokens, "loss": arr["loss"], "flops": None, "budget": None, "records": None,
            "chinchilla": all(c in header for c in CHINCHILLA_COLUMNS)}


def fit_parametric(points: dict, bootstrap: int = 1000, seed: int = 0, exclude_highest: int = 0) -> dict:
    """The parametric fit with its bootstrap as a strict-JSON-ready dict (see docs/scaling.md)."""
    check_options(bootstrap, seed, exclude_highest)
    n_all = len(points["loss"])
    if exclude_highest >= n_all:
        raise ValueError(f"--exclude-highest {exclude_highest} leaves none of the {n_all} points")
    keep = np.sort(np.argsort(points["loss"], kind="stable")[:n_all - exclude_highest])
    if len(keep) < 6:
        raise ValueError(f"{len(keep)} point(s) to fit; five parameters need at least 6")
    n, d, loss = points["n"][keep], points["tokens"][keep], points["loss"][keep]
    t0 = time.perf_counter()
    best = pm.fit_surface(n, d, loss)
    boot = pm.bootstrap(n, d, loss, best["theta"], bootstrap, seed) if bootstrap else np.zeros((0, 5))
    boot = boot[np.isfinite(boot).all(1) & (boot[:, :3] < 700).all(1)]  # exp(a), exp(b), exp(e) finite
    out = {"method": "parametric", "params": best["params"], **_intervals(best["params"], boot),
           "objective": best["objective"], "points": int(len(keep)), "excluded": int(exclude_highest),
           "huber_delta": pm.HUBER_DELTA, "starts": len(pm.grid_starts()), "bootstrap": int(bootstrap),
           "bootstrap_seed": int(seed), "bootstrap_starts": pm.BOOT_STARTS + 1, "bootstrap_used": len(boot)}
    budgets = _budgets(points, keep)
    out["optima_6nd"] = _optima(best["params"], boot, budgets, None)
    if points["flops"] is not None:
        measured = (n, points["flops"][keep] / d)
        out["optima_exact"] = _optima(best["params"], boot, budgets, measured)
        out.update(_exact_exponent(best["params"], boot, budgets, measured))
    if points.get("chinchilla"):
        out["published"] = {name: {"params": p, "objective": pm.objective_at(p, n, d, loss)}
                            for name, p in (("hoffmann", pm.HOFFMANN), ("besiroglu", pm.BESIROGLU))}
    out["seconds"] = time.perf_counter() - t0
    return finite(out)


def check_options(bootstrap: int, seed: int, exclude_highest: int) -> None:
    for name, v in (("--bootstrap", bootstrap), ("--seed", seed), ("--exclude-highest", exclude_highest)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")


def _intervals(params: dict, boot: np.ndarray) -> dict:
    """Standard errors and 95% percentile intervals over the bootstrap replicates (None without any)."""
    if not len(boot):
        none = {k: None for k in pm.NAMES}
        return {"stderr": none, "ci95": dict(none), "a": _a(params), "b": 1 - _a(params), "a_stderr": None,
                "b_stderr": None, "a_ci95": None, "b_ci95": None}
    cols = {"E": np.exp(boot[:, 2]), "A": np.exp(boot[:, 0]), "B": np.exp(boot[:, 1]), "alpha": boot[:, 3],
            "beta": boot[:, 4]}
    a = boot[:, 4] / (boot[:, 3] + boot[:, 4])
    cols.update(a=a, b=1 - a)
    std = {k: _spread(v)[0] for k, v in cols.items()}
    ci = {k: _spread(v)[1] for k, v in cols.items()}
    return {"stderr": {k: std[k] for k in pm.NAMES}, "ci95": {k: ci[k] for k in pm.NAMES}, "a": _a(params),
            "b": 1 - _a(params), "a_stderr": std["a"], "b_stderr": std["b"], "a_ci95": ci["a"], "b_ci95": ci["b"]}


def _spread(values) -> tuple[float | None, list[float] | None]:
    """(standard deviation, [2.5, 97.5] percentiles) of the finite values; None for either when undefined."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return None, None
    with np.errstate(over="ignore"):
        std = float(np.std(v, ddof=1))
    return (std if math.isfinite(std) else None), [float(x) for x in np.percentile(v, [2.5, 97.5])]


def finite(obj):
    """obj with every non-finite float replaced by None (strict JSON), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _a(params: dict) -> float:
    return params["beta"] / (params["alpha"] + params["beta"])


def _budgets(points: dict, keep) -> list[float]:
    """Where to report N_opt and D_opt: the file's budgets, else every decade of its 6ND compute."""
    b = points.get("budget")
    if b is not None and np.all(np.isfinite(b[keep])):
        return sorted({float(x) for x in b[keep]})
    c = 6 * points["n"][keep] * points["tokens"][keep]
    return [10.0 ** k for k in range(math.ceil(math.log10(c.min())), math.floor(math.log10(c.max())) + 1)] or \
        [float(np.exp(np.log(c).mean()))]


def _optimal(params, budgets, measured):
    with np.errstate(all="ignore"):  # a replicate with α or β near 0 has no finite optimum: dropped later
        return pm.optimal_6nd(params, budgets) if measured is None else pm.optimal_measured(params, budgets, *measured)


def _optima(params: dict, boot: np.ndarray, budgets: list[float], measured) -> list[dict]:
    """N_opt, D_opt (with 95% intervals over the replicates) at each budget, under 6ND or measured FLOPs."""
    n_opt, d_opt = _optimal(params, budgets, measured)
    reps = [_optimal(pm.params_of(t), budgets, measured) for t in boot]
    rows = []
    for i, c in enumerate(budgets):
        row = {"compute": c, "n_opt": float(n_opt[i]), "d_opt": float(d_opt[i]),
               "tokens_per_param": float(d_opt[i] / n_opt[i]), "n_opt_ci95": None, "d_opt_ci95": None}
        if reps:
            for key, j in (("n_opt_ci95", 0), ("d_opt_ci95", 1)):
                row[key] = _spread([r[j][i] for r in reps])[1]
        rows.append(row)
    return rows


def _exact_exponent(params: dict, boot: np.ndarray, budgets: list[float], measured) -> dict:
    """a under exact FLOPs: the slope of log N_opt against log C across the file's budgets."""
    if len(budgets) < 2:
        return {"a_exact": None, "a_exact_ci95": None}
    a = pm.exponent(budgets, _optimal(params, budgets, measured)[0])
    reps = [pm.exponent(budgets, _optimal(pm.params_of(t), budgets, measured)[0]) for t in boot]
    return {"a_exact": a, "a_exact_ci95": _spread([np.nan if r is None else r for r in reps])[1]}


def isoflop_bootstrap(records: list[dict], k: int = 1000, seed: int = 0) -> dict:
    """Approach 2's a (exact FLOPs) with a 95% interval: k resamples of the runs, with replacement within
    each budget, each refitted with the parabolas; a replicate where fewer than two budgets keep an optimum
    inside their ladder has no a and is counted, not used."""
    from .scaling import fit, fit_convention
    full = fit(records)
    rng = np.random.default_rng(seed)
    groups = [[r for r in records if r["budget"] == b] for b in sorted({r["budget"] for r in records})]
    reps = []
    for _ in range(k):
        sample = [g[j] for g in groups for j in rng.integers(0, len(g), len(g))]
        reps.append(fit_convention(sample, "exact")["a"])
    ok = [a for a in reps if a is not None and math.isfinite(a)]
    return {"method": "isoflop", "a": full["a"], "b": full["b"], "bootstrap": k, "bootstrap_seed": seed,
            "replicates_with_a": len(ok),
            "a_ci95": [float(x) for x in np.percentile(ok, [2.5, 97.5])] if len(ok) > 1 else None,
            "a_stderr": float(np.std(ok, ddof=1)) if len(ok) > 1 else None,
            "per_budget": full["per_budget"]}


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ci(ci, spec: str) -> str:
    return "" if ci is None else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def render_parametric(r: dict, source: str) -> str:
    lines = [f"parametric fit (Chinchilla approach 3) of {source}: {r['points']} points"
             + (f" ({r['excluded']} highest-loss excluded)" if r["excluded"] else "")
             + f"; Huber δ = {r['huber_delta']:g} on log loss, L-BFGS from {r['starts']:,} starts",
             f"  {'':<14}{'estimate':>11}{'stderr':>11}  95% interval"]
    specs = {"E": ".4f", "A": ".4g", "B": ".4g", "alpha": ".4f", "beta": ".4f"}  # A, B: heavy-tailed
    for k in pm.NAMES:
        lines.append(f"  {k:<14}{r['params'][k]:>11{specs[k]}}{_fmt(r['stderr'][k], '>11' + specs[k])}  "
                     f"{_ci(r['ci95'][k], specs[k])}")
    lines.append(f"  {'a = β/(α+β)':<14}{r['a']:>11.4f}{_fmt(r['a_stderr'], '>11.4f')}  {_ci(r['a_ci95'], '.4f')}"
                 f"   N_opt ∝ C^a (6ND)")
    lines.append(f"  {'b = α/(α+β)':<14}{r['b']:>11.4f}{_fmt(r['b_stderr'], '>11.4f')}  {_ci(r['b_ci95'], '.4f')}"
                 f"   D_opt ∝ C^b (6ND)")
    if "a_exact" in r:
        lines.append(f"  {'a, exact FLOPs':<14}{_fmt(r['a_exact'], '>11.4f')}{'':>11}  "
                     f"{_ci(r['a_exact_ci95'], '.4f')}   slope of N_opt over the file's budgets")
    lines.append(f"objective (sum of Huber losses): {r['objective']:.8g}")
    for name, p in (r.get("published") or {}).items():
        label = {"hoffmann": "Hoffmann et al.'s published", "besiroglu": "Besiroglu et al.'s refit"}[name]
        vals = ", ".join(f"{k}={p['params'][k]:g}" for k in ("A", "B", "E", "alpha", "beta"))
        lines.append(f"  at {label} parameters ({vals}): {p['objective']:.8g} "
                     f"({p['objective'] / r['objective']:.2f}x the refit's)")
    for key, label in (("optima_6nd", "under C = 6ND"), ("optima_exact", "under the runs' exact FLOPs")):
        if key in r:
            lines.append(f"compute-optimal allocation {label}:")
            lines.append(f"  {'C':>10} {'N_opt':>10} {'95% interval':>24} {'D_opt':>10} {'95% interval':>24} {'D/N':>7}")
            for row in r[key]:
                lines.append(f"  {row['compute']:10.3g} {row['n_opt']:10.4g} {_ci(row['n_opt_ci95'], '.3g'):>24} "
                             f"{row['d_opt']:10.4g} {_ci(row['d_opt_ci95'], '.3g'):>24} {row['tokens_per_param']:7.1f}")
    lost = r["bootstrap"] - r["bootstrap_used"]
    lines.append(f"bootstrap: {r['bootstrap']:,} resamples of the points (seed {r['bootstrap_seed']}), each refitted "
                 f"from {r['bootstrap_starts']} starts" + (f" ({lost} with a non-finite A, B or E left out)" if lost
                                                          else "") + f"; {r['seconds']:.1f} s")
    return "\n".join(lines)


def render_compare(param: dict, iso: dict) -> str:
    lines = ["a (N_opt ∝ C^a, exact FLOPs) on the same runs, both methods:",
             f"  approach 2, IsoFLOP parabolas:  {_fmt(iso['a'], '.3f')}  {_ci(iso['a_ci95'], '.3f')}  "
             f"(bootstrap over runs within budgets: {iso['replicates_with_a']} of {iso['bootstrap']} replicates "
             f"had an a)",
             f"  approach 3, parametric surface: {_fmt(param.get('a_exact'), '.3f')}  "
             f"{_ci(param.get('a_exact_ci95'), '.3f')}  (under 6ND: β/(α+β) = {param['a']:.3f} "
             f"{_ci(param['a_ci95'], '.3f')})"]
    return "\n".join(lines)


def fit_file(path, out: str | None, as_json: bool, bootstrap: int = 1000, seed: int = 0, exclude_highest: int = 0,
             compare: bool = False) -> dict:
    """scaling.py --fit FILE --method parametric | --compare: fit, print the report (or the JSON), and write
    parametric.json (methods.json with --compare) and surface.png into `out` (default: the folder of a
    results.jsonl; a CSV writes files only with --out)."""
    from .fit_plots import plot_surface
    check_options(bootstrap, seed, exclude_highest)
    points = load_points(path)
    if compare and points["records"] is None:
        raise ValueError(f"--compare needs a scaling.py results.jsonl (IsoFLOP budgets); {path} is a CSV")
    result = fit_parametric(points, bootstrap, seed, exclude_highest)
    if compare:
        iso = isoflop_bootstrap(points["records"], bootstrap, seed)
        result = {"method": "compare", "parametric": result, "isoflop": iso}
    folder = Path(out) if out else (Path(path).parent if points["records"] is not None else None)
    written = []
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        name = "methods.json" if compare else "parametric.json"
        (folder / name).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        param = result["parametric"] if compare else result
        written = [folder / name, plot_surface(param, points, folder / "surface.png", result.get("isoflop"))]
    if as_json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        param = result["parametric"] if compare else result
        print(render_parametric(param, str(path)))
        if compare:
            print(render_compare(param, result["isoflop"]))
        if written:
            print("wrote " + ", ".join(str(p) for p in written))
    return result
