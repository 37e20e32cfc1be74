"""Chinchilla's approach 3: the loss surface L(N, D) = E + A / N^α + B / D^β fitted to every run, with
bootstrap intervals (Hoffmann et al. 2022, App. D.2; Besiroglu et al. 2024, "Chinchilla Scaling: A
replication attempt", arXiv 2404.10102).

The objective, as both papers fit it, in log space with a = log A, b = log B, e = log E:

    minimise over (a, b, e, α, β):   Σ_i Huber_δ( LSE(a − α·log N_i, b − β·log D_i, e) − log L_i ),   δ = 1e-3

LSE is log-sum-exp, so LSE(...) = log(A/N^α + B/D^β + E), the log of the predicted loss. The sum, not the
mean: Besiroglu et al. traced Hoffmann et al.'s too-early stop to a loss scaled down by the mean. Starts: the
grid of Hoffmann et al., α, β ∈ {0, 0.5, ..., 2}, e ∈ {-1, -0.5, ..., 1}, a, b ∈ {0, 5, ..., 25} (4,500
points), each minimised with L-BFGS; the lowest objective wins. All starts run at once: `lbfgs` is L-BFGS
(two-loop recursion, 10 pairs, Armijo backtracking) vectorised over a batch of independent problems.

Bootstrap: K resamples of the points with replacement (seeded), each refitted from the full-data optimum and
from BOOT_STARTS starts drawn from the grid, keeping the best; standard errors are the replicates' standard
deviations and 95% intervals their 2.5 and 97.5 percentiles, for A, B, E, α, β and for the compute-optimal
exponents a = β/(α+β) (N_opt ∝ C^a) and b = α/(α+β) (D_opt ∝ C^b).

Compute-optimal allocation under C = 6ND (Hoffmann et al. eq. 4): N_opt = G·(C/6)^a, D_opt = (C/6)^b / G,
G = (αA / (βB))^(1/(α+β)). Under a measured FLOPs-per-token f(N) (the project's exact count, interpolated
log-log between the runs), C = f(N)·D and N_opt minimises L(N, C / f(N)), found numerically.
"""
from __future__ import annotations

import math

import numpy as np

HUBER_DELTA = 1e-3
NAMES = ("E", "A", "B", "alpha", "beta")
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022, eq. 10
BESIROGLU = {"E": 1.817, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}  # arXiv 2404.10102
BESIROGLU_CI95 = {"alpha": (0.317, 0.373), "beta": (0.331, 0.415)}
BOOT_STARTS = 4  # grid starts per bootstrap refit, besides the full-data optimum
CHUNK = 64  # problems per objective call


