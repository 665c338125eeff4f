"""FederatedOTMap at scale: seconds per round, float64 against float32 kernels.

Problem: 200,000 source rows in dimension 10 over 10 clients (a Gaussian
source sorted along its first coordinate before the split), 5,000 Gaussian
target points, ``epsilon=0.05`` (relative to the spread). Each round every
client computes its mean soft assignment, a ``20,000 x 5,000`` block of
logits and exponentials processed in cache-sized chunks.

Configurations, run interleaved (A, B, C, D, A, B, ...), each a fit of
``--rounds`` rounds after the initial round; seconds per round = the median
over the timed rounds (``history_["time"]`` differences, the initial round
excluded), minimum over the repeats:

- ``float64 kernel, n_jobs=1``: the kernel in the data's precision;
- ``float64 kernel, n_jobs=2``: clients on both cores;
- ``float32 kernel, n_jobs=1`` and ``n_jobs=2``: ``kernel_dtype="float32"``:
  logits and exponentials in float32, masses accumulated in float64.

Accuracy of the float32 kernel: after the same rounds, the largest distance
between the two maps over 2,000 fresh source points, relative to the
spread's standard deviation sigma, and the largest potential difference in
units of epsilon.

POT (``ot.da.SinkhornTransport``, which builds the full ``n x m`` cost,
kernel and plan matrices in float64) on the first ``--pot-rows`` pooled
rows and the same target, capped at 50 iterations: its time per iteration
and the size of one ``n x m`` matrix. The full problem would need 7.5 GiB
per matrix.

Run: ``PYTHONPATH=. python benchmarks/bench_ot_scale.py [--quick]``
"""

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skfedmm import FederatedOTMap  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def problem(n_rows, n_clients, m, d, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    X = rng.standard_normal((n_rows, d)) @ A.T + 1.0
    Y = rng.standard_normal((m, d))
    X_test = rng.standard_normal((2000, d)) @ A.T + 1.0
    clients = np.array_split(X[np.argsort(X[:, 0])], n_clients)
    return clients, X, Y, X_test


def pot_line(Xp, Y, epsilon, pot_iters=50):
    """POT's SinkhornTransport on pooled rows, capped at ``pot_iters`` iterations."""
    try:
        import ot
    except ImportError:
        return "POT not installed: skipped"
    n, m = Xp.shape[0], Y.shape[0]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge": the iterations are capped
        pot = ot.da.SinkhornTransport(reg_e=2 * epsilon, max_iter=pot_iters, tol=0.0)
        pot.fit(Xs=Xp, Xt=Y)
    wall = time.perf_counter() - t0
    return (
        f"POT SinkhornTransport on {n} pooled rows x {m} targets, capped at {pot_iters} "
        f"iterations: fit {wall:.1f} s ({wall / pot_iters:.3f} s per iteration with its cost "
        f"matrix; one {n}x{m} float64 matrix = {n * m * 8 / 2**30:.2f} GiB). 200,000 rows "
        f"would need {200_000 * m * 8 / 2**30:.1f} GiB per matrix and POT holds several: out "
        "of reach of this 23 GB machine."
    )


def per_round(est):
    t = np.asarray(est.history_["time"])
    return float(np.median(np.diff(t)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50,000 rows, 1 repeat")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--pot-rows", type=int, default=None, help="0: skip POT")
    args = parser.parse_args()
    n_rows = 50_000 if args.quick else 200_000
    rounds = args.rounds or (2 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 2)
    pot_rows = args.pot_rows if args.pot_rows is not None else (2_000 if args.quick else 20_000)
    n_clients, m, d, eps = 10, 5000, 10, 0.05
    clients, X, Y, X_test = problem(n_rows, n_clients, m, d)
    configs = {
        "float64 kernel, n_jobs=1": dict(kernel_dtype=None, n_jobs=1),
        "float64 kernel, n_jobs=2": dict(kernel_dtype=None, n_jobs=2),
        "float32 kernel, n_jobs=1": dict(kernel_dtype="float32", n_jobs=1),
        "float32 kernel, n_jobs=2": dict(kernel_dtype="float32", n_jobs=2),
    }
    lines = [
        f"# benchmarks/bench_ot_scale.py{' --quick' if args.quick else ''} -- "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"# python {platform.python_version()}, numpy {np.__version__}, nproc={os.cpu_count()}",
        f"# {n_rows} rows x d={d} over {n_clients} clients, m={m} target points, epsilon={eps}; "
        f"{rounds} timed rounds per fit, {repeats} interleaved repeat(s)",
        f"# loadavg at start {tuple(round(x, 2) for x in os.getloadavg())}",
        "",
    ]
    print("\n".join(lines), flush=True)
    times = {k: [] for k in configs}
    fitted = {}
    warnings.simplefilter("ignore", ConvergenceWarning)
    for rep in range(repeats):
        for name, cfg in configs.items():
            est = FederatedOTMap(eps, max_iter=rounds, tol=0.0, random_state=0, **cfg)
            est.fit(clients, target=Y)
            times[name].append(per_round(est))
            fitted[name] = est
            line = (f"  repeat {rep}: {name}: {times[name][-1]:.2f} s/round "
                    f"(loadavg {os.getloadavg()[0]:.2f})")
            print(line, flush=True)
            lines.append(line)
    base = min(times["float64 kernel, n_jobs=1"])
    table = ["| configuration | s/round (min) | all repeats | speed-up vs float64 n_jobs=1 |",
             "|---|---|---|---|"]
    for name, ts in times.items():
        table.append(f"| {name} | {min(ts):.2f} | {', '.join(f'{t:.2f}' for t in ts)} "
                     f"| {base / min(ts):.2f}x |")
    ref, f32 = fitted["float64 kernel, n_jobs=1"], fitted["float32 kernel, n_jobs=2"]
    sigma = np.sqrt(ref.cost_scale_)
    map_gap = float(np.max(np.linalg.norm(ref.transform(X_test) - f32.transform(X_test), axis=1)))
    pot_gap = float(np.max(np.abs(ref.potential_ - f32.potential_))) / ref.epsilon_
    table += [
        "",
        f"float32 kernel vs float64 kernel after {rounds} rounds: max map distance "
        f"{map_gap / sigma:.2e} sigma, max potential difference {pot_gap:.2e} epsilon "
        f"(sigma = {sigma:.3f}, epsilon_ = {ref.epsilon_:.4f})",
        f"marginal error after {rounds} rounds: float64 {ref.marginal_error_:.3e}, "
        f"float32 {f32.marginal_error_:.3e}",
        "potentials bitwise independent of n_jobs: float64 "
        f"{np.array_equal(ref.potential_, fitted['float64 kernel, n_jobs=2'].potential_)}, "
        f"float32 {np.array_equal(f32.potential_, fitted['float32 kernel, n_jobs=1'].potential_)}",
    ]
    print("\n".join(table), flush=True)
    lines += [""] + table
    # POT, pooled, full matrices
    if pot_rows > 0:
        lines += ["", pot_line(X[:pot_rows], Y, ref.epsilon_)]
        print(lines[-1], flush=True)
    lines += ["", f"# loadavg at end {tuple(round(x, 2) for x in os.getloadavg())}"]
    out = RESULTS / ("bench_ot_scale_quick.txt" if args.quick else "bench_ot_scale.txt")
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
