"""model/flops/parametric.py and fit_report.py: the parametric fit (Chinchilla approach 3), its bootstrap,
the reproduction of Besiroglu et al. 2024 on Chinchilla's Figure 4 data, and scaling.py --fit's errors."""
import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA
from model.flops import fit_report, parametric as pm

sys.path.insert(0, str(ROOT))
import scaling  # noqa: E402

EPOCH_CSV = SHARED_DATA / "chinchilla_fig4_epoch.csv"  # epoch-research/analyzing-chinchilla, data/svg_extracted_data.csv


def surface_points(params, noise, seed=0):
    """Runs on IsoFLOP ladders (6ND) over 4 decades of compute, loss = L(N, D)·exp(noise·ε), ε ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    n, d = [], []
    for c in np.logspace(18, 22, 5):
        for x in np.logspace(-1.2, 1.2, 9):
            n_opt, _ = pm.optimal_6nd(params, c)
            n.append(float(n_opt) * x)
            d.append(c / (6 * n[-1]))
    n, d = np.array(n), np.array(d)
    loss = (params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"])
    return {"n": n, "tokens": d, "loss": loss * np.exp(noise * rng.standard_normal(len(n))), "flops": None,
            "budget": None, "records": None, "chinchilla": False}


# ----------------------------------------------------------------------------------------------------
# The objective and the optimizer

def test_objective_by_hand_and_gradient_by_finite_differences():
    rng = np.random.default_rng(1)
    logn, logd = rng.uniform(15, 22, 30), rng.uniform(18, 25, 30)
    theta = np.array([[6.0, 7.0, 0.6, 0.35, 0.37]])
    pred = np.log(np.exp(6.0 - 0.35 * logn) + np.exp(7.0 - 0.37 * logd) + np.exp(0.6))
    logl = pred + rng.normal(0, 2e-3, 30)  # residuals on both sides of δ = 1e-3
    r = pred - logl
    huber = np.where(np.abs(r) <= 1e-3, 0.5 * r ** 2, 1e-3 * (np.abs(r) - 0.5e-3))
    w = rng.integers(0, 3, (1, 30)).astype(float)  # bootstrap counts
    f, g = pm.objective(theta, logn, logd, logl, w)
    assert f[0] == pytest.approx((w[0] * huber).sum(), rel=1e-12)
    for i in range(5):
        h = np.zeros((1, 5))
        h[0, i] = 1e-7
        numeric = (pm.objective(theta + h, logn, logd, logl, w)[0] - pm.objective(theta - h, logn, logd, logl, w)[0]) / 2e-7
        assert g[0, i] == pytest.approx(numeric[0], rel=1e-4, abs=1e-10)


def test_batched_lbfgs_matches_scipy_one_start_at_a_time():
    optimize = pytest.importorskip("scipy.optimize")
    pts = surface_points(pm.HOFFMANN, 0.01)
    logn, logd, logl = np.log(pts["n"]), np.log(pts["tokens"]), np.log(pts["loss"])
    starts = pm.grid_starts()[::450]  # 10 starts spread over the grid
    theta, f = pm.minimise(starts, logn, logd, logl, np.ones((len(starts), len(logn))))

    def fun(t):
        fv, gv = pm.objective(t[None], logn, logd, logl, np.ones((1, len(logn))))
        return fv[0], gv[0]
    ref = [optimize.minimize(fun, s, jac=True, method="L-BFGS-B").fun for s in starts]
    assert f.min() <= min(ref) * (1 + 1e-6)  # the best of the batch is as good as scipy's best


def test_optima_closed_form_matches_numeric_minimisation():
    # with 6 FLOPs per parameter per token the numeric optimum must be Hoffmann et al.'s eq. 4
    n_runs = np.array([1e6, 1e8, 1e10])
    c = [1e18, 1e21, 1e24]
    n6, d6 = pm.optimal_6nd(pm.HOFFMANN, c)
    nm, dm = pm.optimal_measured(pm.HOFFMANN, c, n_runs, 6 * n_runs)
    np.testing.assert_allclose(nm, n6, rtol=1e-4)
    np.testing.assert_allclose(dm, d6, rtol=1e-4)
    assert np.allclose(6 * n6 * d6, c)
    # G = (αA/(βB))^(1/(α+β)) by hand at C = 6e20: N_opt = G·(1e20)^(β/(α+β))
    G = (0.34 * 406.4 / (0.28 * 410.7)) ** (1 / 0.62)
    assert pm.optimal_6nd(pm.HOFFMANN, 6e20)[0] == pytest.approx(G * 1e20 ** (0.28 / 0.62))


# ----------------------------------------------------------------------------------------------------
# Recovery and the bootstrap

@pytest.mark.parametrize("truth", [pm.HOFFMANN, {"E": 1.2, "A": 80.0, "B": 3000.0, "alpha": 0.25, "beta": 0.45}])
def test_fit_recovers_known_surfaces_under_noise(truth):
    pts = surface_points(truth, noise=0.005)
    r = fit_report.fit_parametric(pts, bootstrap=0)
    assert r["params"]["alpha"] == pytest.approx(truth["alpha"], abs=0.02)
    assert r["params"]["beta"] == pytest.approx(truth["beta"], abs=0.02)
    assert r["a"] == pytest.approx(truth["beta"] / (truth["alpha"] + truth["beta"]), abs=0.02)
    assert r["objective"] <= pm.objective_at(truth, pts["n"], pts["tokens"], pts["loss"])  # at least as good


def test_bootstrap_is_deterministic_under_a_seed_and_covers_the_truth():
    pts = surface_points(pm.HOFFMANN, noise=0.01, seed=3)
    r = fit_report.fit_parametric(pts, bootstrap=40, seed=7)
    best = pm.theta_of(r["params"])
    args = (pts["n"], pts["tokens"], pts["loss"], best, 40)
    again = pm.bootstrap(*args, seed=7)
    assert np.array_equal(again, pm.bootstrap(*args, seed=7))
    assert not np.array_equal(again, pm.bootstrap(*args, seed=8))
    assert r["ci95"]["alpha"] == pytest.approx(np.percentile(again[:, 3], [2.5, 97.5]).tolist(), rel=1e-6)
    lo, hi = r["ci95"]["alpha"]
    assert lo < r["params"]["alpha"] < hi and r["stderr"]["alpha"] > 0
    assert r["a_ci95"][0] < r["a"] < r["a_ci95"][1]


def test_isoflop_bootstrap_interval_holds_the_exponent():
    from test_scaling import chinchilla_records
    recs = chinchilla_records(0.34, 0.28, [1e18, 1e19, 1e20, 1e21])
    rng = np.random.default_rng(0)
    for r in recs:
        r["val_loss"] *= math.exp(0.002 * rng.standard_normal())
    iso = fit_report.isoflop_bootstrap(recs, k=200, seed=0)
    assert iso["replicates_with_a"] > 150
    assert iso["a_ci95"][0] < 0.28 / 0.62 < iso["a_ci95"][1]


# ----------------------------------------------------------------------------------------------------
# Reproducing Besiroglu et al. 2024 on the points read off Chinchilla's Figure 4

@pytest.mark.slow
@pytest.mark.skipif(not EPOCH_CSV.exists(), reason="needs chinchilla_fig4_epoch.csv (epoch-research/"
                    "analyzing-chinchilla, data/svg_extracted_data.csv) in ../shared/data")
def test_reproduces_besiroglu_et_al_on_the_epoch_data():
    pts = fit_report.load_points(EPOCH_CSV)
    assert len(pts["loss"]) == 245 and pts["chinchilla"]
    r = fit_report.fit_parametric(pts, bootstrap=300, seed=0, exclude_highest=5)
    p, ref = r["params"], pm.BESIROGLU
    assert r["points"] == 240
    assert p["E"] == pytest.approx(ref["E"], abs=0.01)
    assert p["alpha"] == pytest.approx(ref["alpha"], abs=0.005)
    assert p["beta"] == pytest.approx(ref["beta"], abs=0.005)
    assert p["A"] == pytest.approx(ref["A"], rel=0.10) and p["B"] == pytest.approx(ref["B"], rel=0.10)
    for k, (lo, hi) in pm.BESIROGLU_CI95.items():
        ours = r["ci95"][k]
        assert ours[0] < hi and lo < ours[1], (k, ours)  # the intervals overlap
    # Hoffmann et al.'s published parameters fit their own data four times worse than the refit
    assert r["published"]["hoffmann"]["objective"] > 3 * r["objective"]
    assert r["objective"] <= r["published"]["besiroglu"]["objective"]


# ----------------------------------------------------------------------------------------------------
# The command line

def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_text(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def good_csv(tmp_path):
    pts = surface_points(pm.HOFFMANN, noise=0.005)
    rows = [(n, 6 * n * d, l) for n, d, l in zip(pts["n"], pts["tokens"], pts["loss"])]
    return write_csv(tmp_path / "runs.csv", ["Model Size", "Training FLOP", "loss"], rows)


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "missing.csv", "fit file not found"),
    (lambda d: write_csv(d / "a.csv", ["size", "loss"], [(1, 2)]), "no column for N (model size), tokens or training FLOPs"),
    (lambda d: write_csv(d / "b.csv", ["N", "tokens", "loss"], [(1e6, 1e9, "abc")]), "b.csv:2: column 'loss' is not a number"),
    (lambda d: write_csv(d / "c.csv", ["N", "tokens", "loss"], [(-1e6, 1e9, 3.0)] * 8), "point 1 has n = -1000000.0"),
    (lambda d: write_csv(d / "e.csv", ["N", "tokens", "loss"], [(1e6, 1e9, 3.0)] * 5), "at least 6"),
    (lambda d: write_text(d / "f.jsonl", '{"params": 1}\n'), "lacks a number for tokens, val_loss"),
    (lambda d: write_text(d / "g.csv", ""), "empty file"),
])
def test_bad_fit_files_are_one_line_exit_2(tmp_path, make, message, capsys):
    path = make(tmp_path)
    assert scaling.main(["--fit", str(path), "--method", "parametric", "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scaling.py: error:") and message in err, err


@pytest.mark.parametrize("extra,message", [
    (["--exclude-highest", "100"], "leaves none of the 45 points"),
    (["--bootstrap", "-1"], "--bootstrap must be an integer >= 0"),
    (["--compare"], "needs a scaling.py results.jsonl"),
])
def test_bad_fit_options_are_one_line_exit_2(good_csv, extra, message, capsys):
    assert scaling.main(["--fit", str(good_csv), "--method", "parametric", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_compare_needs_two_recipes_or_fit(capsys):
    assert scaling.main(["--compare", "a.toml"]) == 2
    assert "two recipes" in capsys.readouterr().err


def test_cli_parametric_json_is_strict_and_complete(good_csv, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scaling.py"), "--fit", str(good_csv), "--method", "parametric",
                        "--bootstrap", "20", "--json", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert out["method"] == "parametric" and out["points"] == 45 and out["excluded"] == 0
    for key in ("params", "stderr", "ci95"):
        assert set(out[key]) == {"E", "A", "B", "alpha", "beta"}
    assert {"a", "b", "a_ci95", "b_ci95", "objective", "optima_6nd", "published"} <= set(out)
    assert out["published"]["hoffmann"]["objective"] >= out["objective"]  # the data was made from those
    assert (tmp_path / "o" / "parametric.json").exists() and (tmp_path / "o" / "surface.png").stat().st_size > 1000


def test_cli_compare_on_a_results_file(tmp_path, capsys):
    from test_scaling import chinchilla_records
    recs = chinchilla_records(0.34, 0.28, [1e18, 1e19, 1e20])
    for r in recs:
        r["flops"] = 1.2 * r["flops"]  # "exact" FLOPs: 6ND and a fifth more
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert scaling.main(["--fit", str(path), "--compare", "--bootstrap", "30"]) == 0
    text = capsys.readouterr().out
    assert "approach 2, IsoFLOP parabolas" in text and "approach 3, parametric surface" in text
    result = json.loads((tmp_path / "methods.json").read_text())
    assert result["isoflop"]["a"] == pytest.approx(0.28 / 0.62, abs=0.02)
    assert result["parametric"]["a_exact"] == pytest.approx(0.28 / 0.62, abs=0.02)  # exact = 1.2·6ND: same a
    assert (tmp_path / "surface.png").stat().st_size > 1000
