"""Rounds to tolerance against epsilon, with and without epsilon scaling.

Problem: 4 clients x 300 rows in dimension 4 (a Gaussian source sorted along
its first coordinate before the split, so the clients differ), 300 Gaussian
target points (the ``gaussian_problem`` of ``tests/test_ot.py``, seed 0).
Exact rounds (full participation, no compression, full batches), so every
schedule is plain Sinkhorn with that epsilon schedule on the pooled rows.

Marginal error: :math:`\\|\\sum_i w_i \\bar\\chi_i - b\\|_1`, the L1 distance
between the aggregated mean soft assignment (the mass each target point
receives) and the target weights, at the requested epsilon; it is what
``tol`` and ``marginal_error_`` measure (``history_["mean_field"]``). Rounds
at a larger epsilon of the schedule do not count as reaching it.

Server steps (``dual_step``): ``sinkhorn`` (Sinkhorn's update; each client
sends m = 300 masses per round) and ``newton`` (the majorized Newton step;
each client also sends the m (m + 1) / 2 = 45,150 second moments of its soft
assignments). Schedules: ``off`` (``epsilon_scaling=None``: every round at
epsilon), ``q`` in (0, 1) (``epsilon_scaling=q``: start at epsilon 1, i.e.
the spread of the data, multiply by ``q`` each round down to the requested
value) and ``auto`` with Newton steps (adaptive: multiply by 0.2 each time the
marginal error at the current value is at most 0.03; no scaling at epsilon
0.05 and above). ``default`` marks what ``FederatedOTMap(epsilon)`` does.
Also reported: the marginal error after 60 rounds and the map error after
60 rounds (mean squared distance between the 60-round map and the map of a
reference run, Newton steps to a marginal error of 1e-9, over the source
rows).

Run: ``PYTHONPATH=. python benchmarks/bench_ot_epsilon.py [--quick]``
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
from tests.test_ot import gaussian_problem  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_ot_epsilon.txt"


def first_round(history, tol):
    """The first round whose marginal error, at the requested epsilon, is <= tol."""
    mf = np.asarray(history["mean_field"])
    ok = (mf <= tol) & (np.asarray(history["restarted"]) == 0)
    hits = np.nonzero(ok[1:])[0]
    return int(hits[0]) + 1 if len(hits) else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epsilons and rounds")
    args = parser.parse_args()
    if args.quick:
        epsilons, max_iter, newton_iter = [0.05, 0.01, 0.001], 400, 200
        configs = [("sinkhorn", None), ("sinkhorn", 0.9), ("newton", None), ("newton", "auto")]
    else:
        epsilons, max_iter, newton_iter = [0.1, 0.05, 0.02, 0.01, 0.003, 0.001], 1000, 300
        configs = [("sinkhorn", q) for q in (None, 0.5, 0.8, 0.9, 0.95)]
        configs += [("newton", None), ("newton", 0.5), ("newton", "auto")]
    tols = [1e-2, 1e-3, 1e-4]
    clients, X, Y, _, _ = gaussian_problem(d=4, n_clients=4, n=300, m=300, seed=0)
    lines = [
        f"# benchmarks/bench_ot_epsilon.py{' --quick' if args.quick else ''} -- "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"# python {platform.python_version()}, numpy {np.__version__}, nproc={os.cpu_count()}, "
        f"loadavg at start {tuple(round(x, 2) for x in os.getloadavg())}",
        "# 4 clients x 300 rows, d=4 (sorted split), 300 target points; exact rounds;",
        "# marginal error = || sum_i w_i mean soft assignment_i - b ||_1 at the requested epsilon",
        f"# rounds to tol: '>N' when not reached in N rounds (N = {max_iter} with Sinkhorn "
        f"steps, {newton_iter} with Newton steps, whose rounds cost more)",
        "# floats up: numbers each client sends per round (m masses; + m(m+1)/2 with Newton)",
        "",
        f"| epsilon | step | schedule | {' | '.join(f'rounds to {t:g}' for t in tols)} "
        "| marg. err @60 | map err @60 | floats up |",
        "|---|---|---|" + "---|" * len(tols) + "---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    warnings.simplefilter("ignore", ConvergenceWarning)
    m = Y.shape[0]
    for eps in epsilons:
        # the reference map: Newton steps, to a marginal error of 1e-9
        ref = FederatedOTMap(eps, dual_step="newton", max_iter=max_iter, tol=1e-9).fit(
            clients, target=Y
        )
        T_ref = ref.transform(X)
        # what a plain user gets: the problem FederatedOTMap(eps) solves
        plain = FederatedOTMap(eps)._make_problem(Y, np.full(m, 1.0 / m))
        for step, q in configs:
            kw = dict(epsilon_scaling=q, dual_step=step)
            n_max = newton_iter if step == "newton" else max_iter
            est = FederatedOTMap(eps, max_iter=n_max, tol=min(tols), **kw).fit(clients, target=Y)
            counts = [first_round(est.history_, t) for t in tols]
            at60 = FederatedOTMap(eps, max_iter=60, tol=0.0, **kw).fit(clients, target=Y)
            mf60 = at60.history_["mean_field"][-1]
            mf60 = f"{mf60:.2e}" if at60.history_["restarted"][-1] == 0 else "(scaling)"
            map60 = float(np.mean(np.sum((at60.transform(X) - T_ref) ** 2, axis=1)))
            cells = [str(c) if c is not None else f">{n_max}" for c in counts]
            what = ("newton", "epsilon_scaling", "scaling_tol")
            is_default = all(getattr(est.problem_, a) == getattr(plain, a) for a in what)
            label = "off" if q is None else str(q)
            if is_default:
                label += " (default)"
            floats = m + (m * (m + 1) // 2 if est.problem_.newton else 0)
            line = (
                f"| {eps:g} | {step} | {label} | {' | '.join(cells)} | {mf60} "
                f"| {map60:.2e} | {floats:,} |"
            )
            lines.append(line)
            print(line, flush=True)
    # the defaults at epsilon = 1e-3 on other draws of the problem
    lines += [
        "",
        "# FederatedOTMap(1e-3) with the defaults, other draws of the problem (4 clients x 300",
        "# rows, 300 target points; d and seed of gaussian_problem): rounds to a marginal error",
        "# of 1e-3 (tol=1e-3), and the marginal error recomputed at the final potential",
        "",
        "| d | seed | step | rounds to 0.001 | marginal error at the end |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines[-7:]), flush=True)
    draws = [(4, 1), (2, 0)] if args.quick else [(4, 1), (4, 2), (4, 3), (2, 0), (8, 0)]
    for d, seed in draws:
        cl, Xd, Yd, _, _ = gaussian_problem(d=d, n_clients=4, n=300, m=300, seed=seed)
        est = FederatedOTMap(1e-3, max_iter=max_iter, tol=1e-3).fit(cl, target=Yd)
        error = np.abs(est.soft_assignments(Xd).mean(axis=0) - est.target_weights_).sum()
        step = "newton" if est.problem_.newton else "sinkhorn"
        rounds = est.n_iter_ if est.marginal_error_ <= 1e-3 else f">{max_iter}"
        lines.append(f"| {d} | {seed} | {step} | {rounds} | {error:.2e} |")
        print(lines[-1], flush=True)
    # the price of a round (wall time: machine-dependent, interleaved)
    times = {"sinkhorn": [], "newton": []}
    for _ in range(3):
        for step in times:
            t0 = time.perf_counter()
            FederatedOTMap(1e-3, dual_step=step, epsilon_scaling=None, max_iter=20, tol=0.0).fit(
                clients, target=Y
            )
            times[step].append((time.perf_counter() - t0) / 21)
    lines += [
        "",
        "# seconds per round at epsilon=1e-3 (20-round fits plus the initial round, minimum of 3 "
        f"interleaved repeats; loadavg {tuple(round(x, 2) for x in os.getloadavg())}): "
        + ", ".join(f"{k} {min(v):.4f}" for k, v in times.items())
        + f" (ratio {min(times['newton']) / min(times['sinkhorn']):.1f})",
    ]
    print(lines[-1], flush=True)
    lines += ["", f"# loadavg at end {tuple(round(x, 2) for x in os.getloadavg())}"]
    RESULTS.parent.mkdir(exist_ok=True)
    out = RESULTS.with_name("bench_ot_epsilon_quick.txt") if args.quick else RESULTS
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
