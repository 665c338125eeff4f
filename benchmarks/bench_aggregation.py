"""The "impact of aggregation space" study for federated dictionary learning.

Reproduces, for :class:`skfedmm.FederatedDictionaryLearning`, the study of
the FedMM paper (Dieuleveut, Fort, Hegazy, Wai, 2025) that motivates
surrogate aggregation:

1. **Surrogate against parameter aggregation** on four federated data sets:

   (a) synthetic homogeneous clients (every client uses every atom of a
       ground-truth dictionary);
   (b) synthetic heterogeneous clients (each client uses its own subset of
       the atoms: ``make_sparse_coded_clients(heterogeneous=True)``);
   (c) 8x8 patches of the two images of
       ``sklearn.datasets.load_sample_images()``, one client per quadrant of
       each image (8 clients);
   (d) ``sklearn.datasets.load_digits()``, one client per digit (10 clients).

   Curves per round (from ``history_``): the objective, the parameter update
   size ||theta_{t+1} - theta_t|| and the statistic update size
   ||S_{t+1} - S_t||, mean +/- std over runs.

2. **Heterogeneity ablations** on the heterogeneous synthetic clients (b),
   surrogate aggregation, with and without control variates (``cv_rate=0``):

   - partial participation, each client active with probability
     p in {1, 0.5, 0.2, 0.1};
   - compression of the clients' messages: QSGD with s in {1, 4, 16}
     levels and random-k sparsification keeping 10% of the entries.

   Final objective (exact, all rows, at the final dictionary) and the exact
   objective against the bits sent.

Usage::

    PYTHONPATH=. python benchmarks/bench_aggregation.py --quick     # < 1 min
    PYTHONPATH=. python benchmarks/bench_aggregation.py --runs 10 --n-jobs 2
    PYTHONPATH=. python benchmarks/bench_aggregation.py --replot benchmarks/results/aggregation_5runs.json

Writes ``benchmarks/results/aggregation_<mode>.png``,
``ablation_participation_<mode>.png``, ``ablation_compression_<mode>.png``,
``aggregation_<mode>.json`` (configuration, machine, every number),
``aggregation_<mode>.csv`` (one row per run and round) and
``aggregation_<mode>.txt`` (the printed output). Every number printed
or written is computed by the run: nothing is hard-coded.
"""

import argparse
import csv
import datetime
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
import scipy  # noqa: E402
import sklearn  # noqa: E402
from joblib import Parallel, delayed  # noqa: E402
from sklearn.datasets import load_digits, load_sample_images  # noqa: E402
from sklearn.feature_extraction.image import extract_patches_2d  # noqa: E402

import skfedmm  # noqa: E402
from skfedmm import FederatedDictionaryLearning, plot_history  # noqa: E402
from skfedmm.datasets import make_sparse_coded_clients, split_by_labels  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

FULL = dict(
    runs=10,
    rounds=30,  # aggregation study
    ablation_rounds=60,
    eval_every=5,  # exact objective every 5 rounds in the (noisy) ablations
    n_clients=10, n_samples=500, n_features=40, n_components=30, atoms_per_client=8,
    alpha=0.2,
    patches_per_client=300, image_components=32, image_alpha=1.0,
    digits_components=32, digits_alpha=1.0,
)
QUICK = dict(
    FULL, runs=1, rounds=8, ablation_rounds=10, n_samples=100, n_features=20, n_components=15,
    atoms_per_client=4, patches_per_client=100, image_components=16, digits_components=16,
)

DATASETS = {
    "homogeneous": "(a) synthetic, homogeneous clients",
    "heterogeneous": "(b) synthetic, heterogeneous clients",
    "images": "(c) 8x8 patches of load_sample_images(), one client per quadrant",
    "digits": "(d) load_digits(), one client per digit",
}
PARTICIPATION = (1.0, 0.5, 0.2, 0.1)
COMPRESSION = {
    "none": None,
    "qsgd s=16": ("qsgd", {"s": 16}),
    "qsgd s=4": ("qsgd", {"s": 4}),
    "qsgd s=1": ("qsgd", {"s": 1}),
    "randk 10%": ("randk", {"ratio": 0.1}),
}
CV = {"CV": "auto", "no CV": 0.0}


# ------------------------------------------------------------------- data
def standardize(clients):
    """Centre and scale features with the pooled mean and std.

    As scikit-learn's image-denoising example does on the pooled patches;
    federated, the pooled mean and std are one exact aggregation round of
    per-client first and second moments.
    """
    X = np.vstack(clients)
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std[std == 0] = 1.0
    return [(c - mean) / std for c in clients]


