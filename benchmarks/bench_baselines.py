"""FedMM against FedAvg, FedProx and SCAFFOLD, in uplink bits.

Objective against the bits the clients send, for

- FedMM (surrogate aggregation), exact messages;
- FedMM with QSGD (s=16) compression of the clients' messages;
- parameter averaging (``aggregation="parameter"``: one local MM step per
  round, its default, and the server averages the parameters; several
  local MM steps on these heterogeneous clients give degenerate local
  dictionaries on which the sparse coder is very slow);
- FedAvg, FedProx and SCAFFOLD (``aggregation="fedavg"``, ``"fedprox"``,
  ``"scaffold"``: local projected gradient steps, the same engine,
  participation, bit accounting and history),

on four heterogeneous federated problems:

- ``synthetic``: sparse-coded clients, each using its own atoms of a ground
  truth dictionary (``make_sparse_coded_clients(heterogeneous=True)``);
  atom recovery up to permutation and sign (Hungarian matching of
  ``|cos|``, an atom counts when matched with ``|cos| > 0.95``);
- ``digits``: ``load_digits()`` split by label (10 clients), a random 60%
  of each digit's rows per seed, features standardized;
- ``patches``: 8x8 patches of ``load_sample_image("china.jpg")`` (gray),
  one client per region of a 2x4 grid over the image (8 clients), patches
  drawn per seed, standardized;
- ``ot``: the semi-discrete entropic OT map of ``bench_ot.py``'s Gaussian
  problem, clients holding slices of the source sorted along its first
  coordinate (objective: the semi-dual).

Every method runs the same number of rounds with full participation; the
gradient baselines take ``LOCAL_STEPS`` local steps per round. Curves:
the exact objective at the parameter the server holds after each round
against the cumulative uplink bits (initialization included; the first
point of every curve is the common initial parameter).

Tuning (fair to the baselines): each gradient baseline's learning rate is
chosen on a grid of multiples of the problem's ``learning_rate="auto"``
(:meth:`MMProblem.default_learning_rate`), and FedProx's ``mu`` on a grid
relative to the inverse of that rate, by the best final objective on a
tuning seed that is not among the reported seeds. Reported seeds 0..N-1.

Goal: FedMM reaches each baseline's final objective with at most a quarter
of the bits that baseline needed to first reach it. For each seed and
baseline the ratio ``bits(FedMM first <= f_B) / bits(B first <= f_B)``
with ``f_B`` the baseline's final objective (inf when FedMM never reaches
it within its rounds); the table gives the median over seeds and how many
seeds meet the goal.

Usage::

    PYTHONPATH=. python benchmarks/bench_baselines.py            # 10 seeds
    PYTHONPATH=. python benchmarks/bench_baselines.py --quick    # 2 seeds, fewer rounds

Writes ``benchmarks/results/bench_baselines.txt`` (the printed output),
``bench_baselines.json`` (every curve) and ``bench_baselines.png``
(``--quick``: ``bench_baselines_quick.*``).
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import warnings

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import sklearn  # noqa: E402
from joblib import Parallel, delayed  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402
from sklearn.datasets import load_digits, load_sample_image  # noqa: E402
from sklearn.feature_extraction.image import extract_patches_2d  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
RESULTS = os.path.join(HERE, "results")

from bench_aggregation import standardize  # noqa: E402
from bench_ot import gaussian_problem  # noqa: E402

from skfedmm import FedMM  # noqa: E402
from skfedmm.datasets import make_sparse_coded_clients, split_by_labels  # noqa: E402
from skfedmm.problems import DictionaryLearningProblem, EntropicOTProblem  # noqa: E402

LOCAL_STEPS = 5
QSGD = ("qsgd", {"s": 16})
TUNE_SEED = 1000

FULL = dict(
    seeds=10, rounds=dict(synthetic=20, digits=15, patches=15, ot=25),
    lr_grid=(0.3, 1.0, 3.0), mu_grid=(0.1, 1.0),
    synthetic=dict(n_clients=8, n_samples=100, n_features=16, n_components=12,
                   atoms_per_client=6, alpha=0.2),
    digits=dict(fraction=0.3, n_components=10, alpha=1.0),
    patches=dict(per_client=60, n_components=10, alpha=1.0),
    ot=dict(d=5, n_clients=10, n=150, m=80, epsilon=0.15),
    coder_max_iter=200,
)
QUICK = dict(
    FULL, seeds=2, rounds=dict(synthetic=8, digits=6, patches=6, ot=8),
    lr_grid=(1.0, 3.0), mu_grid=(0.1,),
)
#: FedMM+QSGD runs this many times the rounds of the others (its rounds
#: cost about a fifth of the bits: the comparison is at a similar bit
#: budget), with the exact objective evaluated every that many rounds.
QSGD_ROUNDS = 3

METHODS = ("FedMM", "FedMM+QSGD", "param. avg.", "FedAvg", "FedProx", "SCAFFOLD")
BASELINES = ("param. avg.", "FedAvg", "FedProx", "SCAFFOLD")
AGGREGATION = {
    "FedMM": "surrogate", "FedMM+QSGD": "surrogate", "param. avg.": "parameter",
    "FedAvg": "fedavg", "FedProx": "fedprox", "SCAFFOLD": "scaffold",
}
SETTINGS = {
    "synthetic": "synthetic heterogeneous dictionary (8 clients, each using 6 of 12 atoms)",
    "digits": "load_digits split by label (10 clients)",
    "patches": "china.jpg 8x8 patches by image region (8 clients)",
    "ot": "entropic OT map, clients sorted along x0 (10 clients)",
}


# ------------------------------------------------------------------- data
def patch_clients(per_client, seed):
    """8 clients: the regions of a 2x4 grid over china.jpg (gray), 8x8 patches."""
    gray = load_sample_image("china.jpg").mean(axis=2) / 255.0
    h, w = gray.shape
    rng = np.random.RandomState(seed)
    clients = []
    for r in range(2):
        for c in range(4):
            region = gray[r * h // 2:(r + 1) * h // 2, c * w // 4:(c + 1) * w // 4]
            patches = extract_patches_2d(region, (8, 8), max_patches=per_client, random_state=rng)
            clients.append(patches.reshape(len(patches), -1))
    return standardize(clients)


def digit_clients(fraction, seed):
    digits = load_digits()
    rng = np.random.default_rng(seed)
    parts = split_by_labels(digits.data.astype(float), digits.target)
    parts = [p[np.sort(rng.choice(len(p), int(fraction * len(p)), replace=False))] for p in parts]
    return standardize(parts)


def make_setting(name, cfg, seed):
    """(clients, problem, extra) of one setting for one seed."""
    c = cfg[name]
    if name == "synthetic":
        clients, D = make_sparse_coded_clients(
            c["n_clients"], c["n_samples"], c["n_features"], c["n_components"],
            atoms_per_client=c["atoms_per_client"], heterogeneous=True, random_state=seed,
        )
        problem = DictionaryLearningProblem(c["n_components"], c["alpha"], c["n_features"],
                                            coder_max_iter=cfg["coder_max_iter"])
        return clients, problem, dict(truth=D)
    if name in ("digits", "patches"):
        clients = (digit_clients(c["fraction"], seed) if name == "digits"
                   else patch_clients(c["per_client"], seed))
        problem = DictionaryLearningProblem(c["n_components"], c["alpha"], clients[0].shape[1],
                                            coder_max_iter=cfg["coder_max_iter"])
        return clients, problem, {}
    clients, _, Y, _, _ = gaussian_problem(d=c["d"], n_clients=c["n_clients"], n=c["n"], m=c["m"],
                                           n_test=10, seed=seed)
    return clients, EntropicOTProblem(Y, epsilon=c["epsilon"]), {}


def matched_recovery(truth, learned, threshold=0.95):
    """Fraction of true atoms matched one-to-one (up to sign) with |cos| > threshold."""
    T = truth / np.linalg.norm(truth, axis=1, keepdims=True)
    norms = np.linalg.norm(learned, axis=1, keepdims=True)
    L = learned / np.where(norms > 0, norms, 1)
    cos = np.abs(T @ L.T)
    rows, cols = linear_sum_assignment(-cos)
    return float(np.sum(cos[rows, cols] > threshold) / T.shape[0])


# ------------------------------------------------------------------- runs
@contextlib.contextmanager
def _full_round_bits_counted():
    """The bits of the compressed initial full round of a fit whose clients
    run in this process (the history's first row counts them with the
    initialization statistic): each client's message and its loss (64 bits)."""
    from skfedmm.federation import client

    sent = []
    real = client.CLIENT_TASKS["full_compressed"]

    def counted(*args, **kwargs):
        answer = real(*args, **kwargs)
        if isinstance(answer, tuple) and len(answer) == 3:
            sent.append(answer[2] + 64)
        return answer

    client.CLIENT_TASKS["full_compressed"] = counted
    try:
        yield sent
    finally:
        client.CLIENT_TASKS["full_compressed"] = real


