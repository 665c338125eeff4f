"""Which constant step size should ``step_size="auto"`` use for noisy rounds?

When rounds are exact (full participation, no compression, full batches)
``"auto"`` is 1, which makes FedMM batch MM. Otherwise the server step
:math:`\\gamma` trades speed against the noise of partial participation,
compression and minibatches. This script fits FederatedDictionaryLearning on
the heterogeneous synthetic clients (10 x 300 rows, 40 features, 30 atoms)
under several noise settings, for a grid of constant step sizes, and prints
the objective (mean per row on all rows) after a fixed number of rounds,
averaged over seeds, next to ``step_size="auto"`` (in noisy rounds a step
measured on each round's messages, never below the worst-case
:func:`skfedmm.schedules.auto_step_size`, which depends on the compressor's
omega and the participation rate; the ``auto`` column gives its mean step).

Writes ``benchmarks/results/bench_step_size.txt`` (``_quick.txt`` with
``--quick``).

Usage::

    python benchmarks/bench_step_size.py          # 30 rounds, 2 seeds
    python benchmarks/bench_step_size.py --quick  # 15 rounds, 1 seed, fewer rows
"""

import argparse
import os
import platform
import sys
import time

import numpy as np

from skfedmm import FederatedDictionaryLearning
from skfedmm.datasets import make_sparse_coded_clients

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_aggregation import Tee  # noqa: E402

STEPS = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
SETTINGS = {
    "p=0.5": dict(participation=0.5),
    "p=0.2": dict(participation=0.2),
    "qsgd s=16": dict(compression=("qsgd", {"s": 16})),
    "qsgd s=4": dict(compression=("qsgd", {"s": 4})),
    "qsgd s=1": dict(compression=("qsgd", {"s": 1})),
    "randk 10%": dict(compression=("randk", {"ratio": 0.1})),
    "p=0.5 + qsgd s=16": dict(participation=0.5, compression=("qsgd", {"s": 16})),
    "batch 100": dict(batch_size=100),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    name = "bench_step_size_quick.txt" if args.quick else "bench_step_size.txt"
    with open(os.path.join(results, name), "w") as log:
        stdout, sys.stdout = sys.stdout, Tee(sys.stdout, log)
        try:
            print(f"# benchmarks/bench_step_size.py -- recorded {time.strftime('%Y-%m-%d')}, "
                  f"Python {platform.python_version()}, load average {os.getloadavg()}")
            print(f"$ PYTHONPATH=. python benchmarks/bench_step_size.py"
                  f"{' --quick' if args.quick else ''}")
            run(args)
        finally:
            sys.stdout = stdout


def run(args):
    n_rounds, seeds, n_samples = (15, [0], 200) if args.quick else (30, [0, 1], 300)
    clients, _ = make_sparse_coded_clients(n_samples=n_samples, random_state=0)
    X = np.vstack(clients)
    base = dict(n_components=30, alpha=0.1, max_iter=n_rounds, tol=0)
    t0 = time.perf_counter()
    exact = -FederatedDictionaryLearning(random_state=0, **base).fit(clients).score(X)
    print(f"objective after {n_rounds} exact rounds (gamma = 1): {exact:.4f}")
    print(f"mean objective after {n_rounds} noisy rounds, {len(seeds)} seed(s); * = best per row\n")
    print(f"{'setting':<20}" + "".join(f"{'g=' + str(g):>9}" for g in STEPS)
          + f"{'auto':>16}{'auto/best':>11}")
    ratios = []
    table = []
    for name, noise in SETTINGS.items():
        values = []
        auto_steps = []
        for gamma in STEPS + ["auto"]:
            fits = [
                FederatedDictionaryLearning(random_state=s, step_size=gamma, **base, **noise)
                .fit(clients)
                for s in seeds
            ]
            values.append(np.mean([-f.score(X) for f in fits]))
            if gamma == "auto":
                auto_steps = [np.mean(f.history_["step_size"][1:]) for f in fits]
        auto_gamma = float(np.mean(auto_steps))
        best = int(np.argmin(values[:-1]))
        ratios.append(values[-1] / values[best])
        table.append(np.array(values[:-1]) / values[best])
        cells = "".join(
            f"{v:>8.4f}{'*' if i == best else ' '}" for i, v in enumerate(values[:-1])
        )
        print(f"{name:<20}{cells}{values[-1]:>8.4f} (g={auto_gamma:.2f}){ratios[-1]:>10.3f}")
    worst = np.max(table, axis=0)
    print("\nworst case over the settings of (objective / best constant's objective):")
    print("  " + "  ".join(f"g={g}: {w:.3f}" for g, w in zip(STEPS, worst))
          + f"  auto: {max(ratios):.3f}")
    print(f"step_size='auto' is at most {100 * (max(ratios) - 1):.1f}% above the best constant "
          f"of the grid in each setting; the best single constant (g={STEPS[int(np.argmin(worst))]}) "
          f"is up to {100 * (worst.min() - 1):.1f}% above ({time.perf_counter() - t0:.0f} s).")


if __name__ == "__main__":
    main()
