"""Per-round time of dictionary learning's client coder, against a baseline revision.

One client, 5000 x 40 rows (sparse combinations of 30 atoms plus noise),
30 atoms, alpha 0.1, full batches, 30 rounds: the time per round and the
final objective of FedMM with this tree's coder (coordinate descent, the
default for an undercomplete dictionary) with cold starts
(``code_cache=False``) and with the default warm starts (each row starts
at its last code plus its last move, ``code_cache="auto"``), and with
the coder of a baseline revision (default: the revision before the
coder's speed work, extracted with ``git archive``). Then the same
comparison on an overcomplete problem, 5000 normalized 8x8 patches of
``china.jpg`` with 100 atoms and alpha 0.5 (10 rounds), where this tree's
coder is the exact active-set solver.
Each configuration runs in its own subprocess (one BLAS thread), the
configurations interleaved and repeated; the table shows the median
seconds per round (wall and CPU) and the final objective (mean over rows
of 1/2||x - hD||^2 + alpha||h||_1 with the codes of the last round, and
re-evaluated with cold codes at the final dictionary).

Usage::

    python benchmarks/bench_coder.py            # 5 repeats
    python benchmarks/bench_coder.py --quick    # 1 repeat, 10 rounds

Target (first problem): at least 3x fewer seconds per round than the
baseline at the same objective (this tree's default no worse than the
baseline's by more than 1e-4, relative; lower is better).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BASELINE = "f8c8249"

CHILD = r"""
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
threadpool_limits(1)
from skfedmm import FederatedDictionaryLearning
from skfedmm.datasets import make_sparse_coded_clients
from skfedmm.problems.dictionary import DictionaryLearningProblem
cfg = json.loads(sys.argv[1])
if cfg.get("data"):
    X = np.load(cfg["data"])
else:
    (X,), _ = make_sparse_coded_clients(1, cfg["n"], 40, 30, n_nonzero=3, heterogeneous=False,
                                        random_state=cfg["seed"])
k, alpha = cfg.get("k", 30), cfg.get("alpha", 0.1)
wall, cpu = [], []
def callback(info):
    wall.append(time.perf_counter()); cpu.append(time.process_time())
kwargs = dict(n_components=k, alpha=alpha, max_iter=cfg["rounds"], tol=0, random_state=0,
              callback=callback)
if cfg["cache"] is not None:
    kwargs["code_cache"] = cfg["cache"]
est = FederatedDictionaryLearning(**kwargs).fit(X)
cold = DictionaryLearningProblem(k, alpha, X.shape[1]).loss(X, est.components_)
print(json.dumps(dict(wall=float(np.median(np.diff(wall))), cpu=float(np.median(np.diff(cpu))),
                      objective=float(est.error_[-1]), cold=float(cold))))
"""


def run(tree, cache, cfg):
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(dict(cfg, cache=cache))],
        capture_output=True, text=True, env=env, check=True, cwd=tree,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(say, configs, cfg, repeat):
    """Run the configurations interleaved; print the table; return the last
    configuration's CPU speedup and relative objective difference."""
    say(f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = {name: [] for name, _, _ in configs}
    for _ in range(repeat):
        for name, tree, cache in configs:
            results[name].append(run(tree, cache, cfg))
    say(f"load average at end:   {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say()
    base = configs[0][0]
    bcpu = min(r["cpu"] for r in results[base])
    bobj = results[base][0]["objective"]
    say(f"{'configuration':42s} {'s/round wall':>12s} {'s/round CPU':>12s} {'speedup (CPU)':>13s} "
        f"{'objective':>12s} {'rel. diff':>10s} {'cold-code obj.':>14s}")
    for name, _, _ in configs:
        wall = min(r["wall"] for r in results[name])
        cpu = min(r["cpu"] for r in results[name])
        obj = results[name][0]["objective"]
        say(f"{name:42s} {wall:12.4f} {cpu:12.4f} {bcpu / cpu:12.2f}x {obj:12.8f} "
            f"{(obj - bobj) / bobj:+10.1e} {results[name][0]['cold']:14.8f}")
    say()
    say("(best of the repeats' medians; wall time is sensitive to other processes, CPU time "
        "less so)")
    new = configs[-1][0]
    speed = bcpu / min(r["cpu"] for r in results[new])
    return speed, (results[new][0]["objective"] - bobj) / bobj


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline coder")
    args = parser.parse_args()
    repeat, rounds = (1, 10) if args.quick else (5, 30)
    cfg = dict(n=5000, rounds=rounds, seed=0)
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "archive", args.baseline, "skfedmm"], cwd=ROOT, capture_output=True, check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        configs = [
            (f"baseline {args.baseline}", tmp, None),
            ("this tree, code_cache=False", ROOT, False),
            ("this tree, default (code_cache='auto')", ROOT, None),
        ]
        say(f"Coder benchmark: one client, 5000 x 40 rows, 30 atoms, alpha 0.1, {rounds} rounds, "
            f"1 BLAS thread; {repeat} interleaved repeats, median per round")
        speed, rel = table(say, configs, cfg, repeat)
        say(f"Target >= 3x per round at the same objective (rel. diff <= 1e-4; lower is better): "
            f"{'MET' if speed >= 3 and rel <= 1e-4 else 'NOT MET'} ({speed:.2f}x, {rel:.1e})")
        # the overcomplete case, where the active-set solver runs
        from bench_minibatch import patches

        data = os.path.join(tmp, "patches.npy")
        np.save(data, patches(5000, 0)[0])
        p_rounds = 4 if args.quick else 10
        say()
        say(f"Image patches: one client, 5000 normalized 8x8 patches of china.jpg, 100 atoms, "
            f"alpha 0.5, {p_rounds} rounds, 1 BLAS thread; {repeat} interleaved repeats, median "
            f"per round (this tree: the active-set solver, chosen for overcomplete dictionaries)")
        table(say, configs, dict(data=data, k=100, alpha=0.5, rounds=p_rounds), repeat)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    name = "bench_coder_quick.txt" if args.quick else "bench_coder.txt"
    with open(os.path.join(HERE, "results", name), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