def run(name, method, seed, cfg, extra_params=None, tolerate=False):
    """One fit; the (bits, objective) curve, final objective, recovery, time.

    ``tolerate``: a diverging fit (tuning a too large learning rate) gives
    an infinite final objective instead of raising.
    """
    if tolerate:
        try:
            return run(name, method, seed, cfg, extra_params)
        except (ValueError, FloatingPointError, RuntimeWarning) as exc:
            return dict(setting=name, method=method, seed=seed, params=_jsonable(extra_params),
                        bits=[], objective=[], final=np.inf, wall=np.nan, error=str(exc))
    clients, problem, extra = make_setting(name, cfg, seed)
    params = dict(aggregation=AGGREGATION[method], max_iter=cfg["rounds"][name], tol=0.0,
                  random_state=seed)
    if method == "FedMM+QSGD":
        params.update(compression=QSGD, eval_every=QSGD_ROUNDS,
                      max_iter=QSGD_ROUNDS * cfg["rounds"][name])
    if method in ("FedAvg", "FedProx", "SCAFFOLD"):
        params.update(local_steps=LOCAL_STEPS)
    params.update(extra_params or {})
    engine = FedMM(problem, **params)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), _full_round_bits_counted() as full_sent:
        warnings.simplefilter("error", RuntimeWarning)
        state = engine.fit(clients)
    wall = time.perf_counter() - t0
    final, _ = engine.evaluate(clients, state.theta, state.weights, state=state)
    h = state.history
    bits = np.cumsum(np.asarray(h.bits_up, dtype=float))
    full = np.asarray(h.full_objective, dtype=float)
    # full_objective[r] is the objective at the parameter the server held
    # after the bits of rows 0..r-1; then the final parameter
    curve_bits = list(bits[:-1]) + [bits[-1]]
    curve_obj = list(full[1:]) + [final]
    # (rounds without an evaluation have NaN objectives: no point there)
    init_bits = bits[0]  # the initialization statistic
    if params["aggregation"] == "surrogate":
        # the server holds theta_0 after the initialization statistic alone
        # (before the initial full round): the point every method starts at
        n = len(clients)
        init_bits = bits[0] - (  # (compressed: the clients' counted messages)
            sum(full_sent) if full_sent else n * (state.layout.size * 64 + 64))
        curve_bits, curve_obj = [init_bits] + curve_bits, [full[0]] + curve_obj
    out = dict(setting=name, method=method, seed=seed, params=_jsonable(extra_params or {}),
               bits=curve_bits, objective=curve_obj, final=float(final), wall=wall,
               init_bits=float(init_bits))
    if "truth" in extra:
        out["recovery"] = matched_recovery(extra["truth"], state.theta)
    return out


