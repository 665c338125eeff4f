"""Entropic OT map: map error against rounds and against bits sent.

The optimal-transport part of the "impact of aggregation space" study:
Gaussian source and target (the Monge map is known in closed form), clients
holding slices of the source sorted along its first coordinate (strong
heterogeneity). For every round of each federated fit the potential is
recorded and the map error, mean over fresh source points of
||T_hat(x) - T(x)||^2, computed afterwards; bits are the fit's cumulative
``bits_up + bits_down``. Methods:

- FedMM, surrogate aggregation (exact rounds);
- FedMM with partial participation (p = 0.5) and QSGD (s = 16) compression;
- parameter averaging (``aggregation="parameter"``);
- the pooled semi-discrete solver (all rows, one client: no communication);
- POT's ``SinkhornTransport`` on the pooled rows (its final error, a
  horizontal line: it is not federated).

Usage::

    PYTHONPATH=. python benchmarks/bench_ot_curves.py --quick   # 1 run, small
    PYTHONPATH=. python benchmarks/bench_ot_curves.py           # 10 runs

Writes ``benchmarks/results/ot_curves_<mode>.png`` and ``.json`` and prints
the final map errors (mean +/- std over runs).
"""

import argparse
import json
import os
import platform
import time
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402

from bench_ot import gaussian_problem  # noqa: E402
from skfedmm import FederatedOTMap  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

METHODS = {
    "FedMM surrogate": dict(),
    "FedMM p=0.5 + QSGD(s=16)": dict(participation=0.5, compression=("qsgd", {"s": 16})),
    "parameter averaging": dict(aggregation="parameter"),
}


def curve(est_kwargs, data, Y, X_test, truth, n_rounds, seed):
    thetas = []
    est = FederatedOTMap(max_iter=n_rounds, tol=0, random_state=seed,
                         callback=lambda info: thetas.append(info["theta"].copy()),
                         **est_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(data, target=Y)
    problem = est.problem_
    errors = [float(np.mean(np.sum((problem.barycentric_map(X_test, g) - truth) ** 2, axis=1)))
              for g in thetas]
    h = est.history_
    # (thetas[t]: after round t, the initial round 0 included, as history row t)
    bits = np.cumsum(h["bits_up"] + h["bits_down"])
    return np.array(errors), bits, est.epsilon_


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--epsilon", type=float, default=0.15,
                        help="regularization relative to the spread of the samples")
    args = parser.parse_args(argv)
    if args.quick:
        runs, n, m, n_rounds, mode = args.runs or 1, 200, 200, 30, "quick"
    else:
        runs, n, m, n_rounds, mode = args.runs or 10, 500, 500, 120, f"{args.runs or 10}runs"
    t_start = time.perf_counter()
    results = {name: {"errors": [], "bits": []} for name in list(METHODS) + ["pooled solver"]}
    pot_errors = []
    for run in range(runs):
        clients, X, Y, X_test, monge = gaussian_problem(n=n, m=m, n_test=1000, seed=run)
        truth = monge(X_test)
        common = dict(epsilon=args.epsilon)
        for name, kwargs in METHODS.items():
            err, bits, eps = curve({**common, **kwargs}, clients, Y, X_test, truth, n_rounds, run)
            results[name]["errors"].append(err.tolist())
            results[name]["bits"].append(bits.tolist())
        err, bits, eps = curve(common, np.vstack(clients), Y, X_test, truth, n_rounds, run)
        results["pooled solver"]["errors"].append(err.tolist())
        results["pooled solver"]["bits"].append([0.0] * len(err))
        try:
            import ot

            pot = ot.da.SinkhornTransport(reg_e=2 * eps).fit(Xs=X, Xt=Y)
            pot_errors.append(float(np.mean(np.sum((pot.transform(Xs=X_test) - truth) ** 2, axis=1))))
        except ImportError:
            pass
    elapsed = time.perf_counter() - t_start

    print(f"Gaussian d=5, 10 clients x {n} rows sorted along x0, {m} target points, "
          f"epsilon={args.epsilon} (relative), {n_rounds} rounds, {runs} run(s), {elapsed:.0f} s")
    print(f"{os.cpu_count()} cores; Python {platform.python_version()}, numpy {np.__version__}\n")
    print(f"{'method':<28}{'final map MSE':>22}{'Mbit sent':>12}")
    summary = {}
    for name, res in results.items():
        final = np.array([e[-1] for e in res["errors"]])
        mbit = np.mean([b[-1] for b in res["bits"]]) / 1e6
        summary[name] = dict(final_mean=float(final.mean()), final_std=float(final.std()), mbit=mbit)
        print(f"{name:<28}{final.mean():>13.4f} +/- {final.std():.4f}{mbit:>12.2f}")
    if pot_errors:
        pe = np.array(pot_errors)
        summary["POT SinkhornTransport"] = dict(final_mean=float(pe.mean()), final_std=float(pe.std()))
        print(f"{'POT SinkhornTransport':<28}{pe.mean():>13.4f} +/- {pe.std():.4f}{'-':>12}")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    colors = dict(zip(results, ["C0", "C1", "C3", "C2"]))
    for name, res in results.items():
        E = np.array(res["errors"])
        mean, std = E.mean(axis=0), E.std(axis=0)
        rounds = np.arange(E.shape[1])  # (0: the initial round)
        style = "--" if name == "pooled solver" else "-"  # exact FedMM overlaps it
        axes[0].plot(rounds, mean, style, color=colors[name],
                     label=f"{name} ({runs} run{'s' if runs > 1 else ''})")
        axes[0].fill_between(rounds, np.maximum(mean - std, 1e-12), mean + std,
                             color=colors[name], alpha=0.2)
        if name != "pooled solver":
            B = np.mean(res["bits"], axis=0)
            axes[1].plot(B / 1e6, mean, color=colors[name], label=name)
            axes[1].fill_between(B / 1e6, np.maximum(mean - std, 1e-12), mean + std,
                                 color=colors[name], alpha=0.2)
    for ax in axes:
        if pot_errors:
            ax.axhline(np.mean(pot_errors), color="k", ls="--", lw=1, label="POT (pooled), final")
        ax.set_yscale("log")
        ax.set_ylabel("map error  mean ||T_hat(x) - T(x)||^2")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_xlabel("round")
    axes[1].set_xlabel("Mbit sent (up + down, cumulative)")
    axes[1].set_xscale("log")
    axes[0].set_title("map error per round")
    axes[1].set_title("map error against communication")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    os.makedirs(RESULTS, exist_ok=True)
    png = os.path.join(RESULTS, f"ot_curves_{mode}.png")
    fig.savefig(png, dpi=110)
    with open(os.path.join(RESULTS, f"ot_curves_{mode}.json"), "w") as fh:
        json.dump(dict(config=dict(runs=runs, n=n, m=m, rounds=n_rounds, epsilon=args.epsilon),
                       summary=summary, pot_errors=pot_errors,
                       curves={k: dict(mean_error=np.mean(v["errors"], axis=0).tolist(),
                                       mean_bits=np.mean(v["bits"], axis=0).tolist())
                               for k, v in results.items()}), fh, indent=1)
    print(f"\nwrote {png}")


if __name__ == "__main__":
    main()
