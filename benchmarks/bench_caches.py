"""Client caches stay where the rows are: bytes moved per round, loky and Dask.

Two fits with a client cache (:meth:`MMProblem.client_cache`):

- ``FederatedKMeans`` (each client keeps its rows' labels, Hamerly bounds
  and squared norms), 6 clients x 20,000 rows x 8 features, 8 clusters;
- ``FederatedDictionaryLearning(code_cache=True)`` (each client keeps its
  rows' last codes), 4 clients x 3,000 rows x 40 features, 30 atoms
  (fewer atoms than features: the coder that warm starts from the codes);

run with loky (``n_jobs=2``, every call of several clients sent to the
workers) and on a local Dask cluster of 2 single-threaded worker processes.
For each it reports the bytes that cross between this process and the
workers per round (median over the rounds after the first):

- loky: the pickled size of the tasks sent and of the answers received
  (what joblib pickles; the rows go once, through a memory-mapped file);
- Dask: the bytes this process (client and scheduler) writes to TCP;

against the size of the clients' caches (what travelled both ways every
round when the server side of the transport held them), and checks that
the fitted model is bitwise that of ``n_jobs=1``.

Usage::

    python benchmarks/bench_caches.py           # writes benchmarks/results/bench_caches.txt
    python benchmarks/bench_caches.py --quick
"""

import contextlib
import os
import pickle
import time

import numpy as np
from joblib import parallel_config

from skfedmm import FedMM, FederatedDictionaryLearning, FederatedKMeans
from skfedmm.federation.transport import LocalTransport

from bench_clients import always_on_workers, load, recorder

HERE = os.path.dirname(os.path.abspath(__file__))


class _CountingParallel:
    """Wraps joblib's Parallel: counts the pickled bytes of tasks and answers."""

    def __init__(self, parallel, counter):
        self.parallel, self.counter = parallel, counter

    def __call__(self, tasks):
        import cloudpickle

        tasks = list(tasks)
        self.counter["sent"] += sum(len(cloudpickle.dumps(t)) for t in tasks)
        outs = self.parallel(tasks)
        self.counter["received"] += sum(len(pickle.dumps(o)) for o in outs)
        return outs


@contextlib.contextmanager
def counting_loky():
    counter = {"sent": 0, "received": 0}
    real = LocalTransport._workers

    def workers(self):
        parallel, rows = real(self)
        return _CountingParallel(parallel, counter), rows

    LocalTransport._workers = workers
    try:
        yield counter
    finally:
        LocalTransport._workers = real


@contextlib.contextmanager
def counting_dask():
    from distributed.comm import tcp

    counter = {"sent": 0, "received": 0}
    real = tcp.TCP.write

    async def write(self, msg, serializers=None, on_error="message"):
        n = await real(self, msg, serializers=serializers, on_error=on_error)
        counter["sent"] += n
        return n

    tcp.TCP.write = write
    try:
        yield counter
    finally:
        tcp.TCP.write = real


def kmeans_case(quick):
    n_clients, n_rows = (4, 5000) if quick else (6, 20000)
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (8, 8))
    clients = [centers[rng.integers(8, size=n_rows)] + rng.standard_normal((n_rows, 8))
               for _ in range(n_clients)]

    def make(n_jobs):
        return FederatedKMeans(n_clusters=8, n_init=1, max_iter=8, tol=0, random_state=0,
                               n_jobs=n_jobs)

    return f"FederatedKMeans, {n_clients} x {n_rows} rows x 8, 8 clusters", clients, make, \
        lambda est: est.cluster_centers_


def dictionary_case(quick):
    n_clients, n_rows = (2, 2000) if quick else (4, 3000)
    rng = np.random.default_rng(1)
    D = rng.standard_normal((30, 40))
    clients = [(rng.standard_normal((n_rows, 30)) * (rng.random((n_rows, 30)) < 0.2)) @ D
               + 0.1 * rng.standard_normal((n_rows, 40)) for _ in range(n_clients)]

    def make(n_jobs):
        return FederatedDictionaryLearning(n_components=30, alpha=0.1, max_iter=5, tol=0,
                                           random_state=0, n_jobs=n_jobs, code_cache=True)

    return (f"FederatedDictionaryLearning(code_cache=True), {n_clients} x {n_rows} rows x 40, "
            "30 atoms"), clients, make, lambda est: est.components_


def cache_bytes(est):
    state = est.fedmm_state_
    total = 0
    for c in state.clients:
        cache = getattr(c.cache, "cache", c.cache)  # (Unverified)
        for v in (cache or {}).values():
            total += getattr(v, "nbytes", 0)
    return total


def run(case, backend, counting):
    name, clients, make, param = case
    marks = []

    real_round = FedMM._round

    with counting() as counter:
        def round_(self, *a, **k):  # the bytes counted at the end of each round
            state = real_round(self, *a, **k)
            marks.append((counter["sent"], counter["received"]))
            return state

        with contextlib.ExitStack() as stack:
            if backend == "loky":
                stack.enter_context(always_on_workers())
            stack.enter_context(parallel_config(backend=backend))
            FedMM._round = round_
            stack.callback(setattr, FedMM, "_round", real_round)
            t0 = time.perf_counter()
            est = make(2).fit(clients)
            wall = time.perf_counter() - t0
    marks = np.array(marks, dtype=float)
    per_round = np.diff(marks, axis=0)  # (rounds after the first)
    return est, per_round, wall


def main(argv=None):
    args, out, save = recorder("bench_caches", argv, __doc__.splitlines()[0])
    out(load())
    out("fit (s): one fit with the workers already started (a loaded machine inflates it)")
    backends = [("loky", counting_loky)]
    cluster = client = None
    try:
        import distributed

        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           host="127.0.0.1", dashboard_address=None,
                                           silence_logs=40)
        client = distributed.Client(cluster)
        backends.append(("dask", counting_dask))
    except ImportError:
        out("(distributed is not installed: loky only)")
    try:
        for case in (kmeans_case(args.quick), dictionary_case(args.quick)):
            name, clients, make, param = case
            ref = make(1).fit(clients)
            size = cache_bytes(ref)
            out("")
            out(f"## {name}")
            out(f"rows: {sum(c.nbytes for c in clients) / 1e6:.2f} MB; the clients' caches at "
                f"the end of the fit: {size / 1e6:.2f} MB")
            out(f"{'backend':<8} {'sent/round (kB)':>16} {'received/round (kB)':>20} "
                f"{'fit (s)':>8}  same model as n_jobs=1")
            for backend, counting in backends:
                with parallel_config(backend=backend):  # (the workers started first)
                    make(2).fit([c[:200] for c in clients])
                est, per_round, wall = run(case, backend, counting)
                sent, received = np.median(per_round, axis=0) / 1e3
                same = np.array_equal(param(est), param(ref))
                out(f"{backend:<8} {sent:>16.1f} {received:>20.1f} {wall:>8.2f}  "
                    f"{'yes' if same else 'NO'}")
        out("")
        out("loky: pickled tasks and answers (the rows go once, memory-mapped); dask: bytes "
            "written to TCP by this process (client and scheduler share it, so a message "
            "through the scheduler counts twice), nothing counted for received")
        out(load())
    finally:
        if client is not None:
            client.close()
            cluster.close()
    save()


if __name__ == "__main__":
    main()