def image_clients(patches_per_client, seed):
    """8 clients: the four quadrants of each sample image, gray, 8x8 patches."""
    rng = np.random.RandomState(seed)
    clients = []
    for image in load_sample_images().images:
        gray = image.mean(axis=2) / 255.0
        h, w = gray.shape
        for rows in (slice(0, h // 2), slice(h // 2, h)):
            for cols in (slice(0, w // 2), slice(w // 2, w)):
                patches = extract_patches_2d(
                    gray[rows, cols], (8, 8), max_patches=patches_per_client, random_state=rng
                )
                clients.append(patches.reshape(len(patches), -1))
    return standardize(clients)


def digits_clients():
    """10 clients, one per digit; pixel features standardized."""
    digits = load_digits()
    return standardize(split_by_labels(digits.data.astype(float), digits.target))


def make_data(name, cfg, seed):
    """(clients, n_components, alpha) of one data set for one run."""
    if name in ("homogeneous", "heterogeneous"):
        clients, _ = make_sparse_coded_clients(
            cfg["n_clients"], cfg["n_samples"], cfg["n_features"], cfg["n_components"],
            atoms_per_client=cfg["atoms_per_client"], heterogeneous=name == "heterogeneous",
            random_state=seed,
        )
        return clients, cfg["n_components"], cfg["alpha"]
    if name == "images":
        return image_clients(cfg["patches_per_client"], seed), cfg["image_components"], cfg["image_alpha"]
    return digits_clients(), cfg["digits_components"], cfg["digits_alpha"]


# ------------------------------------------------------------------- runs
def final_objective(model, clients):
    """Exact objective at the final dictionary: mean over all rows (= -score)."""
    return -model.score(clients)


def run_one(study, dataset, setting, seed, cfg):
    """Fit one model; return its history (as lists) and its final objective."""
    clients, k, alpha = make_data(dataset, cfg, seed)
    params = dict(n_components=k, alpha=alpha, tol=0, random_state=seed)
    if study == "aggregation":
        params.update(aggregation=setting["aggregation"], max_iter=cfg["rounds"])
    else:
        params.update(
            max_iter=cfg["ablation_rounds"], eval_every=cfg["eval_every"],
            participation=setting.get("participation", 1.0),
            compression=setting.get("compression"), cv_rate=setting["cv_rate"],
        )
    model = FederatedDictionaryLearning(**params)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.fit(clients)
    wall = time.perf_counter() - t0
    history = model.history_.as_dict()
    history.pop("failed")
    return dict(
        study=study, dataset=dataset, setting=setting["label"], seed=seed,
        history={k: v.tolist() for k, v in history.items()},
        final=final_objective(model, clients), wall=wall,
        bits_up=model.bits_up_, bits_down=model.bits_down_,
    )


STUDIES = ("aggregation", "participation", "compression")


def tasks(cfg, studies=STUDIES):
    out = []
    if "compression" in studies and "participation" not in studies:
        raise ValueError("the compression study needs the participation study (its reference)")
    for seed in range(cfg["runs"]):
        for dataset in DATASETS if "aggregation" in studies else ():
            for agg in ("surrogate", "parameter"):
                out.append(("aggregation", dataset, dict(label=agg, aggregation=agg), seed))
        for p in PARTICIPATION if "participation" in studies else ():
            for cv_name, cv in CV.items():
                out.append((
                    "participation", "heterogeneous",
                    dict(label=f"p={p:g}, {cv_name}", participation=p, cv_rate=cv), seed,
                ))
        for comp_name, comp in COMPRESSION.items() if "compression" in studies else ():
            if comp is None:
                continue  # the uncompressed reference is p=1 of the participation study
            for cv_name, cv in CV.items():
                out.append((
                    "compression", "heterogeneous",
                    dict(label=f"{comp_name}, {cv_name}", compression=comp, cv_rate=cv), seed,
                ))
    return out


# ---------------------------------------------------------------- reports
def machine():
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
            )
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join(["python"] + sys.argv),
        nproc=nproc, cpu=model, load_average_at_start=load, platform=platform.platform(),
        python=platform.python_version(), numpy=np.__version__, scipy=scipy.__version__,
        scikit_learn=sklearn.__version__, matplotlib=matplotlib.__version__,
        skfedmm=skfedmm.__version__,
    )


def group(results, study, dataset=None):
    """label -> list of results (in seed order) for one study (and data set)."""
    out = {}
    for r in results:
        if r["study"] == study and (dataset is None or r["dataset"] == dataset):
            out.setdefault(r["setting"], []).append(r)
    return out


def histories(runs):
    return [{k: np.asarray(v, dtype=float) for k, v in r["history"].items()} for r in runs]


def mean_std(values):
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std())


def fmt_ms(values, spec=".4f"):
    m, s = mean_std(values)
    return f"{m:{spec}} +/- {s:{spec}}" if len(values) > 1 else f"{m:{spec}}"


def table(header, rows):
    widths = [max(len(str(r[j])) for r in [header] + rows) for j in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w)
                       for j, (c, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_aggregation(results, cfg):
    print(f"\n1. Surrogate vs parameter aggregation ({cfg['rounds']} rounds, full participation, "
          f"no compression, {cfg['runs']} run(s) per setting; mean +/- std over runs)")
    rows = []
    summary = {}
    for dataset in DATASETS:
        groups = group(results, "aggregation", dataset)
        for agg, runs in groups.items():
            hs = histories(runs)
            last_param = [h["param_change"][-1] for h in hs]
            last_stat = [h["stat_change"][-1] for h in hs]
            finals = [r["final"] for r in runs]
            # objective at theta_0: the first reported value (row 0 for
            # surrogate aggregation, row 1 for the parameter baseline)
            first = [h["objective"][np.isfinite(h["objective"])][0] for h in hs]
            summary[dataset, agg] = dict(final=mean_std(finals), initial=mean_std(first))
            rows.append([
                dataset, agg, fmt_ms(first), fmt_ms(finals), fmt_ms(last_param, ".2e"),
                "-" if agg == "parameter" else fmt_ms(last_stat, ".2e"),
                f"{np.mean([r['wall'] for r in runs]):.2f}",
            ])
    print(table(["data", "aggregation", "objective at theta_0", "final objective",
                 "last ||dtheta||", "last ||dS||", "time (s)"], rows))
    print()
    for dataset in DATASETS:
        s, p = summary[dataset, "surrogate"]["final"][0], summary[dataset, "parameter"]["final"][0]
        print(f"{dataset:14s} final objective, surrogate / parameter = {s / p:.3f}")
    return summary


def ablation_groups(results, study):
    """label -> runs; the compression study gets the uncompressed reference.

    The reference ("none") is the p=1 run of the participation study: the
    same data, seeds and rounds, without compression.
    """
    groups = group(results, study)
    if study == "compression":
        base = group(results, "participation")
        ref = {label.replace("p=1, ", "none, "): runs for label, runs in base.items()
               if label.startswith("p=1, ")}
        groups = {**ref, **groups}
    return groups


#: "Reached" means an exact objective within this relative gap of the
#: reference (full participation, no compression) final objective.
REACH = 0.01


def bits_to_reach(run, target, uplink):
    """Cumulative bits (uplink only, or up + down) when the exact objective
    first falls to ``target``; NaN when it never does."""
    h = run["history"]
    objective = np.asarray(h["full_objective"], dtype=float)
    bits = np.asarray(h["bits_up"], dtype=float)
    if not uplink:
        bits = bits + np.asarray(h["bits_down"], dtype=float)
    bits = np.cumsum(bits)
    hit = np.flatnonzero(np.isfinite(objective) & (objective <= target))
    return float(bits[hit[0]]) if hit.size else np.nan


def fmt_reach(values, n):
    reached = [v for v in values if np.isfinite(v)]
    if not reached:
        return f"never (0/{n})"
    return f"{np.mean(reached) / 1e6:.1f} ({len(reached)}/{n})"


def report_ablation(results, study, cfg):
    title = {"participation": "partial participation", "compression": "compression"}[study]
    print(f"\n2. Ablation, {title}, heterogeneous clients ({cfg['ablation_rounds']} rounds, "
          f"step_size='auto', {cfg['runs']} run(s); final objective: exact, all rows, at the final "
          "dictionary; mean +/- std over runs)")
    groups = ablation_groups(results, study)
    reference = groups[("p=1" if study == "participation" else "none") + ", CV"]
    target = (1 + REACH) * np.mean([r["final"] for r in reference])
    uplink = study == "compression"
    settings = list(dict.fromkeys(label.rsplit(", ", 1)[0] for label in groups))
    rows = []
    for s in settings:
        runs = {cv_name: groups[f"{s}, {cv_name}"] for cv_name in CV}
        gamma = np.mean([np.nanmean(h["step_size"][1:]) for h in histories(runs["CV"])])
        rows.append(
            [s, f"{gamma:.3f}"]
            + [fmt_ms([r["final"] for r in runs[cv_name]]) for cv_name in CV]
            + [f"{np.mean([r['bits_up'] for r in runs[cv_name]]) / 1e6:.2f}" for cv_name in CV]
            + [fmt_reach([bits_to_reach(r, target, uplink) for r in runs[cv_name]],
                         len(runs[cv_name])) for cv_name in CV]
        )
    what = "Mbit up" if uplink else "Mbit up+down"
    print(table(["setting", "mean gamma", "final obj. (CV)", "final obj. (no CV)", "Mbit up (CV)",
                 "Mbit up (no CV)", f"{what} to reach (CV)", f"{what} to reach (no CV)"], rows))
    print(f"'to reach': {what} sent when the exact objective (evaluated every "
          f"{cfg['eval_every']} rounds) first falls within {REACH:.0%} of the reference final "
          f"objective ({target / (1 + REACH):.4f}, full participation, no compression, CV); mean "
          "over the runs that reach it (runs reaching / runs).")
    out = {}
    for label, runs in groups.items():
        reach = [bits_to_reach(r, target, uplink) for r in runs]
        out[label] = dict(
            final=mean_std([r["final"] for r in runs]),
            step_size=float(np.mean([np.nanmean(h["step_size"][1:]) for h in histories(runs)])),
            bits_up=float(np.mean([r["bits_up"] for r in runs])),
            bits_down=float(np.mean([r["bits_down"] for r in runs])),
            bits_to_reach=[None if not np.isfinite(v) else v for v in reach],
        )
    return out


# ---------------------------------------------------------------- figures
def figure_aggregation(results, path):
    fig, axes = plt.subplots(len(DATASETS), 3, figsize=(14, 3.4 * len(DATASETS)),
                             layout="constrained")
    for row, dataset in zip(axes, DATASETS):
        groups = group(results, "aggregation", dataset)
        plot_history({agg: histories(runs) for agg, runs in groups.items()}, ax=row,
                     log={"objective": "auto", "param_change": True, "stat_change": True})
        row[0].set_title(DATASETS[dataset], loc="left", fontsize="medium")
    n_runs = len({r["seed"] for r in results})
    band = f"; mean, shaded +/- std over {n_runs} runs" if n_runs > 1 else ""
    fig.suptitle(f"Surrogate (FedMM) vs parameter aggregation: dictionary learning{band}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_ablation(results, study, path, x_bits):
    groups = ablation_groups(results, study)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), layout="constrained", sharey=True)
    for row, cv_name in zip(axes, CV):
        sub = {label.rsplit(", ", 1)[0]: histories(runs) for label, runs in groups.items()
               if label.endswith(", " + cv_name)}
        plot_history(sub, metrics=("full_objective",), ax=row[:1], log=False)
        plot_history(sub, x=x_bits, metrics=("full_objective",), ax=row[1:], log=False,
                     log_x=True)
        what = "with control variates (cv_rate='auto')" if cv_name == "CV" else \
            "without control variates (cv_rate=0)"
        row[0].set_title(what, loc="left", fontsize="medium")
    title = {"participation": "Partial participation", "compression": "Compression"}[study]
    n_runs = len({r["seed"] for r in results})
    band = f"; mean, shaded +/- std over {n_runs} runs" if n_runs > 1 else ""
    fig.suptitle(f"{title}, heterogeneous clients: exact objective every few rounds{band}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(results, path):
    fields = ["study", "dataset", "setting", "seed", "round", "bits_cumulative", "objective",
              "full_objective", "param_change", "stat_change", "mean_field", "n_active"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for r in results:
            h = r["history"]
            bits = np.cumsum(np.asarray(h["bits_up"]) + np.asarray(h["bits_down"]))
            for t in range(len(h["objective"])):
                writer.writerow([r["study"], r["dataset"], r["setting"], r["seed"], t, int(bits[t])]
                                + [h[k][t] for k in fields[6:]])


# ------------------------------------------------------------------- main
class Tee:
    """Print to the terminal and to the results' text log at once."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 run, few rounds, small sizes (well under a minute)")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per setting (seeds 0..runs-1); default 10, 1 with --quick")
    parser.add_argument("--n-jobs", type=int, default=1, help="fits run in parallel (joblib)")
    parser.add_argument("--out", default=RESULTS, help="output directory")
    parser.add_argument("--studies", default=",".join(STUDIES),
                        help="comma-separated studies to run (default: all); the compression "
                             "study needs the participation study, its reference")
    parser.add_argument("--replot", metavar="JSON", default=None,
                        help="no fits: print the tables and redraw the figures of a previous run's "
                             "JSON file")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        replot(saved, os.path.dirname(os.path.abspath(args.replot)))
        return
    cfg = dict(QUICK if args.quick else FULL)
    if args.runs is not None:
        cfg["runs"] = args.runs
    cfg["studies"] = [s for s in STUDIES if s in args.studies.split(",")]
    mode = "quick" if args.quick else f"{cfg['runs']}runs"
    if cfg["studies"] != list(STUDIES):
        mode += "_" + "_".join(cfg["studies"])
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, f"aggregation_{mode}.txt"), "w")
    stdout, sys.stdout = sys.stdout, Tee(sys.stdout, log)
    try:
        run(args, cfg, mode)
    finally:
        sys.stdout = stdout
        log.close()


def run(args, cfg, mode):
    info = machine()
    print_header(info, cfg)

    t0 = time.perf_counter()
    todo = tasks(cfg, cfg.get("studies", STUDIES))
    results = Parallel(n_jobs=args.n_jobs)(
        delayed(run_one)(study, dataset, setting, seed, cfg) for study, dataset, setting, seed in todo
    )
    fit_time = time.perf_counter() - t0
    outputs(results, cfg, mode, args.out, info, fit_time)
    print(f"\n{len(todo)} fits in {fit_time:.1f} s (n_jobs={args.n_jobs}); total "
          f"{time.perf_counter() - t0:.1f} s")


def replot(saved, out):
    """Tables and figures of a saved run, without fitting.

    Rewrites the figures and the text log (``.txt``) from the JSON, which is
    left as it is: the machine and fit time printed are the saved run's.
    """
    cfg, results = saved["config"], saved["runs"]
    quick = all(cfg.get(k) == v for k, v in QUICK.items())
    mode = "quick" if quick else f"{cfg['runs']}runs"
    if list(cfg.get("studies", STUDIES)) != list(STUDIES):
        mode += "_" + "_".join(cfg["studies"])
    with open(os.path.join(out, f"aggregation_{mode}.txt"), "w") as log:
        stdout, sys.stdout = sys.stdout, Tee(sys.stdout, log)
        try:
            print_header(saved["machine"], cfg)
            print("(tables and figures redrawn from the saved JSON with --replot)")
            outputs(results, cfg, mode, out, None, saved["fit_seconds"])
            print(f"\n{len(results)} fits in {saved['fit_seconds']:.1f} s (the saved run's "
                  "fit time)")
        finally:
            sys.stdout = stdout


def print_header(info, cfg):
    print("Machine")
    for k, v in info.items():
        print(f"  {k:22s} {v}")
    print("Configuration")
    for k, v in cfg.items():
        print(f"  {k:22s} {v}")


def outputs(results, cfg, mode, out, info, fit_time):
    """Print the tables; draw the figures; write the JSON and CSV (fresh runs)."""
    studies = cfg.get("studies", STUDIES)
    summary, paths = {}, {}
    if "aggregation" in studies:
        summary["aggregation"] = {f"{d}/{a}": v for (d, a), v in
                                  report_aggregation(results, cfg).items()}
        paths["aggregation"] = os.path.join(out, f"aggregation_{mode}.png")
        figure_aggregation(results, paths["aggregation"])
    for study, x_bits in (("participation", "bits"), ("compression", "bits_up")):
        if study in studies:
            summary[study] = report_ablation(results, study, cfg)
            paths[study] = os.path.join(out, f"ablation_{study}_{mode}.png")
            figure_ablation(results, study, paths[study], x_bits)
    print("\nwrote " + ", ".join(os.path.relpath(p, os.getcwd()) for p in paths.values()))
    if info is None:
        return
    with open(os.path.join(out, f"aggregation_{mode}.json"), "w") as f:
        json.dump(dict(machine=info, config=cfg, fit_seconds=fit_time, summary=summary,
                       runs=results), f)
    write_csv(results, os.path.join(out, f"aggregation_{mode}.csv"))
    print(f"and {os.path.relpath(os.path.join(out, f'aggregation_{mode}.json'), os.getcwd())}"
          " (+ .csv, + .txt: this output)")


if __name__ == "__main__":
    main()
