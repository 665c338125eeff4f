"""Peak memory of a large minibatch fit: two million float32 rows, 20 clients.

A subprocess builds 20 clients of ``--rows / 20`` float32 rows x 64
features (sparse combinations of 256 unit atoms plus noise, generated in
chunks so that no float64 copy of the data ever exists), records its
resident memory, then fits ``FederatedDictionaryLearning(n_components=256,
batch_size=..., verbose=1)`` for a few rounds and records its peak resident
memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). Reported: the
data's size, the resident memory of the interpreter with its imports
(before the data), after the data, the peak, and the peak over the data's
size; also the dtypes of the fitted dictionary, the server statistic and
the clients' control variates (float32 throughout).

Usage::

    python benchmarks/bench_memory.py            # 2,000,000 rows
    python benchmarks/bench_memory.py --quick    # 200,000 rows

Target: peak resident memory at most 1.5x the data's size.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
import json, resource, sys, time
import numpy as np
cfg = json.loads(sys.argv[1])

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

from skfedmm import FederatedDictionaryLearning
from threadpoolctl import threadpool_limits
base = rss_mb()
rng = np.random.default_rng(0)
d, k = 64, 256
D = rng.standard_normal((k, d)).astype(np.float32)
D /= np.linalg.norm(D, axis=1, keepdims=True)
per = cfg["rows"] // cfg["clients"]
clients = []
for i in range(cfg["clients"]):
    X = np.empty((per, d), dtype=np.float32)
    for s in range(0, per, 10000):
        m = min(10000, per - s)
        H = np.zeros((m, k), dtype=np.float32)
        idx = rng.integers(0, k, size=(m, 4))
        np.put_along_axis(H, idx, rng.standard_normal((m, 4), dtype=np.float32), axis=1)
        X[s:s + m] = H @ D + np.float32(0.05) * rng.standard_normal((m, d), dtype=np.float32)
    clients.append(X)
data_mb = sum(X.nbytes for X in clients) / 2**20
after_data = rss_mb()
t0 = time.perf_counter()
with threadpool_limits(1):
    est = FederatedDictionaryLearning(
        n_components=k, alpha=cfg["alpha"], batch_size=cfg["batch"], max_iter=cfg["rounds"],
        tol=0, random_state=0, verbose=1,
    ).fit(clients)
fit_s = time.perf_counter() - t0
st = est.fedmm_state_
print(json.dumps(dict(
    data_mb=data_mb, base_mb=base, after_data_mb=after_data, peak_mb=peak_mb(), fit_s=fit_s,
    dtypes=[str(est.components_.dtype), str(st.s_hat.dtype), str(st.clients[0].cv.dtype)],
    objective=float(est.error_[-1]), caches=sum(bool(c.cache) for c in st.clients),
)))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1000, help="rows per client per round")
    args = parser.parse_args()
    cfg = dict(
        rows=args.rows or (200_000 if args.quick else 2_000_000), clients=20, batch=args.batch,
        rounds=args.rounds or (5 if args.quick else 10), alpha=1.0,
    )
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    load0 = os.getloadavg()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env,
        cwd=ROOT,
    )
    if proc.returncode:
        print(proc.stderr)
        raise SystemExit(proc.returncode)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    progress = [line for line in (proc.stdout + proc.stderr).splitlines() if "FedMM" in line]
    ratio = res["peak_mb"] / res["data_mb"]
    lines = [
        f"Memory benchmark: {cfg['rows']} rows x 64 float32 features over {cfg['clients']} clients, "
        f"256 atoms, alpha {cfg['alpha']}, batch_size={cfg['batch']} per client, {cfg['rounds']} rounds "
        f"(plus the initial full round), 1 BLAS thread",
        f"load average: {', '.join(f'{x:.2f}' for x in load0)} (start), "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (end)",
        "",
        f"data size                          {res['data_mb']:8.1f} MiB",
        f"resident, interpreter + imports    {res['base_mb']:8.1f} MiB",
        f"resident, after building the data  {res['after_data_mb']:8.1f} MiB",
        f"peak resident (ru_maxrss)          {res['peak_mb']:8.1f} MiB  = {ratio:.2f}x the data",
        f"peak above the interpreter         {res['peak_mb'] - res['base_mb']:8.1f} MiB  = "
        f"{(res['peak_mb'] - res['base_mb']) / res['data_mb']:.2f}x the data",
        f"fit time                           {res['fit_s']:8.1f} s",
        f"dtypes (components_, server statistic, control variate): {', '.join(res['dtypes'])}",
        f"clients holding cached codes: {res['caches']} (code_cache='auto' keeps none above "
        "64 MiB of codes per client, nor for batches below 1/16 of a client)",
        f"final objective {res['objective']:.5f}",
        "",
        f"progress display (verbose=1), last line: {progress[-1].strip() if progress else '(none)'}",
        "",
        f"Target: peak resident memory <= 1.5x the data's size: {'MET' if ratio <= 1.5 else 'NOT MET'} "
        f"({ratio:.2f}x)",
    ]
    print("\n".join(lines))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    name = "bench_memory_quick.txt" if args.quick else "bench_memory.txt"
    with open(os.path.join(HERE, "results", name), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
