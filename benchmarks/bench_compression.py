"""Compression that pays: bits to reach the uncompressed optimum.

Three problems with heterogeneous clients:

- ``synthetic``: FederatedDictionaryLearning on
  ``make_sparse_coded_clients`` (10 clients x 300 rows, 32 features, 20
  atoms, each client on its own atoms), ``alpha=0.1``;
- ``digits``: FederatedDictionaryLearning on ``load_digits`` split by label
  (10 clients, pixels standardized with the pooled mean and std), 32
  atoms, ``alpha=1.0`` (as in ``bench_aggregation.py``);
- ``ot``: FederatedOTMap on the Gaussian problem of ``bench_ot.py`` (10
  clients holding slices of the source sorted along its first coordinate),
  ``epsilon=0.15``.

Each problem is fitted without compression and with every built-in
compressor (``compression="qsgd"`` as a user gets it, and the coarsest
documented settings, QSGD with ``s=1`` and random-k keeping 10%; and the
default QSGD written in its fixed-width code, whose messages decode to the
same values: same rounds, more bits), all
other parameters at their defaults (``step_size="auto"``), for ``--rounds``
rounds with the exact objective evaluated every round. The target is
1.01 times the uncompressed run's final objective (for a negative
objective: the final objective plus 1% of its magnitude). Printed per run:
the round and the cumulative uplink bits when the exact objective first
reaches the target, and their ratio to the uncompressed run's. Bits
include the initialization (the initial statistics, which a compressed run
sends through its compressor too, except the OT map's moments, which set
its cost scale); the initialization's bits of each run and the ratio of
the rounds' bits alone are printed beside.

Usage::

    PYTHONPATH=. python benchmarks/bench_compression.py          # 300 rounds
    PYTHONPATH=. python benchmarks/bench_compression.py --quick  # 60 rounds, synthetic only

Writes ``benchmarks/results/bench_compression.txt`` (this output) and
``benchmarks/results/bench_compression.png`` (objective against uplink bits).
"""

import argparse
import os
import platform
import sys
import time
import warnings

import numpy as np
from joblib import Parallel, delayed

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_aggregation import Tee  # noqa: E402
RESULTS = os.path.join(HERE, "results")

COMPRESSORS = {
    "none": None,
    "qsgd (default)": "qsgd",
    "qsgd fixed code": ("qsgd", {"coding": "fixed"}),
    "qsgd s=1": ("qsgd", {"s": 1}),
    "randk 10%": ("randk", {"ratio": 0.1}),
}
PROBLEMS = ("synthetic", "digits", "ot")
REACH = 0.01


def standardize(clients):
    X = np.vstack(clients)
    mean, std = X.mean(axis=0), X.std(axis=0)
    std[std == 0] = 1.0
    return [(c - mean) / std for c in clients]


def make_problem(name):
    """(clients, estimator factory, fit kwargs) of one problem."""
    from skfedmm import FederatedDictionaryLearning, FederatedOTMap
    from skfedmm.datasets import make_sparse_coded_clients, split_by_labels

    if name == "synthetic":
        clients, _ = make_sparse_coded_clients(10, 300, 32, 20, heterogeneous=True, random_state=0)
        return clients, lambda **kw: FederatedDictionaryLearning(
            n_components=20, alpha=0.1, **kw), {}
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        clients = standardize(split_by_labels(digits.data.astype(float), digits.target))
        return clients, lambda **kw: FederatedDictionaryLearning(
            n_components=32, alpha=1.0, **kw), {}
    from bench_ot import gaussian_problem

    clients, _, Y, _, _ = gaussian_problem()
    return clients, lambda **kw: FederatedOTMap(epsilon=0.15, **kw), dict(target=Y)