def _jsonable(d):
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in d.items()}


def best_level(run_):
    """The baseline's best objective and the bits it first took to reach it."""
    obj = np.asarray(run_["objective"], dtype=float)
    level = float(np.nanmin(obj))
    return level, first_reach(run_["bits"], obj, level), int(np.nanargmin(obj)) == 0


def first_reach(bits, objective, level):
    """Bits at which the curve first gets to ``level`` or below (inf if never)."""
    obj = np.asarray(objective)
    ok = np.flatnonzero(np.isfinite(obj) & (obj <= level + 1e-12 * abs(level)))
    return float(bits[ok[0]]) if ok.size else np.inf


def auto_rate(name, cfg):
    """The problem's learning_rate="auto" on the tuning seed (the grids' unit)."""
    clients, problem, _ = make_setting(name, cfg, TUNE_SEED)
    state = FedMM(problem, aggregation="fedavg", max_iter=0, random_state=TUNE_SEED).fit(clients)
    return FedMM(problem, aggregation="fedavg")._learning_rate(state.problem, state.init_stat)


def tuning_grid(name, cfg, rate):
    grid = []
    for method in ("FedAvg", "SCAFFOLD"):
        for f in cfg["lr_grid"]:
            grid.append((method, dict(learning_rate=f * rate)))
    for f in cfg["lr_grid"]:
        for g in cfg["mu_grid"]:
            grid.append(("FedProx", dict(learning_rate=f * rate, mu=g / rate)))
    return grid


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, fewer rounds (a smoke run)")
    parser.add_argument("--n-jobs", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--replot", metavar="JSON", help="redraw the figure of a recorded run")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as fh:
            rec = json.load(fh)
        settings = list(dict.fromkeys(r["setting"] for r in rec["runs"]))
        plot(rec["runs"], settings, rec["config"], args.replot[:-len(".json")] + ".png")
        return
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    suffix = "_quick" if args.quick else ""
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    t_start = time.perf_counter()
    say("FedMM against FedAvg, FedProx, SCAFFOLD and parameter averaging: objective vs uplink bits")
    say(f"python {platform.python_version()}, numpy {np.__version__}, scikit-learn "
        f"{sklearn.__version__}; {cfg['seeds']} seeds; local steps {LOCAL_STEPS}; FedMM+QSGD: "
        f"QSGD s={QSGD[1]['s']}; rounds {cfg['rounds']}; load {os.getloadavg()}")
    parallel = Parallel(n_jobs=args.n_jobs)

    # ---- tuning on a seed not reported
    tuned = {}
    for name in args.settings:
        rate = auto_rate(name, cfg)
        grid = tuning_grid(name, cfg, rate)
        results = parallel(delayed(run)(name, m, TUNE_SEED, cfg, p, True) for m, p in grid)
        say()
        say(f"[{name}] tuning on seed {TUNE_SEED}: auto learning rate {rate:.4g}; final objective:")
        for (m, p), r in zip(grid, results):
            rel = {k: (v / rate if k == "learning_rate" else v * rate) for k, v in p.items()}
            say(f"  {m:<9} " + ", ".join(f"{k}={v:g}{' x auto' if k == 'learning_rate' else ' / auto'}"
                                       for k, v in rel.items()) + f": {r['final']:.6g}")
        for m in ("FedAvg", "FedProx", "SCAFFOLD"):
            cands = [(r["final"], p) for (mm, p), r in zip(grid, results)
                     if mm == m and np.isfinite(r["final"])]
            tuned[name, m] = min(cands, key=lambda c: c[0])[1]
            say(f"  chosen {m}: " + ", ".join(f"{k}={v:.4g}" for k, v in tuned[name, m].items()))

    # ---- reported seeds
    jobs = [(name, m, seed, tuned.get((name, m))) for name in args.settings
            for seed in range(cfg["seeds"]) for m in METHODS]
    results = parallel(delayed(run)(name, m, seed, cfg, p) for name, m, seed, p in jobs)
    by = {(r["setting"], r["method"], r["seed"]): r for r in results}

    say()
    say("Final objective (mean +/- std over seeds), uplink Mbit at the end, wall time (s) per fit;")
    say("ratio = bits for FedMM to first reach the baseline's best objective (its final one when it")
    say("improves monotonically) / bits the baseline needed to first reach it, both counted from the")
    say("common initial parameter theta_0 ('with init': counting the initialization statistic,")
    say("which FedMM+QSGD sends compressed and every other method exactly) (median over seeds;")
    say("'met' = seeds with ratio <= 0.25, out of the seeds where the baseline improves on the")
    say("initial parameter; 'at theta_0' = seeds where the baseline's best is that initial")
    say("parameter, which every method holds after the same initialization bits: no ratio).")
    goal = {}
    for name in args.settings:
        say()
        say(f"## {SETTINGS[name]} ({cfg['rounds'][name]} rounds)")
        head = f"| {'method':<11} | {'final objective':>21} | {'Mbit up':>8} | {'time':>6} |"
        if name == "synthetic":
            head += f" {'atoms recovered':>15} |"
        say(head)
        say("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
        for m in METHODS:
            rs = [by[name, m, s] for s in range(cfg["seeds"])]
            f = np.array([r["final"] for r in rs])
            row = (f"| {m:<11} | {f.mean():>11.6g} +/- {f.std():<7.2g} | "
                   f"{np.mean([r['bits'][-1] for r in rs]) / 1e6:8.3f} | "
                   f"{np.mean([r['wall'] for r in rs]):6.2f} |")
            if name == "synthetic":
                rec = np.array([r["recovery"] for r in rs])
                row += f" {rec.mean():>8.3f} +/- {rec.std():.2f} |"
            say(row)
        say()
        head = (f"| {'baseline':<11} | {'vs FedMM: ratio (met)':>34} | {'with init':>9} | "
                f"{'vs FedMM+QSGD: ratio (met)':>34} | {'with init':>9} |")
        say(head)
        say("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
        for b in BASELINES:
            cells = []
            for fm in ("FedMM", "FedMM+QSGD"):
                ratios, with_init, at_start = [], [], 0
                for s in range(cfg["seeds"]):
                    rb, rf = by[name, b, s], by[name, fm, s]
                    level, bb, start = best_level(rb)
                    if start:  # the baseline never went below the common theta_0
                        at_start += 1
                        continue
                    bf = first_reach(rf["bits"], rf["objective"], level)
                    # (each counted from its own theta_0: a compressed run
                    # sends its initialization statistic compressed too)
                    ratios.append((bf - rf["init_bits"]) / (bb - rb["init_bits"]))
                    with_init.append(bf / bb)
                ratios = np.array(ratios)
                met = int(np.sum(ratios <= 0.25))
                median = float(np.median(ratios)) if ratios.size else np.nan
                median_init = float(np.median(with_init)) if with_init else np.nan
                goal[name, b, fm] = (median, met, ratios.size, at_start)
                note = f"; {at_start} at theta_0" if at_start else ""
                cells.append(f"{median:>8.3g} ({met:>2}/{ratios.size} met{note})")
                cells.append(f"{median_init:>8.3g}")
            say(f"| {b:<11} | {cells[0]:>34} | {cells[1]:>9} | {cells[2]:>34} | {cells[3]:>9} |")

    say()
    say("Goal: FedMM reaches each baseline's best objective with <= 1/4 of its bits (every seed")
    say("where the baseline improves on theta_0):")
    for fm in ("FedMM", "FedMM+QSGD"):
        for name in args.settings:
            missed = [b for b in BASELINES if goal[name, b, fm][1] < goal[name, b, fm][2]]
            met = [b for b in BASELINES if b not in missed and goal[name, b, fm][2]]
            say(f"  {fm:<10} {name:<9}: met against " + (", ".join(met) or "none") + (
                "" if not missed else "; NOT met against " + ", ".join(
                    f"{b} ({goal[name, b, fm][1]}/{goal[name, b, fm][2]} seeds, median ratio "
                    f"{goal[name, b, fm][0]:.3g})" for b in missed)))
    say()
    say(f"total wall time {time.perf_counter() - t_start:.0f} s; load {os.getloadavg()}")

    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"bench_baselines{suffix}.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, f"bench_baselines{suffix}.json"), "w") as fh:
        json.dump(dict(config={k: v for k, v in cfg.items()}, local_steps=LOCAL_STEPS,
                       tuned={f"{k[0]}/{k[1]}": v for k, v in tuned.items()},
                       runs=results), fh, default=float)
    plot(results, args.settings, cfg, os.path.join(RESULTS, f"bench_baselines{suffix}.png"))


def plot(results, settings, cfg, path):
    """Normalized objective against uplink bits, median over seeds.

    Per seed, ``(F - F*) / (F(theta_0) - F*)`` with ``F*`` the best objective
    any method reached on that seed (seeds differ in data): 1 at the common
    initial parameter, 0 at the best seen. Linear axes (the method that
    reached ``F*`` ends at 0; a log scale would exaggerate that).
    """
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, name in zip(axes[0], settings):
        rs = [r for r in results if r["setting"] == name]
        best, start = {}, {}
        for r in rs:
            obj = np.asarray(r["objective"], dtype=float)
            best[r["seed"]] = min(best.get(r["seed"], np.inf), np.nanmin(obj))
            start[r["seed"]] = obj[0]
        for m in METHODS:
            runs = sorted((r for r in rs if r["method"] == m), key=lambda r: r["seed"])
            bits = np.mean([r["bits"] for r in runs], axis=0)
            rel = np.array([
                (np.asarray(r["objective"], dtype=float) - best[r["seed"]])
                / (start[r["seed"]] - best[r["seed"]]) for r in runs
            ])
            rel = np.median(rel, axis=0)
            keep = np.isfinite(rel)  # (FedMM+QSGD is evaluated every QSGD_ROUNDS rounds)
            ax.plot(bits[keep] / 1e6, rel[keep], label=m, color=colors[m],
                    ls="--" if m == "FedMM+QSGD" else "-", marker="." if m == "FedMM+QSGD" else None)
        ax.set_xlabel("uplink Mbit (cumulative, initialization included)")
        ax.set_title(f"{name} ({cfg['rounds'][name]} rounds)")
        ax.set_ylim(-0.05, 1.5)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("(F - best seen) / (F(theta_0) - best seen)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
