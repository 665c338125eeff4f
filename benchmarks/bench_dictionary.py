"""Benchmark of federated dictionary learning (issue 2, item 5).

One run prints, on one machine:

(a) the clients' batched lasso coder (``batch_lasso_cd``) against
    ``sklearn.decomposition.sparse_encode`` with ``lasso_lars`` and
    ``lasso_cd``: time and mean objective;
(b) FedMM with one client against
    ``sklearn.decomposition.DictionaryLearning(fit_algorithm='cd',
    max_iter=30, tol=0)`` on the same 5000 x 40 rows: time for FedMM to reach
    scikit-learn's final objective, and final objectives;
(c) surrogate against parameter aggregation on homogeneous and
    heterogeneous clients (10 x 500 rows): objective per round and atoms
    recovered.

Usage::

    PYTHONPATH=. python benchmarks/bench_dictionary.py          # full run
    PYTHONPATH=. python benchmarks/bench_dictionary.py --quick  # smoke test

Targets (issue 2), checked on the printed numbers, never asserted:

- the batched coder is at least 5x faster than ``lasso_lars`` with the same
  objective within 1e-4 relative;
- FedMM with one client reaches scikit-learn's 30-iteration objective in at
  most half of scikit-learn's wall time;
- heterogeneous clients: surrogate aggregation's objective after 30 rounds
  is at most 0.6x that of parameter aggregation.

Objectives are all on one footing: the mean over rows of
``1/2 ||x - h D||^2 + alpha ||h||_1`` with the codes ``h`` recomputed by the
fit-time coder (``batch_lasso_cd``, tol 1e-4), which is what
``FederatedDictionaryLearning.score`` returns (with a minus sign).
scikit-learn's ``error_`` is a *sum* over rows, computed with the codes of
the previous dictionary; it is divided by ``n_samples`` where shown.
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import warnings

import numpy as np
import scipy
import sklearn
from sklearn.decomposition import DictionaryLearning, sparse_encode
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_info, threadpool_limits

import skfedmm
from skfedmm import FederatedDictionaryLearning
from skfedmm.datasets import atom_recovery, make_sparse_coded_clients
from skfedmm.problems.dictionary import batch_lasso_cd, lasso_objective

ALPHA = 0.2

FULL = dict(
    coder_rows=5000, coder_features=64, coder_atoms=100, coder_nonzero=5, repeat=3,
    n_clients=10, n_samples=500, n_features=40, n_components=30, atoms_per_client=8,
    n_nonzero=3, rounds=30, every=5,
)
QUICK = dict(FULL, coder_rows=500, repeat=1, n_clients=4, n_samples=100, rounds=10)


# ----------------------------------------------------------------- helpers
def objective(X, dictionary, alpha=ALPHA):
    """Mean lasso objective per row, codes from the fit-time coder (= -score)."""
    code = batch_lasso_cd(X, dictionary, alpha, tol=1e-4, max_iter=1000)
    return float(np.mean(lasso_objective(X, code, dictionary, alpha)))


def table(header, rows, left=1):
    """Aligned text table; the first ``left`` columns left-aligned."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def fmt(x, spec=".5f"):
    return "-" if x is None or not np.isfinite(x) else format(x, spec)


def verdict(ok):
    return "MET" if ok else "NOT MET"


def section(title):
    print()
    print(title)
    print("=" * len(title))


