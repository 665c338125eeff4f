"""Benchmark of FederatedGaussianMixture and FederatedKMeans (issue 10).

One run prints, on one machine:

(a) heterogeneous clients (each holds 2 of the mixture's 8 components):
    surrogate aggregation (FedMM, exactly EM / Lloyd on the pooled rows with
    exact rounds), parameter averaging (clients run ``local_steps`` local
    EM / Lloyd steps from the broadcast model, components matched to it by
    the Hungarian algorithm, the server averages the parameters) and the
    pooled scikit-learn fit (``GaussianMixture`` / ``KMeans`` on all rows):
    held-out log-likelihood per row (inertia per row for k-means) and
    component recovery, over ``--runs`` seeds;
(b) speed, one client against scikit-learn on the same rows and the same
    initialization, same number of iterations (``tol=0``, the iteration
    counts are printed): ``GaussianMixture`` for the four covariance types
    and ``KMeans(algorithm="lloyd")``. The machine is shared (other
    processes run on its 2 cores), so the fits are interleaved (ours,
    scikit-learn's, ours, ...) and repeated, and the median and the minimum
    are reported, with BLAS/OpenMP limited to one thread (the stable
    comparison) and with the default threads;
(c) compression and partial participation ablation on the heterogeneous
    Gaussian mixture: exact objective (negative log-likelihood per row,
    evaluated every round) against bits sent by the clients, with and
    without control variates (``cv_rate=0``); figure
    ``mixture_ablation_<mode>.png``.

Usage::

    PYTHONPATH=. python benchmarks/bench_mixture.py            # 10 runs
    PYTHONPATH=. python benchmarks/bench_mixture.py --quick    # smoke test

Writes ``benchmarks/results/mixture_<mode>.txt`` (this output),
``mixture_<mode>.json`` (configuration, machine, every number) and the
figure. Targets (issue 10), read off the printed numbers, never asserted:
surrogate aggregation within 1% of the pooled fit's held-out
log-likelihood; one-client fits within 1.0x of scikit-learn's time.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import numpy as np
import scipy
import sklearn
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

import skfedmm
from skfedmm import FederatedGaussianMixture, FederatedKMeans

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

FULL = dict(n_clients=10, n_components=8, n_features=5, rows=400, test_rows=400, max_iter=100,
            speed_gmm=(20000, 10, 8, 30), speed_kmeans=(100000, 10, 8, 50), repeats=7,
            ablation_rounds=60)
QUICK = dict(n_clients=6, n_components=4, n_features=3, rows=120, test_rows=120, max_iter=20,
             speed_gmm=(2000, 5, 4, 5), speed_kmeans=(5000, 5, 4, 5), repeats=2,
             ablation_rounds=8)


# ------------------------------------------------------------------- data
def make_mixture(cfg, seed):
    """True means (well separated), covariances; client c holds components c, c+1 (mod K)."""
    rng = np.random.default_rng(seed)
    K, d = cfg["n_components"], cfg["n_features"]
    means = rng.uniform(-10, 10, size=(K, d))
    covs = []
    for _ in range(K):
        A = rng.normal(size=(d, d))
        covs.append(A @ A.T / d + 0.5 * np.eye(d))
    owners = [((c % K), ((c + 1) % K)) for c in range(cfg["n_clients"])]

    def draw(n_rows, rng):
        out = []
        for comps in owners:
            rows = []
            for j, comp in enumerate(comps):
                m = n_rows // len(comps) + (j < n_rows % len(comps))
                rows.append(rng.multivariate_normal(means[comp], covs[comp], m))
            out.append(np.vstack(rows))
        return out

    train = draw(cfg["rows"], rng)
    test = np.vstack(draw(cfg["test_rows"], rng))  # the same clients' distribution, fresh rows
    return train, test, means


def recovered(true_means, fitted_means, radius=1.0):
    """Fraction of true components matched (Hungarian) by a fitted mean within ``radius``."""
    cost = ((true_means[:, None, :] - fitted_means[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return float(np.mean(np.sqrt(cost[rows, cols]) < radius))


# -------------------------------------------------------------- (a) quality
def run_quality(cfg, seed):
    train, test, true_means = make_mixture(cfg, seed)
    pooled = np.vstack(train)
    K = cfg["n_components"]
    out = {}
    common = dict(max_iter=cfg["max_iter"], random_state=seed)
    gmm = {
        "surrogate": FederatedGaussianMixture(K, **common),
        "parameter (1 local step)": FederatedGaussianMixture(K, aggregation="parameter", **common),
        "parameter (5 local steps)": FederatedGaussianMixture(K, aggregation="parameter",
                                                              local_steps=5, **common),
    }
    for name, est in gmm.items():
        t = time.perf_counter()
        est.fit(train)
        out[("gmm", name)] = dict(loglik=est.score(test), recovered=recovered(true_means, est.means_),
                                  n_iter=int(est.n_iter_), time=time.perf_counter() - t)
    t = time.perf_counter()
    ref = GaussianMixture(K, **common).fit(pooled)
    out[("gmm", "pooled sklearn")] = dict(loglik=ref.score(test), recovered=recovered(true_means, ref.means_),
                                          n_iter=int(ref.n_iter_), time=time.perf_counter() - t)
    km = {
        "surrogate": FederatedKMeans(K, **common),
        "parameter (1 local step)": FederatedKMeans(K, aggregation="parameter", **common),
        "parameter (5 local steps)": FederatedKMeans(K, aggregation="parameter", local_steps=5,
                                                     **common),
    }
    for name, est in km.items():
        t = time.perf_counter()
        est.fit(train)
        out[("kmeans", name)] = dict(inertia=-est.score(test) / test.shape[0],
                                     recovered=recovered(true_means, est.cluster_centers_),
                                     n_iter=int(est.n_iter_), time=time.perf_counter() - t)
    t = time.perf_counter()
    ref = KMeans(K, **common).fit(pooled)
    out[("kmeans", "pooled sklearn")] = dict(inertia=-ref.score(test) / test.shape[0],
                                             recovered=recovered(true_means, ref.cluster_centers_),
                                             n_iter=int(ref.n_iter_), time=time.perf_counter() - t)
    return out


# ---------------------------------------------------------------- (b) speed
def speed_data(n, d, k, seed=0, scale=1.5):
    rng = np.random.default_rng(seed)
    C = rng.normal(scale=scale, size=(k, d))
    X = C[rng.integers(k, size=n)] + rng.normal(size=(n, d))
    return X, X[rng.choice(n, k, replace=False)].copy()


def gmm_pair(covariance_type, X, init, n_iter):
    k, d = init.shape
    prec = {"full": np.repeat(np.eye(d)[None], k, 0), "tied": np.eye(d),
            "diag": np.ones((k, d)), "spherical": np.ones(k)}[covariance_type]
    kw = dict(covariance_type=covariance_type, max_iter=n_iter, tol=0,
              weights_init=np.full(k, 1.0 / k), means_init=init, precisions_init=prec)
    return (lambda: FederatedGaussianMixture(k, **kw).fit(X),
            lambda: GaussianMixture(k, **kw).fit(X))


def kmeans_pair(X, init, n_iter):
    k = init.shape[0]
    return (lambda: FederatedKMeans(k, init=init, max_iter=n_iter, tol=0).fit(X),
            lambda: KMeans(k, init=init, n_init=1, max_iter=n_iter, tol=0, algorithm="lloyd").fit(X))


def interleaved(ours, theirs, repeats):
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (theirs, t_theirs)):
            t = time.perf_counter()
            est = fn()
            times.append(time.perf_counter() - t)
            if fn is ours:
                it_ours = est.n_iter_
            else:
                it_theirs = est.n_iter_
    return dict(ours=t_ours, sklearn=t_theirs, n_iter_ours=int(it_ours), n_iter_sklearn=int(it_theirs))


def run_speed(cfg):
    out = {}
    n, d, k, it = cfg["speed_gmm"]
    Xg, init_g = speed_data(n, d, k)
    n2, d2, k2, it2 = cfg["speed_kmeans"]
    Xk, init_k = speed_data(n2, d2, k2, seed=1)
    # well-separated clusters: few rows near a boundary (the clients' bounds pay)
    Xs, init_s = speed_data(n2, d2, k2, seed=1, scale=4.0)
    for threads in ("1", "default"):
        ctx = threadpool_limits(1) if threads == "1" else threadpool_limits(None)
        with ctx:
            for ct in ("full", "tied", "diag", "spherical"):
                out[(threads, f"GaussianMixture {ct}")] = interleaved(*gmm_pair(ct, Xg, init_g, it),
                                                                     cfg["repeats"])
            out[(threads, "KMeans lloyd")] = interleaved(*kmeans_pair(Xk, init_k, it2), cfg["repeats"])
            out[(threads, "KMeans lloyd, separated")] = interleaved(
                *kmeans_pair(Xs, init_s, it2), cfg["repeats"])
    return out


# ------------------------------------------------------------- (c) ablation
ABLATION = {
    "exact (p=1, no compression)": dict(),
    "p=0.5, control variates": dict(participation=0.5),
    "p=0.5, no control variates": dict(participation=0.5, cv_rate=0),
    "qsgd s=4, control variates": dict(compression=("qsgd", {"s": 4})),
    "qsgd s=4, no control variates": dict(compression=("qsgd", {"s": 4}), cv_rate=0),
    "randk 25%, control variates": dict(compression=("randk", {"ratio": 0.25})),
    "randk 25%, no control variates": dict(compression=("randk", {"ratio": 0.25}), cv_rate=0),
}


def run_ablation(cfg, seed):
    train, _, _ = make_mixture(cfg, seed)
    out = {}
    for name, kw in ABLATION.items():
        est = FederatedGaussianMixture(
            cfg["n_components"], covariance_type="diag", max_iter=cfg["ablation_rounds"], tol=0,
            eval_every=1, random_state=seed, **kw,
        ).fit(train)
        h = est.history_
        out[name] = dict(full_objective=list(map(float, h["full_objective"])),
                         bits_up=list(map(float, h["bits_up"])))
    return out


# ----------------------------------------------------------------- reports
def machine():
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:12]
    except OSError:
        lscpu = []
    try:
        git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, cwd=HERE).stdout.strip()
    except OSError:
        git = "unknown"
    return dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join(["python"] + sys.argv), lscpu=lscpu,
        nproc=len(os.sched_getaffinity(0)), load_average_at_start=[round(x, 2) for x in os.getloadavg()],
        platform=platform.platform(), python=platform.python_version(), numpy=np.__version__,
        scipy=scipy.__version__, scikit_learn=sklearn.__version__, skfedmm=skfedmm.__version__,
        git=git,
    )


def table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)  # noqa: E731
                               for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def ms(values, spec):
    values = np.asarray(values, dtype=float)
    return f"{values.mean():{spec}} +- {values.std():{spec}}"


def report_quality(runs):
    lines = []
    methods = ["surrogate", "parameter (1 local step)", "parameter (5 local steps)", "pooled sklearn"]
    pooled = np.array([r[("gmm", "pooled sklearn")]["loglik"] for r in runs])
    rows = []
    for m in methods:
        ll = np.array([r[("gmm", m)]["loglik"] for r in runs])
        gap = 100 * (pooled - ll) / np.abs(pooled)
        rows.append([m, ms(ll, ".4f"), ms(gap, ".3f"), f"{gap.max():.3f}",
                     ms([r[("gmm", m)]["recovered"] for r in runs], ".2f"),
                     ms([r[("gmm", m)]["n_iter"] for r in runs], ".1f")])
    lines.append(table(["Gaussian mixture (full)", "held-out loglik/row", "gap vs pooled (%)",
                        "worst gap (%)", "components recovered", "iterations"], rows))
    pooled = np.array([r[("kmeans", "pooled sklearn")]["inertia"] for r in runs])
    rows = []
    for m in methods:
        inert = np.array([r[("kmeans", m)]["inertia"] for r in runs])
        gap = 100 * (inert - pooled) / pooled
        rows.append([m, ms(inert, ".4f"), ms(gap, ".3f"), f"{gap.max():.3f}",
                     ms([r[("kmeans", m)]["recovered"] for r in runs], ".2f"),
                     ms([r[("kmeans", m)]["n_iter"] for r in runs], ".1f")])
    lines.append(table(["k-means", "held-out inertia/row", "excess vs pooled (%)", "worst (%)",
                        "centres recovered", "iterations"], rows))
    return "\n\n".join(lines)


def report_speed(speed):
    rows = []
    for (threads, name), r in speed.items():
        o, s = np.array(r["ours"]), np.array(r["sklearn"])
        rows.append([name, threads, f"{r['n_iter_ours']}/{r['n_iter_sklearn']}",
                     f"{np.median(o):.3f}", f"{np.median(s):.3f}", f"{np.median(o) / np.median(s):.2f}",
                     f"{o.min():.3f}", f"{s.min():.3f}", f"{o.min() / s.min():.2f}"])
    return table(["fit", "threads", "iterations ours/sklearn", "median ours (s)", "median sklearn (s)",
                  "ratio", "min ours (s)", "min sklearn (s)", "ratio (min)"], rows)


def report_ablation(abl):
    rows = []
    exact = np.array([r["exact (p=1, no compression)"]["full_objective"][-1] for r in abl])
    for name in ABLATION:
        final = np.array([r[name]["full_objective"][-1] for r in abl])
        bits = np.array([np.sum(r[name]["bits_up"]) for r in abl])
        rows.append([name, ms(final, ".4f"), ms(final - exact, ".2e"), f"{np.mean(bits) / 1e6:.2f}"])
    return table(["setting (diag covariances)", "final objective", "excess vs exact",
                  "Mbit up (total)"], rows)


def figure_ablation(abl, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    exact = np.mean([r["exact (p=1, no compression)"]["full_objective"][-1] for r in abl])
    for i, name in enumerate(ABLATION):
        obj = np.array([r[name]["full_objective"] for r in abl]) - exact
        bits = np.cumsum(np.array([r[name]["bits_up"] for r in abl]), axis=1).mean(axis=0)
        ok = np.all(np.isfinite(obj), axis=0)
        style = "-" if "no control" not in name else "--"
        ax.plot(bits[ok] / 1e6, np.maximum(obj[:, ok].mean(axis=0), 1e-12), style,
                color=f"C{(i + 1) // 2}", label=name)
    ax.set_xlabel("Mbit sent by the clients")
    ax.set_ylabel("objective - final exact objective")
    ax.set_yscale("log")
    ax.set_title(f"Federated EM, heterogeneous clients ({len(abl)} runs, mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run, small sizes")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--speed-only", action="store_true",
                        help="only (b), the speed comparison; writes mixture_speed[_quick].txt")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    runs = args.runs or (1 if args.quick else 10)
    mode = "quick" if args.quick else f"{runs}runs"
    if args.speed_only:
        mode = "speed_quick" if args.quick else "speed"
    os.makedirs(args.out, exist_ok=True)
    warnings.simplefilter("ignore", ConvergenceWarning)
    info = machine()
    text = [f"bench_mixture.py: FederatedGaussianMixture and FederatedKMeans ({mode})", "",
            "Machine", "-------", *[f"{k:24s} {v}" for k, v in info.items() if k != "lscpu"],
            "lscpu | head:", *["    " + line for line in info["lscpu"]], ""]
    print("\n".join(text), flush=True)

    t0 = time.perf_counter()
    if args.speed_only:
        runs = 0  # (no quality or ablation runs)
    quality = [run_quality(cfg, seed) for seed in range(runs)]
    section = (f"(a) Heterogeneous clients: {cfg['n_clients']} clients x {cfg['rows']} rows, each "
               f"holding 2 of {cfg['n_components']} components (d={cfg['n_features']}); held-out "
               f"rows drawn the same way. {runs} seeds, mean +- std; max_iter={cfg['max_iter']}, "
               "default tol; recovered: true means matched (Hungarian) within distance 1.0 "
               f"(component std ~1). [{time.perf_counter() - t0:.0f} s]")
    if quality:
        out = "\n".join([section, "", report_quality(quality), ""])
        print(out, flush=True)
        text.append(out)

    t0 = time.perf_counter()
    speed = run_speed(cfg)
    n, d, k, it = cfg["speed_gmm"]
    n2, d2, k2, it2 = cfg["speed_kmeans"]
    section = (f"(b) Speed, one client, same rows and initialization, tol=0: GaussianMixture on "
               f"{n} x {d}, {k} components, max_iter={it}; KMeans on {n2} x {d2}, {k2} clusters, "
               f"max_iter={it2} (centres drawn with scale 1.5, overlapping; 'separated': scale 4). The machine is shared: fits interleaved (ours, sklearn, ours, ...), "
               f"{cfg['repeats']} repeats each; ratio = ours / sklearn. "
               f"[{time.perf_counter() - t0:.0f} s]")
    out = "\n".join([section, "", report_speed(speed), ""])
    print(out, flush=True)
    text.append(out)

    t0 = time.perf_counter()
    abl = [run_ablation(cfg, seed) for seed in range(runs)]
    if abl:
        fig_path = os.path.join(args.out, f"mixture_ablation_{mode}.png")
        try:
            figure_ablation(abl, fig_path)
        except ImportError:
            fig_path = "(matplotlib missing: no figure)"
        section = (f"(c) Ablation, heterogeneous Gaussian mixture (diag covariances, "
                   f"{cfg['ablation_rounds']} rounds, exact objective every round), {runs} seeds. "
                   f"Figure: {os.path.relpath(fig_path, os.path.dirname(HERE))}. "
                   f"[{time.perf_counter() - t0:.0f} s]")
        out = "\n".join([section, "", report_ablation(abl), ""])
        print(out, flush=True)
        text.append(out)

    with open(os.path.join(args.out, f"mixture_{mode}.txt"), "w") as f:
        f.write("\n".join(text) + "\n")
    with open(os.path.join(args.out, f"mixture_{mode}.json"), "w") as f:
        json.dump(dict(
            config=cfg, machine=info,
            quality=[{f"{a}|{b}": v for (a, b), v in r.items()} for r in quality],
            speed={f"{a}|{b}": v for (a, b), v in speed.items()},
            ablation=abl,
        ), f, indent=1)


if __name__ == "__main__":
    main()
