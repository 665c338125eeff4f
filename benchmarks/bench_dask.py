"""Scaling out: per-round overhead and bytes moved, Dask cluster vs local loky.

Runs the same FederatedDictionaryLearning fit (surrogate aggregation) with
joblib's loky backend and on a ``dask.distributed.LocalCluster`` (worker
processes on loopback), and reports:

- wall time per round for both backends (median over the rounds after the
  first), and the one-off setup (the first round, where Dask scatters rows);
- bytes written and read by this process (the Dask client and scheduler) per
  round, counted at the TCP layer of ``distributed``, against the size of
  the clients' rows.

Usage::

    python benchmarks/bench_dask.py            # 8 clients x 20000 rows x 50 features
    python benchmarks/bench_dask.py --quick
"""

import argparse
import os
import platform
import time

import numpy as np
from joblib import parallel_config

from skfedmm import FederatedDictionaryLearning


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import dask
    import distributed
    import joblib
    import sklearn

    return (
        f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}, numpy {np.__version__}, "
        f"scikit-learn {sklearn.__version__}, joblib {joblib.__version__}, dask {dask.__version__}, "
        f"distributed {distributed.__version__}"
    )


def fit_with_marks(clients, n_rounds, counter=None, **kwargs):
    """Fit, recording the time (and the bytes counter) at the end of each round."""
    marks, written = [], []

    def mark(info):
        marks.append(time.perf_counter())
        written.append(counter["write"] if counter else 0)

    est = FederatedDictionaryLearning(n_components=20, alpha=0.5, max_iter=n_rounds, tol=0,
                                      random_state=0, callback=mark, **kwargs)
    start = time.perf_counter()
    before = counter["write"] if counter else 0
    est.fit(clients)
    return est, np.diff([start] + marks), np.diff([before] + written)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    n_clients, n_rows, n_features, n_rounds = (4, 2000, 20, 4) if args.quick else (8, 20000, 50, 8)

    import distributed
    from distributed.comm import tcp

    print(machine())
    rng = np.random.default_rng(0)
    clients = [rng.standard_normal((n_rows, n_features)) for _ in range(n_clients)]
    data_mb = sum(c.nbytes for c in clients) / 1e6
    print(f"{n_clients} clients x {n_rows} rows x {n_features} features = {data_mb:.1f} MB of rows; "
          f"{n_rounds} rounds\n")

    with parallel_config(backend="loky"):
        local, t_local, _ = fit_with_marks(clients, n_rounds, n_jobs=2)

    # count the bytes this process (Dask client and scheduler) writes to TCP
    counter = {"write": 0}
    real_write = tcp.TCP.write

    async def write(self, msg, serializers=None, on_error="message"):
        n = await real_write(self, msg, serializers=serializers, on_error=on_error)
        counter["write"] += n
        return n

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None, silence_logs=40)
    client = distributed.Client(cluster)
    tcp.TCP.write = write
    try:
        with parallel_config(backend="dask"):
            est, t_remote, per_round_bytes = fit_with_marks(clients, n_rounds, counter)
    finally:
        tcp.TCP.write = real_write
        client.close()
        cluster.close()

    assert np.array_equal(est.components_, local.components_), "Dask and loky fits differ"
    print("same model bitwise on both backends: yes\n")
    print(f"{'backend':<10}{'first round (s)':>17}{'median later round (s)':>24}")
    print(f"{'loky':<10}{t_local[0]:>17.3f}{np.median(t_local[1:]):>24.3f}")
    print(f"{'dask':<10}{t_remote[0]:>17.3f}{np.median(t_remote[1:]):>24.3f}")
    print(f"\ndask overhead per round (median later rounds): "
          f"{np.median(t_remote[1:]) - np.median(t_local[1:]):+.3f} s")
    print("\nbytes written by the client/scheduler process per round (Dask):")
    print(f"  first round (includes the one-off scatter of the rows): {per_round_bytes[0] / 1e6:.2f} MB")
    print(f"  later rounds: median {np.median(per_round_bytes[1:]) / 1e3:.1f} kB, "
          f"max {per_round_bytes[1:].max() / 1e3:.1f} kB  (rows: {data_mb:.1f} MB)")


if __name__ == "__main__":
    main()