def machine():
    print("Machine")
    print("-------")
    print(f"date            {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"command         {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    try:
        n_avail = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n_avail = os.cpu_count()
    print(f"nproc           {n_avail} (os.cpu_count() = {os.cpu_count()})")
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    print(f"CPU             {model}")
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    print(f"load average    {load} (at start)")
    print(f"platform        {platform.platform()}")
    print(f"python          {platform.python_version()}")
    print(
        f"versions        numpy {np.__version__}, scipy {scipy.__version__}, "
        f"scikit-learn {sklearn.__version__}, skfedmm {skfedmm.__version__}"
    )
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    print(f"git             {rev or 'unknown'}")
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            print(
                f"BLAS            {pool.get('internal_api')} {pool.get('version')} "
                f"({pool.get('architecture')}, {pool.get('threading_layer')}, "
                f"{pool.get('num_threads')} threads; {os.path.basename(pool.get('filepath', ''))})"
            )
        else:
            print(
                f"threadpool      {pool.get('user_api')}/{pool.get('internal_api')} "
                f"{pool.get('num_threads')} threads ({os.path.basename(pool.get('filepath', ''))})"
            )


def best_time(func, repeat):
    """(minimum wall time over ``repeat`` calls, result of the last call)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = func()
        times.append(time.perf_counter() - t0)
    return min(times), out


def blas_threads():
    return max(p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas")


# ------------------------------------------------------------------ (a)
def bench_coder(cfg, seed):
    n, d, k = cfg["coder_rows"], cfg["coder_features"], cfg["coder_atoms"]
    section(f"(a) Sparse coding of {n} x {d} rows with {k} unit-norm atoms (alpha={ALPHA})")
    (X,), D = make_sparse_coded_clients(
        1, n, d, k, n_nonzero=cfg["coder_nonzero"], heterogeneous=False, random_state=seed,
    )
    assert np.allclose(np.linalg.norm(D, axis=1), 1)
    print(
        f"Rows: {cfg['coder_nonzero']} Gaussian nonzeros on the atoms plus noise 0.05. Time: best of "
        f"{cfg['repeat']} calls. Objective: mean over rows of 1/2||x - hD||^2 + alpha||h||_1."
    )
    coders = [
        ("batch_lasso_cd (skfedmm)", lambda: batch_lasso_cd(X, D, ALPHA)),
        ("sparse_encode lasso_lars", lambda: sparse_encode(X, D, algorithm="lasso_lars", alpha=ALPHA)),
        ("sparse_encode lasso_cd", lambda: sparse_encode(X, D, algorithm="lasso_cd", alpha=ALPHA)),
    ]
    rows, results = [], {}
    default_threads = blas_threads()
    for threads in (None, 1):
        label = f"{default_threads} (default)" if threads is None else "1 (limited)"
        res = {}
        with threadpool_limits(limits=threads):
            for name, func in coders:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    t, code = best_time(func, cfg["repeat"])
                res[name] = dict(
                    time=t, obj=float(np.mean(lasso_objective(X, code, D, ALPHA))),
                    nnz=float(np.mean(np.count_nonzero(code, axis=1))),
                )
        ref_cd = res["sparse_encode lasso_cd"]["obj"]
        t_lars = res["sparse_encode lasso_lars"]["time"]
        for name, _ in coders:
            r = res[name]
            rows.append([
                name, label, f"{r['time']:.3f}", f"{r['obj']:.8f}",
                f"{(r['obj'] - ref_cd) / ref_cd:+.2e}", f"{t_lars / r['time']:.2f}x", f"{r['nnz']:.2f}",
            ])
        results[threads] = res
    print()
    print(table(
        ["coder", "BLAS threads", "time (s)", "mean objective", "rel. diff vs lasso_cd",
         "speedup vs lasso_lars", "nonzeros/row"],
        rows, left=2,
    ))
    res = results[None]
    ours = res["batch_lasso_cd (skfedmm)"]
    speedup = res["sparse_encode lasso_lars"]["time"] / ours["time"]
    rel = max(
        abs(ours["obj"] - res[ref]["obj"]) / res[ref]["obj"]
        for ref in ("sparse_encode lasso_cd", "sparse_encode lasso_lars")
    )
    res1 = results[1]
    speedup1 = res1["sparse_encode lasso_lars"]["time"] / res1["batch_lasso_cd (skfedmm)"]["time"]
    print()
    print(
        f"Target (a) >= 5x faster than lasso_lars, objective within 1e-4 relative: "
        f"{verdict(speedup >= 5 and rel <= 1e-4)} with the default BLAS threads "
        f"(speedup {speedup:.2f}x, largest relative objective difference {rel:.1e}); "
        f"with BLAS limited to 1 thread the speedup is {speedup1:.2f}x."
    )
    return dict(speedup=speedup, rel=rel, speedup1=speedup1)


# ------------------------------------------------------------------ (b)
def fit_fedmm_timed(X, cfg, seed):
    """FedMM on one client; wall times of every round measured by a callback."""
    marks = []
    t0 = None

    def callback(info):
        marks.append(time.perf_counter() - t0)
        return False

    model = FederatedDictionaryLearning(
        n_components=cfg["n_components"], alpha=ALPHA, max_iter=cfg["rounds"], tol=0,
        random_state=seed, callback=callback,
    )
    t0 = time.perf_counter()
    model.fit(X)
    wall = time.perf_counter() - t0
    return model, np.array(marks), wall


def bench_one_client(cfg, seed):
    clients, D = make_sparse_coded_clients(
        cfg["n_clients"], cfg["n_samples"], cfg["n_features"], cfg["n_components"],
        atoms_per_client=cfg["atoms_per_client"], n_nonzero=cfg["n_nonzero"], random_state=seed,
    )
    X = np.vstack(clients)
    n, R = X.shape[0], cfg["rounds"]
    section(
        f"(b) One client against sklearn DictionaryLearning(fit_algorithm='cd', max_iter={R}, tol=0) "
        f"on {n} x {X.shape[1]} rows"
    )
    print(
        f"Data: the pooled rows of (c)'s heterogeneous clients; {cfg['n_components']} atoms, "
        f"alpha={ALPHA}; both with the default BLAS threads, and again with BLAS limited to 1 thread."
    )
    out = {}
    rows = []
    per_round = None
    for threads in (None, 1):
        label = f"{blas_threads()} (default)" if threads is None else "1 (limited)"
        with threadpool_limits(limits=threads):
            sk = DictionaryLearning(
                n_components=cfg["n_components"], alpha=ALPHA, fit_algorithm="cd", max_iter=R, tol=0,
                random_state=seed,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                t0 = time.perf_counter()
                sk.fit(X)
                t_sk = time.perf_counter() - t0
            model, marks, wall = fit_fedmm_timed(X, cfg, seed)
        sk_final = objective(X, sk.components_)
        fed_final = objective(X, model.components_)
        score_check = abs(-model.score(X) - fed_final)
        hist = model.history_["objective"]
        # history row r (r >= 1) is the exact objective at the dictionary
        # broadcast in round r; marks[r] is the time when round r ended
        # (marks[0]: the initial round's end; the callback sees it too).
        reached = [r for r in range(1, len(hist)) if hist[r] <= sk_final]
        t_reach = marks[reached[0]] if reached else np.nan
        r_reach = reached[0] if reached else None
        rows.append([
            "sklearn DictionaryLearning (cd)", label, f"{t_sk:.2f}", "-", "-",
            f"{sk.error_[-1] / n:.5f}", f"{sk_final:.5f}", f"{atom_recovery(D, sk.components_):.2f}",
        ])
        rows.append([
            "FedMM, 1 client", label, f"{wall:.2f}", fmt(t_reach, ".2f"),
            "-" if r_reach is None else str(r_reach), f"{hist[-1]:.5f}", f"{fed_final:.5f}",
            f"{atom_recovery(D, model.components_):.2f}",
        ])
        out[threads] = dict(t_sk=t_sk, t_reach=t_reach, r_reach=r_reach, sk_final=sk_final,
                            fed_final=fed_final, wall=wall, score_check=score_check)
        if threads is None:
            per_round = (np.asarray(sk.error_) / n, hist)
    print()
    print(table(
        ["method", "BLAS threads", f"time for {R} it. (s)", "time to reach sklearn (s)",
         "at round", "last recorded obj.", "final objective", "atoms recovered"],
        rows, left=2,
    ))
    print(
        "\n'last recorded obj.': sklearn's error_[-1] / n_samples (codes of the previous dictionary), "
        "FedMM's history_ objective of its last round (the dictionary broadcast in that round).\n"
        "'final objective': the final components_ re-encoded with the fit-time coder, as "
        "FederatedDictionaryLearning.score does (|-score - this| = "
        f"{out[None]['score_check']:.1e}). 'time to reach sklearn': wall time from the call to fit "
        "until the end of the first round whose objective is <= sklearn's final objective (callback)."
    )
    sk_err, hist = per_round
    every = cfg["every"]
    marks_rows = []
    for u in range(0, R + 1, every):
        marks_rows.append([
            str(u), fmt(sk_err[u - 1]) if u >= 1 else "-", fmt(hist[u]) if u < len(hist) else "-",
        ])
    print()
    print("Objective after u dictionary updates (default BLAS threads):")
    print(table(["u", "sklearn error_[u-1] / n", "FedMM history objective[u]"], marks_rows))
    res = out[None]
    ok = np.isfinite(res["t_reach"]) and res["t_reach"] <= 0.5 * res["t_sk"]
    res1 = out[1]
    print()
    print(
        f"Target (b) FedMM (1 client) reaches sklearn's {R}-iteration objective "
        f"({res['sk_final']:.5f}) in at most half of sklearn's wall time: {verdict(ok)} with the "
        f"default BLAS threads ({fmt(res['t_reach'], '.2f')} s at round {res['r_reach']} vs "
        f"{res['t_sk']:.2f} s, ratio {res['t_reach'] / res['t_sk']:.2f}); with 1 BLAS thread "
        f"{fmt(res1['t_reach'], '.2f')} s vs {res1['t_sk']:.2f} s (ratio "
        f"{res1['t_reach'] / res1['t_sk']:.2f}). FedMM's final objective after {R} rounds: "
        f"{res['fed_final']:.5f} (sklearn: {res['sk_final']:.5f})."
    )
    return out


# ------------------------------------------------------------------ (c)
def bench_aggregation(cfg, seed):
    R, every = cfg["rounds"], cfg["every"]
    section(
        f"(c) Surrogate vs parameter aggregation, {cfg['n_clients']} clients x {cfg['n_samples']} rows, "
        f"{R} rounds"
    )
    print(
        f"{cfg['n_features']} features, {cfg['n_components']}-atom ground truth, {cfg['n_nonzero']} nonzeros "
        f"per row; heterogeneous: each client uses {cfg['atoms_per_client']} atoms; homogeneous: all "
        f"atoms. alpha={ALPHA}, full participation, no compression, tol=0 (exactly {R} rounds; the "
        "parameter baseline's objective can increase, which would stop it early otherwise), "
        "local_steps=1."
    )
    runs = {}
    summary = []
    for setting, het in (("homogeneous", False), ("heterogeneous", True)):
        clients, D = make_sparse_coded_clients(
            cfg["n_clients"], cfg["n_samples"], cfg["n_features"], cfg["n_components"],
            atoms_per_client=cfg["atoms_per_client"], n_nonzero=cfg["n_nonzero"],
            heterogeneous=het, random_state=seed,
        )
        X = np.vstack(clients)
        for agg in ("surrogate", "parameter"):
            model = FederatedDictionaryLearning(
                n_components=cfg["n_components"], alpha=ALPHA, max_iter=R, tol=0, aggregation=agg,
                random_state=seed,
            )
            t0 = time.perf_counter()
            model.fit(clients)
            wall = time.perf_counter() - t0
            final = objective(X, model.components_)
            runs[setting, agg] = dict(
                hist=model.history_["objective"], final=final,
                recovered=atom_recovery(D, model.components_), wall=wall,
                bits=model.bits_up_ + model.bits_down_,
            )
            r = runs[setting, agg]
            summary.append([
                setting, agg, f"{final:.5f}", f"{r['recovered']:.2f}",
                f"{round(r['recovered'] * cfg['n_components'])}/{cfg['n_components']}",
                f"{r['bits'] / 1e6:.1f}", f"{wall:.2f}",
            ])
    keys = list(runs)
    rows = []
    for t in range(0, R + 1, every):
        rows.append([str(t)] + [fmt(runs[k]["hist"][t]) if t < len(runs[k]["hist"]) else "-" for k in keys])
    print()
    print("Objective per round (history_ objective: exact, all rows of all clients, at the")
    print("dictionary broadcast in that round; round 0 is the initialization, '-' = not computed):")
    print(table(["round"] + [f"{s[:5]}. {a}" for s, a in keys], rows))
    print()
    print(f"After {R} rounds (final components_, re-encoded with the fit-time coder on the pooled rows):")
    print(table(
        ["data", "aggregation", "objective", "recovered", "atoms", "Mbit sent", "time (s)"], summary, left=2,
    ))
    het_ratio = runs["heterogeneous", "surrogate"]["final"] / runs["heterogeneous", "parameter"]["final"]
    hom_ratio = runs["homogeneous", "surrogate"]["final"] / runs["homogeneous", "parameter"]["final"]
    print()
    print(
        f"Target (c) heterogeneous: surrogate objective after {R} rounds <= 0.6x parameter's: "
        f"{verdict(het_ratio <= 0.6)} (ratio {het_ratio:.3f}: "
        f"{runs['heterogeneous', 'surrogate']['final']:.5f} vs "
        f"{runs['heterogeneous', 'parameter']['final']:.5f}); homogeneous ratio {hom_ratio:.3f}."
    )
    return dict(het_ratio=het_ratio, hom_ratio=hom_ratio)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    print(f"bench_dictionary.py{' --quick' if args.quick else ''}: skfedmm federated dictionary learning")
    print()
    machine()
    print()
    print(
        "Note: all objectives are means per row of 1/2||x - hD||^2 + alpha||h||_1 on one footing. "
        "FederatedDictionaryLearning.score re-encodes X with the fit-time coder (batch_lasso_cd, "
        "tol 1e-4); every final dictionary below (ours and sklearn's) is scored that way. "
        "sklearn's error_ is a sum over rows: it is divided by n_samples."
    )
    a = bench_coder(cfg, args.seed)
    b = bench_one_client(cfg, args.seed)
    c = bench_aggregation(cfg, args.seed)
    section("Summary")
    print(f"(a) coder speedup vs lasso_lars {a['speedup']:.2f}x (1 BLAS thread: {a['speedup1']:.2f}x), "
          f"objective within {a['rel']:.1e} relative: {verdict(a['speedup'] >= 5 and a['rel'] <= 1e-4)}")
    bt = b[None]
    ok_b = np.isfinite(bt["t_reach"]) and bt["t_reach"] <= 0.5 * bt["t_sk"]
    print(f"(b) time to sklearn's objective / sklearn's time = {bt['t_reach'] / bt['t_sk']:.2f}: {verdict(ok_b)}")
    print(f"(c) heterogeneous surrogate / parameter objective = {c['het_ratio']:.3f}: "
          f"{verdict(c['het_ratio'] <= 0.6)}")
    print(f"total benchmark time {time.perf_counter() - t0:.1f} s")
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    print(f"load average at the end: {load} (1, 5, 15 min; this run uses up to {blas_threads()} threads)")


if __name__ == "__main__":
    main()
