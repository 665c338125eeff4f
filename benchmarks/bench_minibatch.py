"""FedMM in minibatch mode against scikit-learn's MiniBatchDictionaryLearning.

Data: normalized 8x8 patches of scikit-learn's ``china.jpg`` (grayscale,
pixel values / 255; each feature centred and scaled to unit variance as in
scikit-learn's image-denoising example), ``--patches`` of them drawn at
random positions (default 60,000). Model: 100 atoms, alpha 0.5.

- ``MiniBatchDictionaryLearning(n_components=100, alpha=0.5,
  batch_size=256, max_iter=3)`` (its other parameters at their defaults;
  its own early stopping may end it before 3 epochs);
- one-client FedMM, ``batch_size=2500`` (``--batch``; 2500 reached the
  learner's objective sooner than 5000 or 10000 in a comparison on both
  seeds);
- ten clients, the patches split by image region (a 2 x 5 grid of the
  patches' top-left corners), ``batch_size=250`` per client (the same
  2500 rows per round);

FedMM with every other parameter at its default: in particular the step
size is ``step_size="auto"``, the default rule of minibatch mode. Both
record the dictionary along the way (callbacks; time spent in callbacks is
not counted) and the objective of each recorded dictionary is computed
afterwards on the same ``--eval`` rows (default 10,000 of the patches; at
most ``--points`` evenly spaced dictionaries per curve, default 50, which
keeps every round of FedMM, so that the time it first reaches the
learner's objective is not rounded up to a thinned curve's next point):
the mean of 1/2||x - hD||^2 + alpha||h||_1 with codes from
``batch_lasso_cd`` (tol 1e-4). The wall time at which FedMM first reaches
the learner's final objective is compared with the learner's time. Times
are the process's CPU seconds by default (``--clock wall`` for wall
seconds): with one BLAS thread both agree on an idle machine, and CPU time
barely moves when other processes share the cores.

Usage::

    python benchmarks/bench_minibatch.py                 # 60,000 patches, seeds 0 and 1
    python benchmarks/bench_minibatch.py --quick         # 20,000 patches, max_iter=1, seed 0

Targets: one client reaches the learner's final objective in at most 0.2x
its wall time, ten clients in at most 0.5x. Writes
``results/bench_minibatch.txt`` and ``results/bench_minibatch.png``.
"""

import argparse
import os
import time
import warnings

import numpy as np
from sklearn.datasets import load_sample_image
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.feature_extraction.image import extract_patches_2d
from threadpoolctl import threadpool_limits

from skfedmm import FederatedDictionaryLearning
from skfedmm.problems.dictionary import batch_lasso_cd, lasso_objective

HERE = os.path.dirname(os.path.abspath(__file__))
ALPHA = 0.5
K = 100
PATCH = 8


def patches(n, seed):
    """``n`` normalized patches and the (row, column) of their corners."""
    gray = load_sample_image("china.jpg").mean(axis=2) / 255.0
    allp = extract_patches_2d(gray, (PATCH, PATCH)).reshape(-1, PATCH * PATCH)
    width = gray.shape[1] - PATCH + 1
    idx = np.sort(np.random.default_rng(seed).choice(len(allp), size=n, replace=False))
    X = allp[idx].copy()
    X -= X.mean(axis=0)
    X /= X.std(axis=0)
    return X, idx // width, idx % width, gray.shape