def grid_starts() -> np.ndarray:
    """Hoffmann et al.'s grid of initialisations as rows (a, b, e, α, β): 6·6·5·5·5 = 4,500."""
    a = np.arange(0, 30, 5.0)
    e = np.arange(-1, 1.5, 0.5)
    ab = np.arange(0, 2.5, 0.5)
    mesh = np.meshgrid(a, a, e, ab, ab, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def objective(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray,
              weights: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Huber objective and its gradient for a batch of problems: theta (K, 5) rows (a, b, e, α, β), weights
    (K, n) (how many times each point counts: 1, 0 for excluded, bootstrap counts) -> f (K,), grad (K, 5)."""
    a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))  # (K, 1) each
    t1, t2 = a - alpha * logn, b - beta * logd  # (K, n)
    top = np.maximum(np.maximum(t1, t2), e)
    x1, x2, x3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)
    total = x1 + x2 + x3
    r = top + np.log(total) - logl  # log predicted loss - log loss
    clipped = np.clip(r, -delta, delta)  # Huber'(r)
    f = (weights * clipped * (r - 0.5 * clipped)).sum(1)  # Huber(r) = clip·(r - clip/2)
    c = weights * clipped / total
    c1, c2 = c * x1, c * x2
    grad = np.stack([c1.sum(1), c2.sum(1), (c * x3).sum(1), -(c1 * logn).sum(1), -(c2 * logd).sum(1)], 1)
    return f, grad


def lbfgs(fun, x0: np.ndarray, max_iter: int = 1000, memory: int = 10, ftol: float = 1e-10,
          gtol: float = 1e-14) -> tuple[np.ndarray, np.ndarray]:
    """Minimise K independent problems at once: fun(x (k, P), idx (k,)) -> (f (k,), grad (k, P)) for the
    problems idx. L-BFGS with the two-loop recursion and Armijo backtracking from a unit step; a problem
    stops when its objective falls by less than ftol·|f| in an iteration, its gradient is below gtol, or
    no step along its direction decreases it. Returns (x (K, P), f (K,))."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite trials are rejected
        return _lbfgs(fun, np.array(x0, dtype=float), max_iter, memory, ftol, gtol)


def _lbfgs(fun, x, max_iter, memory, ftol, gtol):
    K, P = x.shape
    f, g = fun(x, np.arange(K))
    S, Y, rho = np.zeros((memory, K, P)), np.zeros((memory, K, P)), np.zeros((memory, K))
    gamma = 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1e-12)  # first step: unit length
    active = np.isfinite(f)
    for it in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        d = -_two_loop(g[idx], S[:, idx], Y[:, idx], rho[:, idx], gamma[idx], it, memory)
        slope = (d * g[idx]).sum(1)
        bad = ~(slope < 0)  # not a descent direction (or not finite): restart from the gradient
        d[bad] = -g[idx][bad] * gamma[idx][bad, None]
        slope[bad] = (d[bad] * g[idx][bad]).sum(1)
        step, f_new, g_new = _backtrack(fun, x[idx], f[idx], d, slope, idx)
        moved = step > 0
        s = step[:, None] * d
        y = g_new - g[idx]
        sy = (s * y).sum(1)
        ok = moved & (sy > 1e-12 * np.linalg.norm(s, axis=1) * np.linalg.norm(y, axis=1)) & np.isfinite(1.0 / sy)
        slot = it % memory
        S[slot, idx], Y[slot, idx] = np.where(ok[:, None], s, 0.0), np.where(ok[:, None], y, 0.0)
        rho[slot, idx] = np.where(ok, 1.0 / np.where(ok, sy, 1.0), 0.0)  # 0: the pair is skipped
        gamma[idx] = np.where(ok, sy / np.maximum((y * y).sum(1), 1e-300), gamma[idx])
        drop = f[idx] - np.where(moved, f_new, f[idx])
        x[idx[moved]] += s[moved]
        f[idx[moved]], g[idx[moved]] = f_new[moved], g_new[moved]
        done = ~moved | (drop <= ftol * np.abs(f[idx])) | (np.abs(g[idx]).max(1) <= gtol)
        active[idx[done]] = False
    return x, f


def _two_loop(g, S, Y, rho, gamma, it, memory):
    """H·g for the L-BFGS inverse Hessian of each problem (pairs with rho = 0 are skipped)."""
    q = g.copy()
    order = [(it - 1 - j) % memory for j in range(min(it, memory))]  # newest first
    alphas = []
    for j in order:
        al = rho[j] * (S[j] * q).sum(1)
        q -= al[:, None] * Y[j]
        alphas.append(al)
    r = gamma[:, None] * q
    for j, al in zip(reversed(order), reversed(alphas)):
        be = rho[j] * (Y[j] * r).sum(1)
        r += (al - be)[:, None] * S[j]
    return r


def _backtrack(fun, x, f, d, slope, idx, c1: float = 1e-4, tries: int = 40):
    """Armijo backtracking from a unit step, halving, for every problem at once; step 0 where none works."""
    k = len(idx)
    step, f_new, g_new = np.zeros(k), f.copy(), np.zeros_like(x)
    t = np.ones(k)
    todo = np.arange(k)
    for _ in range(tries):
        ft, gt = fun(x[todo] + t[todo, None] * d[todo], idx[todo])
        good = np.isfinite(ft) & (ft <= f[todo] + c1 * t[todo] * slope[todo])
        hit = todo[good]
        step[hit], f_new[hit], g_new[hit] = t[hit], ft[good], gt[good]
        todo = todo[~good]
        if todo.size == 0:
            break
        t[todo] *= 0.5
    return step, f_new, g_new


def minimise(starts: np.ndarray, logn, logd, logl, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS from every row of starts (K, 5); weights (K, n). Returns (theta (K, 5), objective (K,)).
    The objective runs on blocks of CHUNK problems, so that its (CHUNK, n) temporaries stay in cache."""
    def fun(th, idx):
        parts = [objective(th[i:i + CHUNK], logn, logd, logl, weights[idx[i:i + CHUNK]])
                 for i in range(0, len(idx), CHUNK)]
        return np.concatenate([f for f, _ in parts]), np.concatenate([g for _, g in parts])
    return lbfgs(fun, starts)


def fit_surface(n, d, loss, starts: np.ndarray | None = None) -> dict:
    """The best of L-BFGS runs from every grid start on the points (N, D, L): {"theta": (a, b, e, α, β),
    "params": {E, A, B, alpha, beta}, "objective"}."""
    logn, logd, logl = (np.log(np.asarray(v, dtype=float)) for v in (n, d, loss))
    starts = grid_starts() if starts is None else np.atleast_2d(starts)
    theta, f = minimise(starts, logn, logd, logl, np.ones((len(starts), len(logn))))
    best = int(np.nanargmin(f))
    if not (np.isfinite(theta[best]).all() and (theta[best][:3] < 700).all()):
        raise ValueError(f"the surface fit ran off to non-finite parameters (log A, log B, log E = "
                         f"{theta[best][:3].round(1).tolist()}): these points do not determine L(N, D)")
    return {"theta": theta[best], "params": params_of(theta[best]), "objective": float(f[best])}


def params_of(theta) -> dict:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def theta_of(params: dict) -> np.ndarray:
    return np.array([math.log(params["A"]), math.log(params["B"]), math.log(params["E"]), params["alpha"],
                     params["beta"]])


def objective_at(params: dict, n, d, loss) -> float:
    """The objective at given parameters (e.g. Hoffmann et al.'s published ones) on the points."""
    logn, logd, logl = (np.log(np.asarray(v, dtype=float)) for v in (n, d, loss))
    f, _ = objective(theta_of(params)[None], logn, logd, logl, np.ones((1, len(logn))))
    return float(f[0])


def bootstrap(n, d, loss, theta_best: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k refits on resamples of the points (with replacement, numpy's PCG64 seeded with `seed`), each from
    theta_best and BOOT_STARTS grid starts, the best kept: (k, 5) rows (a, b, e, α, β)."""
    logn, logd, logl = (np.log(np.asarray(v, dtype=float)) for v in (n, d, loss))
    m = len(logn)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, m, size=(k, m))
    counts = np.zeros((k, m))
    np.add.at(counts, (np.repeat(np.arange(k), m), picks.ravel()), 1.0)
    grid = grid_starts()
    starts = np.concatenate([np.repeat(theta_best[None], k, 0)[:, None],
                             grid[rng.integers(0, len(grid), size=(k, BOOT_STARTS))]], axis=1)  # (k, S, 5)
    per = starts.shape[1]
    theta, f = minimise(starts.reshape(-1, 5), logn, logd, logl, np.repeat(counts, per, axis=0))
    best = np.nanargmin(f.reshape(k, per), axis=1)
    return theta.reshape(k, per, 5)[np.arange(k), best]


def optimal_6nd(params: dict, compute) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) at compute C under C = 6ND, Hoffmann et al. eq. 4 (arrays broadcast over C)."""
    al, be, A, B = params["alpha"], params["beta"], params["A"], params["B"]
    G = np.float64(al * A / (be * B)) ** (1.0 / (al + be))  # nan, not complex, for a negative ratio
    c6 = np.asarray(compute, dtype=float) / 6.0
    return G * c6 ** (be / (al + be)), c6 ** (al / (al + be)) / G


def optimal_measured(params: dict, compute, n_runs, per_token_runs) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) at compute C when a run of N parameters costs f(N) FLOPs per token, f interpolated
    log-log through the runs (n_runs, per_token_runs) and extended linearly in log-log beyond them:
    N_opt minimises L(N, C / f(N)) on a fine log grid refined by a parabola through the three lowest."""
    k, q = np.polyfit(np.log(n_runs), np.log(per_token_runs), 1)
    log_n = np.linspace(0.0, 40.0, 8001)  # N from 1 to 2e17, 0.005 in ln N
    out_n, out_d = [], []
    for c in np.atleast_1d(np.asarray(compute, dtype=float)):
        log_d = math.log(c) - (q + k * log_n)
        loss = (params["E"] + params["A"] * np.exp(-params["alpha"] * log_n)
                + params["B"] * np.exp(-params["beta"] * log_d))
        i = int(np.clip(np.argmin(loss), 1, len(log_n) - 2))
        p2, p1, _ = np.polyfit(log_n[i - 1:i + 2], loss[i - 1:i + 2], 2)
        x = -p1 / (2 * p2) if p2 > 0 else log_n[i]
        out_n.append(math.exp(x))
        out_d.append(c / math.exp(q + k * x))
    return np.array(out_n), np.array(out_d)


def exponent(compute, values) -> float | None:
    """Least-squares slope of log values against log compute; None with fewer than two distinct C."""
    if len(set(np.asarray(compute).tolist())) < 2:
        return None
    return float(np.polyfit(np.log(compute), np.log(values), 1)[0])