def run(name, label, rounds):
    from sklearn.exceptions import ConvergenceWarning

    clients, make, fit_kw = make_problem(name)
    est = make(compression=COMPRESSORS[label], max_iter=rounds, tol=0, eval_every=1,
               random_state=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(clients, **fit_kw)
    h = est.history_
    return dict(problem=name, label=label, objective=np.asarray(h["full_objective"]),
                bits=np.cumsum(h["bits_up"]), step=np.asarray(h["step_size"]),
                wall=time.perf_counter() - t0)


def reach(r, target):
    hit = np.flatnonzero(np.isfinite(r["objective"]) & (r["objective"] <= target))
    return (int(hit[0]), float(r["bits"][hit[0]])) if hit.size else (None, np.nan)


def report(results, rounds):
    summary = {}
    for name in dict.fromkeys(r["problem"] for r in results):
        runs = {r["label"]: r for r in results if r["problem"] == name}
        ref = runs["none"]
        final = ref["objective"][-1]
        target = final + REACH * abs(final)
        init_bits = ref["bits"][0]
        ref_round, ref_bits = reach(ref, target)
        print(f"\n{name}: uncompressed final objective {final:.6g} after {rounds} rounds; "
              f"target {target:.6g}")
        header = ["compression", "gamma (last)", "final objective", "init Mbit", "round",
                  "Mbit up", "bits ratio", "ratio w/o init", "<= 1/10", f"in {rounds} rounds"]
        rows = []
        for label, r in runs.items():
            rnd, bits = reach(r, target)
            ratio = bits / ref_bits
            rounds_ratio = (bits - r["bits"][0]) / (ref_bits - init_bits)
            summary[name, label] = (rnd, ratio)
            rows.append([label, f"{r['step'][-1]:.3f}", f"{r['objective'][-1]:.6g}",
                         f"{r['bits'][0] / 1e6:.3f}",
                         "never" if rnd is None else str(rnd),
                         "-" if rnd is None else f"{bits / 1e6:.3f}",
                         "-" if rnd is None else f"{ratio:.3f}",
                         "-" if rnd is None else f"{rounds_ratio:.3f}",
                         "yes" if ratio <= 0.1 else "no",
                         "yes" if rnd is not None else "no"])
        widths = [max(len(str(x[j])) for x in [header] + rows) for j in range(len(header))]
        for row in [header, ["-" * w for w in widths]] + rows:
            print("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w)
                            for j, (c, w) in enumerate(zip(row, widths))))
        del ref_round
    return summary


def figure(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["problem"] for r in results))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), layout="constrained",
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        runs = [r for r in results if r["problem"] == name]
        final = next(r for r in runs if r["label"] == "none")["objective"][-1]
        for r in runs:
            gap = r["objective"] - final
            ax.plot(r["bits"], np.maximum(gap, 1e-9 * max(1.0, abs(final))), label=r["label"])
        ax.axhline(REACH * abs(final), color="gray", ls=":", lw=1, label="1% target")
        ax.set(xscale="log", yscale="log", xlabel="cumulative uplink bits",
               ylabel="objective - uncompressed final", title=name)
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Exact objective against uplink bits (step_size='auto')")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 rounds, synthetic problem only")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    rounds = args.rounds or (60 if args.quick else 300)
    problems = ("synthetic",) if args.quick else PROBLEMS
    os.makedirs(args.out, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    log = open(os.path.join(args.out, f"bench_compression{suffix}.txt"), "w")
    stdout, sys.stdout = sys.stdout, Tee(sys.stdout, log)
    try:
        print(f"# benchmarks/bench_compression.py {' '.join(argv or sys.argv[1:])}")
        print(f"# {time.strftime('%Y-%m-%d %H:%M')}, Python {platform.python_version()}, "
              f"load average at start {os.getloadavg()}")
        t0 = time.perf_counter()
        results = Parallel(n_jobs=args.n_jobs)(
            delayed(run)(name, label, rounds) for name in problems for label in COMPRESSORS)
        report(results, rounds)
        figure(results, os.path.join(args.out, f"bench_compression{suffix}.png"))
        print(f"\n'round', 'Mbit up': when the exact objective first reaches the target; "
              f"'bits ratio': those bits / the uncompressed run's (initialization included); "
              f"'ratio w/o init': the same without each run's initialization ('init Mbit').")
        print(f"{len(results)} fits in {time.perf_counter() - t0:.0f} s; load average at end "
              f"{os.getloadavg()}")
    finally:
        sys.stdout = stdout
        log.close()


if __name__ == "__main__":
    main()