def regions(rows, cols, shape, n_rows=2, n_cols=5):
    """Client index of each patch: a grid over the image."""
    r = np.minimum(rows * n_rows // (shape[0] - PATCH + 1), n_rows - 1)
    c = np.minimum(cols * n_cols // (shape[1] - PATCH + 1), n_cols - 1)
    return r * n_cols + c


def objective(X, D):
    code = batch_lasso_cd(X, D, ALPHA, tol=1e-4)
    return float(np.mean(lasso_objective(X, code, D, ALPHA)))


class Recorder:
    """Times (callbacks excluded) and dictionary copies.

    ``CLOCK`` is the process's CPU time by default (``--clock cpu``): with
    one BLAS thread it equals the wall time on an idle machine and, unlike
    the wall time, barely moves when other processes share the cores;
    ``--clock wall`` records wall time.
    """

    clock = staticmethod(time.process_time)

    def __init__(self, every=1):
        self.every, self.calls, self.marks, self.paused = every, 0, [], 0.0

    def start(self):
        self.t0 = self.clock()

    def elapsed(self):
        return self.clock() - self.t0 - self.paused

    def record(self, D):
        t = self.clock()
        self.calls += 1
        if self.calls % self.every == 0:
            self.marks.append((t - self.t0 - self.paused, np.array(D, copy=True)))
        self.paused += self.clock() - t


def run_mbdl(X, seed, max_iter, every):
    rec = Recorder(every)
    model = MiniBatchDictionaryLearning(
        n_components=K, alpha=ALPHA, batch_size=256, max_iter=max_iter, random_state=seed,
        callback=lambda env: rec.record(env["dictionary"]),
    )
    rec.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X)
    total = rec.elapsed()
    rec.marks.append((total, model.components_.copy()))
    return rec.marks, total, model.n_steps_


def run_fedmm(clients, batch_size, seed, rounds, step_size="auto"):
    rec = Recorder()
    model = FederatedDictionaryLearning(
        n_components=K, alpha=ALPHA, batch_size=batch_size, max_iter=rounds, tol=0,
        random_state=seed, step_size=step_size,
        callback=lambda info: rec.record(info["theta"]),
    )
    rec.start()
    model.fit(clients)
    return rec.marks, model


def first_reach(curve, target):
    for t, f in curve:
        if f <= target:
            return t
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--patches", type=int, default=None)
    parser.add_argument("--eval", type=int, default=10000)
    parser.add_argument("--points", type=int, default=50, help="evaluated points per curve")
    parser.add_argument("--batch", type=int, default=2500,
                        help="rows per round: one client's batch_size (ten clients: a tenth each)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = parser.parse_args()
    if args.clock == "wall":
        Recorder.clock = staticmethod(time.perf_counter)
    n = args.patches or (20000 if args.quick else 60000)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    max_iter = 1 if args.quick else 3
    rounds = args.rounds or (20 if args.quick else 40)
    lines = []
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    stem = "bench_minibatch_quick" if args.quick else "bench_minibatch"

    def say(text=""):
        print(text, flush=True)
        lines.append(text)
        with open(os.path.join(out, stem + ".txt"), "w") as f:  # a partial run keeps its lines
            f.write("\n".join(lines) + "\n")

    say(f"Minibatch benchmark: {n} normalized 8x8 patches of china.jpg, {K} atoms, alpha {ALPHA}; "
        f"MiniBatchDictionaryLearning(batch_size=256, max_iter={max_iter}); FedMM default step "
        f"rule; {args.threads} BLAS thread(s); times are {args.clock} seconds (callbacks excluded)")
    say(f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    curves = {}
    summary = []
    with threadpool_limits(args.threads):
        for seed in seeds:
            X, r, c, shape = patches(n, seed)
            ev = X[np.random.default_rng(100 + seed).choice(n, size=min(args.eval, n), replace=False)]
            client_of = regions(r, c, shape)
            ten = [X[client_of == i] for i in range(10)]
            runs = {}
            marks, total, steps = run_mbdl(X, seed, max_iter, every=max(1, steps_every(n)))
            runs["MBDL"] = (marks, total)
            m1, model1 = run_fedmm(X, args.batch, seed, rounds)
            runs[f"FedMM, 1 client, batch {args.batch}"] = (m1, m1[-1][0])
            m10, model10 = run_fedmm(ten, args.batch // 10, seed, rounds)
            runs[f"FedMM, 10 regions, batch {args.batch // 10} each"] = (m10, m10[-1][0])
            for name, (marks, total) in runs.items():
                curves[(seed, name)] = [(t, objective(ev, D)) for t, D in thin(marks, args.points)]
            target = curves[(seed, "MBDL")][-1][1]
            t_mbdl = runs["MBDL"][1]
            say()
            say(f"seed {seed}: MBDL {steps} steps, {t_mbdl:.1f} s, final objective {target:.5f} "
                f"(client sizes for 10 regions: {[len(x) for x in ten]})")
            for name in list(runs)[1:]:
                curve = curves[(seed, name)]
                t = first_reach(curve, target)
                ratio = None if t is None else t / t_mbdl
                goal = 0.2 if "1 client" in name else 0.5
                summary.append((seed, name, ratio, goal))
                say(f"  {name:36s} final objective {curve[-1][1]:.5f} after {curve[-1][0]:.1f} s; "
                    f"reaches MBDL's at {'never' if t is None else f'{t:.1f} s'} "
                    f"({'-' if ratio is None else f'{ratio:.2f}x'} of MBDL's time; target <= {goal}x: "
                    f"{'MET' if ratio is not None and ratio <= goal else 'NOT MET'})")
    say()
    say(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say()
    say("Curves (seconds, objective):")
    for (seed, name), curve in curves.items():
        say(f"  seed {seed} {name}: " + " ".join(f"({t:.1f}, {f:.4f})" for t, f in curve))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(seeds), figsize=(6 * len(seeds), 4), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        for (s, name), curve in curves.items():
            if s == seed:
                ax.plot(*zip(*curve), marker=".", label=name)
        ax.axhline(curves[(seed, "MBDL")][-1][1], color="gray", lw=0.5)
        ax.set_xlabel(f"{args.clock} time (s)")
        ax.set_ylabel("objective (mean over the --eval rows)")
        ax.set_title(f"seed {seed}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, stem + ".png"), dpi=100)


def thin(marks, points):
    """At most ``points`` evenly spaced marks, the last one always kept."""
    if len(marks) <= points:
        return marks
    keep = np.unique(np.linspace(0, len(marks) - 1, points).round().astype(int))
    return [marks[i] for i in keep]


def steps_every(n):
    """Minibatch steps between two recorded dictionaries (about 20 per epoch)."""
    return max(1, int(np.ceil(n / 256)) // 20)


if __name__ == "__main__":
    main()
