"""Which constant step size should ``step_size="auto"`` use for noisy rounds?

When rounds are exact (full participation, no compression, full batches)
``"auto"`` is 1, which makes FedMM batch MM. Otherwise the server step
:math:`\\gamma` trades speed against the noise of partial participation,
compression and minibatches. This script fits FederatedDictionaryLearning on
the heterogeneous synthetic clients (10 x 300 rows, 40 features, 30 atoms)
under several noise settings, for a grid of constant step sizes, and prints
the objective (mean per row on all rows) after a fixed number of rounds,
averaged over seeds, next to ``step_size="auto"``
(:func:`skfedmm.schedules.auto_step_size`, which depends on the compressor's
omega and the participation rate).

Usage::

    python benchmarks/bench_step_size.py          # 30 rounds, 2 seeds
    python benchmarks/bench_step_size.py --quick  # 15 rounds, 1 seed, fewer rows
"""

import argparse
import time

import numpy as np

from skfedmm import FederatedDictionaryLearning
from skfedmm.datasets import make_sparse_coded_clients

STEPS = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
SETTINGS = {
    "p=0.5": dict(participation=0.5),
    "p=0.2": dict(participation=0.2),
    "qsgd s=16": dict(compression=("qsgd", {"s": 16})),
    "qsgd s=4": dict(compression=("qsgd", {"s": 4})),
    "randk 10%": dict(compression=("randk", {"ratio": 0.1})),
    "p=0.5 + qsgd s=16": dict(participation=0.5, compression=("qsgd", {"s": 16})),
    "batch 100": dict(batch_size=100),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
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
        for gamma in STEPS + ["auto"]:
            runs = [
                -FederatedDictionaryLearning(random_state=s, step_size=gamma, **base, **noise)
                .fit(clients).score(X)
                for s in seeds
            ]
            values.append(np.mean(runs))
        auto_gamma = FederatedDictionaryLearning(random_state=0, max_iter=1, **{
            k: v for k, v in base.items() if k != "max_iter"}, **noise).fit(clients).history_[
            "step_size"][-1]
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
