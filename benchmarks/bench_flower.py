"""skfedmm on Flower, on loopback: seconds per round, where they go, bytes per client.

Starts a SuperLink and three SuperNodes on this machine
(:class:`skfedmm.flower.loopback.LoopbackFederation`, insecure, 127.0.0.1),
fits ``FederatedDictionaryLearning`` (surrogate aggregation, every client
every round) through ``examples/flower_app`` once without compression and
once with QSGD, and reports:

- seconds per round (median) and, per exchange, the time to push the
  requests and to receive the last reply, against the same fit in-process
  (the computation itself) and the time a new ClientApp process takes to
  import what it needs (Flower starts one per message);
- array bytes per round per client, up (the message) and down (the
  dictionary and the server statistic), against the formulas of
  ``doc/what_leaves_a_client.md``: ``k^2 + d k`` values up (the
  compressor's bits for them: QSGD sends the norm and its levels,
  Rice-coded by default, a variable length that the engine counts
  exactly; at most ``1 + ceil(log2(s + 1))`` bits per entry with
  ``coding="fixed"``), ``k d + k^2 + d k`` values down. The loss (64 bits)
  and the bit count travel as config values besides.

Usage::

    python benchmarks/bench_flower.py            # writes benchmarks/results/bench_flower.txt
    python benchmarks/bench_flower.py --quick    # 3 nodes x 200 rows, 2 rounds (_quick.txt)
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from skfedmm import FederatedDictionaryLearning
from skfedmm.flower.loopback import LoopbackFederation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_aggregation import Tee  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "examples", "flower_app")


def import_seconds():
    """Seconds a fresh process takes to import the ClientApp's modules."""
    code = "import time; t = time.perf_counter(); import flwr.clientapp, skfedmm.flower; " \
           "print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n_rows, d, k, rounds = (200, 20, 8, 2) if args.quick else (2000, 20, 8, 4)
    name = "bench_flower_quick.txt" if args.quick else "bench_flower.txt"
    with open(os.path.join(REPO, "benchmarks", "results", name), "w") as record:
        sys.stdout = Tee(sys.__stdout__, record)
        try:
            run(n_rows, d, k, rounds)
            print(f"# load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        finally:
            sys.stdout = sys.__stdout__


def run(n_rows, d, k, rounds):
    rng = np.random.default_rng(0)
    print(f"# bench_flower: 3 SuperNodes x {n_rows} rows x {d} features, "
          f"FederatedDictionaryLearning(n_components={k}), {rounds} rounds, participation 1")
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    import flwr

    print(f"# flwr {flwr.__version__}; SuperExec task poll interval "
          "FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.05 s; transport poll-interval 0.05 s")
    imports = [import_seconds() for _ in range(3)]
    print(f"# a new process importing flwr.clientapp + skfedmm.flower: "
          f"{np.median(imports):.2f} s (median of 3, machine idle)")
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(3):
            files.append(os.path.join(tmp, f"rows{i}.npy"))
            np.save(files[-1], rng.standard_normal((n_rows, d)) + i)
        rows = [np.load(f) for f in files]
        t0 = time.perf_counter()
        with LoopbackFederation(os.path.join(tmp, "fed"), files) as fed:
            print(f"# SuperLink and SuperNodes up in {time.perf_counter() - t0:.1f} s")
            for name, compression in (("identity", None), ("qsgd", ["qsgd", {"s": 16}])):
                params = dict(n_components=k, alpha=0.5, max_iter=rounds, compression=compression,
                              random_state=0)
                t1 = time.perf_counter()
                est, report = fed.run(APP, {
                    "estimator": "skfedmm.FederatedDictionaryLearning",
                    "params": json.dumps(params),
                }, name=name, timeout=600)
                wall = time.perf_counter() - t1
                order = [fed.node_ids.index(n) for n in est.flower_node_ids_]
                local_params = dict(params, compression=None if compression is None
                                    else tuple(compression))
                t2 = time.perf_counter()
                local = FederatedDictionaryLearning(**local_params).fit([rows[i] for i in order])
                t_local = time.perf_counter() - t2
                same = np.array_equal(local.components_, est.components_)
                per_round = np.diff(report["round_time"])
                print(f"\n## compression={name}: flwr run {wall:.1f} s; model bitwise equal to "
                      f"the in-process fit: {same}")
                print(f"seconds per round: median {np.median(per_round):.2f} "
                      f"(in-process, whole fit: {t_local:.3f} s)")
                print("exchange     clients  push s   reply s   bytes down/client  bytes up/client")
                for task, n, push, wait, sent, received in report["timings"]:
                    print(f"{task:12s} {n:7d} {push:7.3f} {wait:9.2f} {sent / n:18.0f} "
                          f"{received / n:16.0f}")
                size = k * k + d * k
                up = size * 8 if compression is None else (
                    8 + math.ceil(size * (1 + math.ceil(math.log2(17))) / 8))
                down = (k * d + size) * 8
                rounds_t = [t for t in report["timings"] if t[0] == "surrogate"]
                steady = rounds_t[1:] or rounds_t
                got_up = {r[5] / r[1] for r in steady}
                got_down = {r[4] / r[1] for r in steady}
                if compression is None:
                    print(f"per round per client (rounds after the first): up {sorted(got_up)} "
                          f"bytes, formula {up} (bits {int(est.history_['bits_up'][-1]) // 3 - 64} "
                          f"/ 8, rounded up); down {sorted(got_down)} bytes, formula {down}")
                else:  # Rice-coded levels: a variable length, counted exactly by the engine
                    bits = np.asarray(est.history_["bits_up"])[-len(rounds_t):] / 3 - 64
                    print("per round per client, up (the levels are Rice-coded: a variable length): "
                          "bytes received " + ", ".join(f"{r[5] / r[1]:.1f}" for r in rounds_t)
                          + "; the engine's count (bits / 8, mean over clients) "
                          + ", ".join(f"{b / 8:.1f}" for b in bits)
                          + " (each client's message rounded up to whole bytes); at most "
                          f"{up} bytes with fixed-length levels; down {sorted(got_down)} bytes, "
                          f"formula {down}")
                print("the first round also sends each client its initial state once "
                      f"({size * 8} bytes of control variate) and the problem")


if __name__ == "__main__":
    main()
