"""Many small clients and loaded machines: the engine's cost per client.

Part 1, clients are cheap. The robust-location problem of the README (the
Cauchy M-estimator of a location in dimension 3), 50 rows per client, 20
rounds, participation 0.1, with 1,000 and 10,000 clients, ``n_jobs=1`` and
``n_jobs=2`` (joblib's default backend, loky). For each fit:

- the clients' own work: the problem's ``local_statistic`` (and
  ``init_statistic``) timed alone, in a loop over all clients, just before
  the fit, times the number of calls the fit makes (the initial full pass
  plus every active client of every round);
- the engine's overhead per client computation: (fit time - own work) /
  (client computations: initialization, initial full pass, active
  clients); and per active client of the rounds alone, (time of the rounds
  - own work in the rounds) / active clients.

Runs alternate between the settings (interleaved) and each cell is the
median over repeats. "always in parallel" runs every call of several
clients in parallel, whatever the transport would choose: the fit's
process computes the first group of clients and a worker the second
(what that costs or gives). A second table fits heavier clients (whose own work
dominates) with ``n_jobs=1`` and ``n_jobs=2``, with the workers started by
the first table. Its robust-location statistic streams through memory (a
few operations per value read on temporaries as large as the rows); a
third table (1c) fits compute-bound clients, dictionary learning with
scikit-learn's single-threaded Cython coordinate-descent coder
(``fit_algorithm="cd"``), and a fourth (1d) measures the clients' own work
(CPU time per client, and page faults per call) in this process, then on
one fresh loky worker alone and on two at once, which bounds what
``n_jobs=2`` can give whatever the transport does. 1d compares workers with
glibc's default malloc settings (a plain loky worker: the heap's top is
given back to the system after every call, so the next call faults its
temporaries in afresh, about 1,300 page faults and 1.6 times the CPU time
of this process per robust-location client) with workers as skfedmm's
tasks set them up (freed memory kept for the next client, see
``skfedmm.federation.local._keep_freed_memory``). Every fit of a problem
gives bitwise the same parameter, whatever ``n_jobs`` and backend
(checked).

Part 1e repeats 1b and 1c with the transport of an earlier revision
(``--baseline``, extracted with ``git archive``; the default is the last
revision before the fit's process computed a group itself and answers
were collected without joblib's polling), each version in its own
processes, alternating: the machine's speed drifts between runs (a shared
host), and the ratio of the two versions' speed-ups, measured side by
side, is what shows the transport's share.

Part 2, loaded machines. One client (BLAS runs on several threads unless
the client's task is small) and ten clients (BLAS on one thread), quiet
(as found) and with two busy-loop processes on the two cores that this
script starts and stops; "BLAS free" emulates the engine before it chose
one BLAS thread for small lone clients.

The load average is printed: other processes on the machine inflate times.

Usage::

    python benchmarks/bench_clients.py           # writes benchmarks/results/bench_clients.txt
    python benchmarks/bench_clients.py --quick   # writes benchmarks/results/bench_clients_quick.txt
    python benchmarks/bench_clients.py --baseline REV  # part 1e against revision REV
"""

import argparse
import contextlib
import io
import os
import platform
import subprocess
import sys
import time

import numpy as np
from joblib import parallel_config

from skfedmm import FedMM, FederatedDictionaryLearning, MMProblem
from skfedmm.federation import local
from skfedmm.federation.transport import LocalTransport

HERE = os.path.dirname(os.path.abspath(__file__))


class RobustLocation(MMProblem):
    """Cauchy M-estimator of location (the README's problem)."""

    def init_parameter(self, init_stat, rng):
        return np.zeros(3)

    def local_statistic(self, X, theta):
        sq = ((X - theta) ** 2).sum(axis=1)
        w = 1 / (1 + sq)
        return {"wx": (w[:, None] * X).mean(0), "w": np.array([w.mean()])}, np.log1p(sq).mean()

    def minimize(self, stat, theta_prev, rng=None):
        return stat["wx"] / stat["w"][0]


def make_clients(n_clients, n_rows, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(n_clients, 3))
    return [c + rng.standard_cauchy((n_rows, 3)) for c in centers]


def own_work(problem, clients, clock=time.perf_counter):
    """Seconds per ``local_statistic`` and per ``init_statistic`` call, timed alone."""
    theta = np.ones(3)
    t0 = clock()
    for X in clients:
        problem.local_statistic(X, theta)
    t1 = clock()
    for X in clients:
        problem.init_statistic(X)
    t2 = clock()
    return (t1 - t0) / len(clients), (t2 - t1) / len(clients)


@contextlib.contextmanager
def counting_parallel_calls():
    """Count the calls that ran on joblib's workers (grouped tasks)."""
    calls = [0]
    real = LocalTransport._workers

    def workers(self):
        calls[0] += 1
        return real(self)

    LocalTransport._workers = workers
    try:
        yield calls
    finally:
        LocalTransport._workers = real


@contextlib.contextmanager
def always_on_workers():
    """Every call of several clients goes to the workers (no choice)."""
    real = local._Scheduler.parallel
    local._Scheduler.parallel = lambda self, task, n: self.n_workers > 1 and n > 1
    try:
        yield
    finally:
        local._Scheduler.parallel = real


def timed_fit(problem, clients, n_jobs, backend="loky", forced=False, **params):
    c_stat, c_init = own_work(problem, clients)
    cpu_stat, cpu_init = own_work(problem, clients, clock=time.process_time)
    with contextlib.ExitStack() as stack:
        calls = stack.enter_context(counting_parallel_calls())
        if forced:
            stack.enter_context(always_on_workers())
        stack.enter_context(parallel_config(backend=backend))
        t0, c0 = time.perf_counter(), time.process_time()
        state = FedMM(problem, random_state=0, n_jobs=n_jobs, **params).fit(clients)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(clients)
    active = int(np.sum(state.history.n_active[1:]))
    init_time = state.history.time[0]
    rounds_time = wall - init_time
    work = c_stat * (n + active) + c_init * n
    cpu_work = cpu_stat * (n + active) + cpu_init * n
    return dict(
        wall=wall, work=work, tasks=2 * n + active, active=active,
        per_task=(wall - work) / (2 * n + active),
        per_task_cpu=(cpu - cpu_work) / (2 * n + active),
        per_active=(rounds_time - c_stat * active) / max(active, 1),
        parallel_calls=calls[0], theta=state.theta,
    )


def machine():
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import joblib
    import sklearn
    import threadpoolctl

    return (
        f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}, numpy "
        f"{np.__version__}, scikit-learn {sklearn.__version__}, joblib {joblib.__version__}, "
        f"threadpoolctl {threadpoolctl.__version__}"
    )


def load():
    return "loadavg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def scheduling():
    """Linux's autogroup puts this script and its workers in one CPU share."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as fh:
            enabled = fh.read().strip() == "1"
    except OSError:
        return ""
    return ("Linux autogroup scheduling is on: under load from other sessions, this script and "
            "its workers share one session's CPU time, so parallel workers gain little"
            if enabled else "")


def part1(out, sizes, repeats, rounds):
    problem = RobustLocation()
    params = dict(max_iter=rounds, participation=0.1)
    settings = [("n_jobs=1", 1, "loky", False), ("n_jobs=2", 2, "loky", False),
                ("n_jobs=2, always in parallel", 2, "loky", True)]
    out(f"## 1. Clients are cheap: robust location, 50 rows per client, {rounds} rounds, "
        "participation 0.1")
    out("cells: median over repeats (interleaved); overhead = fit time minus the clients' own "
        "work (local_statistic timed alone), per client computation (initialization, initial "
        "full pass, active clients) or per active client of the rounds alone (rounds' time); "
        "CPU: the same with this process's CPU time (less sensitive to other processes; "
        "meaningless for parallel calls)")
    header = (f"{'clients':>7}  {'setting':<28} {'fit (s)':>8} {'own work (s)':>12} "
              f"{'overhead/computation (ms)':>25} {'overhead/active client (ms)':>27} "
              f"{'CPU overhead/computation (ms)':>29} {'parallel calls':>16}")
    # warm-up: imports, and the workers' start (reported)
    t0 = time.perf_counter()
    timed_fit(problem, make_clients(100, 50), 2, forced=True, max_iter=2, participation=0.1)
    out(f"warm-up fit on the workers (starts them): {time.perf_counter() - t0:.2f} s")
    for n_clients in sizes:
        clients = make_clients(n_clients, 50)
        # (always in parallel: shown for the smaller federation only, it is slow)
        todo = settings if n_clients == min(sizes) else settings[:2]
        runs = {name: [] for name, *_ in todo}
        for _ in range(repeats):
            for name, n_jobs, backend, forced in todo:
                runs[name].append(timed_fit(problem, clients, n_jobs, backend, forced, **params))
        ref = runs["n_jobs=1"][0]["theta"]
        threads = timed_fit(problem, clients, 2, "threading", True, **params)["theta"]
        same = all(np.array_equal(r["theta"], ref) for rs in runs.values() for r in rs)
        same = same and np.array_equal(threads, ref)
        out("")
        out(f"{n_clients} clients ({load()})")
        out(header)
        med = {}
        for name, *_ in todo:
            rs = runs[name]
            m = {k: float(np.median([r[k] for r in rs])) for k in
                 ("wall", "work", "per_task", "per_active", "per_task_cpu", "parallel_calls")}
            med[name] = m
            out(f"{n_clients:>7}  {name:<28} {m['wall']:>8.3f} {m['work']:>12.3f} "
                f"{1e3 * m['per_task']:>25.4f} {1e3 * m['per_active']:>27.4f} "
                f"{1e3 * m['per_task_cpu']:>29.4f} {m['parallel_calls']:>16.0f}")
        r = med["n_jobs=2"]["wall"] / med["n_jobs=1"]["wall"]
        ratios = [b["wall"] / a["wall"] for a, b in zip(runs["n_jobs=1"], runs["n_jobs=2"])]
        out(f"n_jobs=2 / n_jobs=1 fit time: {r:.3f} (per repeat: "
            f"{', '.join(f'{x:.3f}' for x in ratios)}); "
            f"computations per fit: {rs[0]['tasks']} ({rs[0]['active']} active in the rounds); "
            f"same parameter bitwise (n_jobs 1/2, loky, threads, on workers or not): "
            f"{'yes' if same else 'NO'}")


def part1_heavy(out, repeats, n_clients, n_rows, rounds):
    problem = RobustLocation()
    clients = make_clients(n_clients, n_rows, seed=1)
    params = dict(max_iter=rounds)
    out("")
    out(f"## 1b. Clients' work dominates: robust location, {n_clients} clients x {n_rows} rows, "
        f"{rounds} rounds, full participation")
    t0 = time.perf_counter()
    first = timed_fit(problem, clients, 2, **params)
    out(f"first n_jobs=2 fit of this script at this size (the rows' file written, workers "
        f"warm from part 1): {time.perf_counter() - t0:.2f} s ({load()})")
    settings = {"n_jobs=1": (1, False), "n_jobs=2": (2, False),
                "n_jobs=2, always in parallel": (2, True)}
    runs = {name: [] for name in settings}
    for _ in range(repeats):
        for name, (n_jobs, forced) in settings.items():
            runs[name].append(timed_fit(problem, clients, n_jobs, forced=forced, **params))
    out(f"{'setting':<28} {'fit (s)':>8} {'own work (s)':>12} {'parallel calls':>16}")
    for name, rs in runs.items():
        out(f"{name:<28} {np.median([r['wall'] for r in rs]):>8.3f} "
            f"{np.median([r['work'] for r in rs]):>12.3f} "
            f"{np.median([r['parallel_calls'] for r in rs]):>16.0f}")
    forced = [a["wall"] / b["wall"] for a, b in zip(runs["n_jobs=1"], runs[
        "n_jobs=2, always in parallel"])]
    out(f"always in parallel over n_jobs=1: median {np.median(forced):.2f}x, best "
        f"{max(forced):.2f}x")
    speedups = [a["wall"] / b["wall"] for a, b in zip(runs["n_jobs=1"], runs["n_jobs=2"])]
    same = all(np.array_equal(r["theta"], first["theta"]) for rs in runs.values() for r in rs)
    out(f"speed-up n_jobs=2 over n_jobs=1: median {np.median(speedups):.2f}x, best "
        f"{max(speedups):.2f}x (per repeat: "
        f"{', '.join(f'{x:.2f}' for x in speedups)}); same parameter bitwise: "
        f"{'yes' if same else 'NO'} ({load()})")


def _own_work_cpu(problem, clients, theta, repeats, keep=False):
    """CPU seconds (this thread's) per client of ``local_statistic``, best of
    repeats, and minor page faults per call.

    ``clients`` is a list of arrays or a ``_RowsFile`` (mapped here, as a
    fit's task does); ``keep``: first take the malloc settings of skfedmm's
    worker tasks (``local._keep_freed_memory``).
    """
    import resource

    from threadpoolctl import threadpool_limits

    if keep:
        local._keep_freed_memory()
    if isinstance(clients, local._RowsFile):
        rows = clients.open()
        clients = [rows[i] for i in sorted(rows)]
    best = np.inf
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(repeats):
            t0 = time.thread_time()
            for X in clients:
                problem.local_statistic(X, theta)
            best = min(best, (time.thread_time() - t0) / len(clients))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (
        repeats * len(clients))
    return best, faults


def concurrency(problem, rows, n_clients, theta, keep, repeats=3):
    """The clients' own work on one fresh loky worker alone, then on two at once.

    The workers are new processes (not joblib's shared ones, which earlier
    fits have set up), the rows mapped from a file as in a fit's tasks;
    ``keep``: with the malloc settings of skfedmm's worker tasks. Returns the
    CPU time per client alone and on two at once, and the page faults per
    call alone: CPU time that grows when a second worker computes at the
    same time means the two share something other than the cores (memory
    bandwidth, caches), which caps what a second worker can give whatever
    the transport does.
    """
    from joblib.externals.loky import ProcessPoolExecutor

    half = n_clients // 2
    parts = [rows.subset(range(half)), rows.subset(range(half, 2 * half))]
    with ProcessPoolExecutor(max_workers=2) as ex:
        warm = [ex.submit(_own_work_cpu, problem, p, theta, 1, keep) for p in parts]
        [f.result() for f in warm]
        alone, faults = ex.submit(_own_work_cpu, problem, parts[0], theta, repeats, keep).result()
        both = [ex.submit(_own_work_cpu, problem, p, theta, repeats, keep) for p in parts]
        both = max(f.result()[0] for f in both)
    return alone, both, faults


def dictionary_clients(n_clients, n_rows, seed=0):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((30, 40))
    n = n_clients * n_rows
    codes = rng.standard_normal((n, 30)) * (rng.random((n, 30)) < 0.2)
    X = codes @ D + 0.1 * rng.standard_normal((n, 40))
    return np.array_split(X, n_clients)


def part1_compute(out, repeats, n_clients, n_rows, rounds):
    """Compute-bound clients: the dictionary's coordinate-descent coder (Cython)."""
    clients = dictionary_clients(n_clients, n_rows)
    out("")
    out(f"## 1c. Compute-bound clients: FederatedDictionaryLearning(fit_algorithm='cd'), "
        f"{n_clients} clients x {n_rows} rows x 40, 30 atoms, alpha 0.1, {rounds} rounds")
    out("the clients' sparse coder is scikit-learn's single-threaded Cython coordinate descent; "
        "cells: fit time (s), interleaved repeats")

    def fit(n_jobs, backend="loky", forced=False):
        est = FederatedDictionaryLearning(n_components=30, alpha=0.1, max_iter=rounds,
                                          random_state=0, n_jobs=n_jobs, fit_algorithm="cd")
        with contextlib.ExitStack() as stack:
            calls = stack.enter_context(counting_parallel_calls())
            if forced:
                stack.enter_context(always_on_workers())
            stack.enter_context(parallel_config(backend=backend))
            t0 = time.perf_counter()
            est.fit(clients)
            return time.perf_counter() - t0, est.components_, calls[0]

    fit(2)  # warm-up
    settings = {"n_jobs=1": (1, False), "n_jobs=2": (2, False),
                "n_jobs=2, always in parallel": (2, True)}
    runs = {name: [] for name in settings}
    for _ in range(repeats):
        for name, (n_jobs, forced) in settings.items():
            runs[name].append(fit(n_jobs, forced=forced))
    threads = fit(2, "threading")[1]
    out(f"{'setting':<28} {'fit (s)':>8} {'parallel calls':>16}")
    for name, rs in runs.items():
        out(f"{name:<28} {np.median([r[0] for r in rs]):>8.3f} "
            f"{np.median([r[2] for r in rs]):>16.0f}")
    forced = [a[0] / b[0] for a, b in zip(runs["n_jobs=1"], runs["n_jobs=2, always in parallel"])]
    out(f"always in parallel over n_jobs=1: median {np.median(forced):.2f}x, best "
        f"{max(forced):.2f}x")
    speedups = [a[0] / b[0] for a, b in zip(runs["n_jobs=1"], runs["n_jobs=2"])]
    ref = runs["n_jobs=1"][0][1]
    same = all(np.array_equal(r[1], ref) for rs in runs.values() for r in rs)
    same = same and np.array_equal(threads, ref)
    out(f"speed-up n_jobs=2 over n_jobs=1: median {np.median(speedups):.2f}x, best "
        f"{max(speedups):.2f}x (per repeat: {', '.join(f'{x:.2f}' for x in speedups)}); same "
        f"model bitwise (n_jobs 1/2, loky, threads): {'yes' if same else 'NO'} ({load()})")


BASELINE = "9dd1c3a"

#: One process: speed-ups n_jobs=2 over n_jobs=1 of parts 1b and 1c (after
#: two warm-up fits of each), for the skfedmm found first on sys.path.
_AGAINST_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
import skfedmm
assert skfedmm.__file__.startswith(sys.argv[2]), skfedmm.__file__
import bench_clients as b
from skfedmm import FedMM, FederatedDictionaryLearning
rc, p = b.make_clients(40, 100_000, seed=1), b.RobustLocation()
dc = b.dictionary_clients(8, 1000)
def heavy(n):
    t = time.perf_counter(); FedMM(p, max_iter=6, n_jobs=n, random_state=0).fit(rc)
    return time.perf_counter() - t
def compute(n):
    t = time.perf_counter()
    FederatedDictionaryLearning(n_components=30, alpha=0.1, fit_algorithm="cd", max_iter=4,
                                random_state=0, n_jobs=n).fit(dc)
    return time.perf_counter() - t
for f in (heavy, heavy, compute, compute):
    f(2)
out = {"1b": [], "1c": []}
for _ in range(int(sys.argv[1])):
    out["1b"].append(heavy(1) / heavy(2))
    out["1c"].append(compute(1) / compute(2))
print(json.dumps(out))
"""


def part1_against(out, baseline, rounds, repeats):
    """Parts 1b and 1c, this tree against ``baseline``, alternating processes."""
    import json
    import tempfile

    root = os.path.dirname(HERE)
    out("")
    out(f"## 1e. Against the transport of revision {baseline}: parts 1b and 1c, each version in "
        f"its own processes, alternating ({rounds} processes each, {repeats} speed-ups per "
        f"process and part)")
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", baseline, "skfedmm"], cwd=root,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        trees = {f"revision {baseline}": tmp, "this tree": root}
        runs = {name: {"1b": [], "1c": []} for name in trees}
        for _ in range(rounds):
            for name, tree in trees.items():
                res = subprocess.run(
                    [sys.executable, "-c", _AGAINST_CHILD, str(repeats), tree],
                    capture_output=True, text=True, check=True, cwd=HERE,
                    env=dict(os.environ, PYTHONPATH=HERE))
                got = json.loads(res.stdout.strip().splitlines()[-1])
                for part in got:
                    runs[name][part] += got[part]
    out(f"{'version':<28} {'1b median':>9} {'1b best':>8} {'1c median':>9} {'1c best':>8}")
    for name, r in runs.items():
        out(f"{name:<28} {np.median(r['1b']):>8.2f}x {max(r['1b']):>7.2f}x "
            f"{np.median(r['1c']):>8.2f}x {max(r['1c']):>7.2f}x")
    out(f"(speed-ups n_jobs=2 over n_jobs=1; {load()})")


def part1_why(out, robust_rows, dict_rows):
    """What a second worker can give: the clients' own work, here and on workers."""
    import tempfile

    out("")
    out("## 1d. What a second worker can give: the clients' own work (local_statistic, BLAS "
        "on one thread) in this process, and on one fresh loky worker alone, then on two at "
        "once, the rows mapped from a file as in a fit's tasks")
    out("cells: CPU seconds per client (thread time, best of 3) and minor page faults per call "
        "(alone); workers with glibc's default malloc settings (a plain loky worker) and with "
        "those of skfedmm's worker tasks (freed memory kept for the next client); a ratio "
        "(two at once / alone) above 1 means the two workers slow each other down beyond "
        "sharing the cores (memory bandwidth, caches): the best n_jobs=2 can give is about "
        "2 / ratio times the worker's speed relative to this process")
    from skfedmm.problems.dictionary import DictionaryLearningProblem

    cases = [
        (f"robust location, 20 x {robust_rows} rows x 3", RobustLocation(),
         make_clients(20, robust_rows, seed=1), np.ones(3)),
    ]
    problem = DictionaryLearningProblem(30, 0.1, 40, fit_algorithm="cd")
    clients = dictionary_clients(8, dict_rows)
    theta = np.linalg.qr(np.random.default_rng(0).standard_normal((40, 30)))[0].T.copy()
    cases.append((f"dictionary, 'cd' coder, 8 x {dict_rows} rows x 40", problem, clients, theta))
    out(f"{'clients':<42} {'where':<34} {'alone (ms)':>10} {'faults/call':>11} "
        f"{'two at once (ms)':>16} {'ratio':>6}")
    for name, problem, clients, theta in cases:
        here, faults = _own_work_cpu(problem, clients, theta, 3)
        out(f"{name:<42} {'this process (arrays in memory)':<34} {1e3 * here:>10.3f} "
            f"{faults:>11.1f} {'':>16} {'':>6}")
        with tempfile.TemporaryDirectory() as folder:
            rows = local._RowsFile.save(os.path.join(folder, "rows"), clients)
            for keep, where in ((False, "worker, glibc's malloc defaults"),
                                (True, "worker, as skfedmm's tasks")):
                alone, both, faults = concurrency(problem, rows, len(clients), theta, keep)
                out(f"{'':<42} {where:<34} {1e3 * alone:>10.3f} {faults:>11.1f} "
                    f"{1e3 * both:>16.3f} {both / alone:>6.2f}")
    out(f"({load()})")


@contextlib.contextmanager
def busy_cores(n):
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


@contextlib.contextmanager
def blas_free():
    """The engine before: a lone client computes with every BLAS thread."""
    real = local.BLAS_THREADS_MIN_VALUES
    local.BLAS_THREADS_MIN_VALUES = 0
    try:
        yield
    finally:
        local.BLAS_THREADS_MIN_VALUES = real


def part2(out, repeats, rounds):
    rng = np.random.default_rng(0)
    D = rng.standard_normal((30, 40))
    codes = rng.standard_normal((5000, 30)) * (rng.random((5000, 30)) < 0.2)
    X = codes @ D + 0.1 * rng.standard_normal((5000, 40))
    cases = {
        "1 client x 5000 rows": [X],
        "10 clients x 500 rows": np.array_split(X, 10),
    }
    out("")
    out(f"## 2. Loaded machines: FederatedDictionaryLearning, 5000 x 40 rows, 30 atoms, "
        f"alpha 0.1, {rounds} rounds, n_jobs=1")
    out("busy: two busy-loop processes started by this script (one per core); cells: median "
        "fit time (s) over repeats, interleaved")

    def fit(clients, free):
        est = FederatedDictionaryLearning(n_components=30, alpha=0.1, max_iter=rounds,
                                          random_state=0, n_jobs=1)
        with blas_free() if free else contextlib.nullcontext():
            t0 = time.perf_counter()
            est.fit(clients)
            return time.perf_counter() - t0, est.components_

    times = {}
    comps = {}
    loads = {}
    for cond in ("quiet", "busy"):
        with busy_cores(2) if cond == "busy" else contextlib.nullcontext():
            loads[cond] = load()
            fit(cases["1 client x 5000 rows"], False)  # warm-up
            for _ in range(repeats):
                for case, clients in cases.items():
                    # (several clients: one BLAS thread always, before as now)
                    for free in (True, False) if len(clients) == 1 else (False,):
                        t, c = fit(clients, free)
                        times.setdefault((cond, case, free), []).append(t)
                        comps.setdefault((case, free), []).append(c)
    out(f"quiet: {loads['quiet']}; busy: {loads['busy']}")
    out(f"{'clients':<24} {'BLAS':<26} {'quiet (s)':>10} {'busy (s)':>10} {'busy/quiet':>10}")
    for case, clients in cases.items():
        for free in (True, False) if len(clients) == 1 else (False,):
            q = float(np.median(times[("quiet", case, free)]))
            b = float(np.median(times[("busy", case, free)]))
            label = "free (before)" if free else (
                "chosen per task (now)" if len(clients) == 1 else "one thread (before, now)")
            out(f"{case:<24} {label:<26} {q:>10.3f} {b:>10.3f} {b / q:>10.2f}")
    for case in cases:
        now = comps[(case, False)]
        same = all(np.array_equal(c, now[0]) for c in now)
        out(f"{case}: same model bitwise across the chosen-BLAS fits, quiet and busy: "
            f"{'yes' if same else 'NO'}")


def recorder(name, argv, description):
    """Parse ``--quick``/``--output``; return the arguments, a printer that
    also keeps every line, and the function that writes them to the results
    file (``results/<name>.txt``, ``<name>_quick.txt`` with ``--quick``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=None)
    parser.add_argument("--baseline", default=BASELINE,
                        help="git revision whose transport part 1e compares with this tree's")
    args = parser.parse_args(argv)
    output = args.output or os.path.join(
        HERE, "results", f"{name}_quick.txt" if args.quick else f"{name}.txt")
    buffer = io.StringIO()

    def out(line=""):
        print(line, flush=True)
        buffer.write(line + "\n")

    def save():
        os.makedirs(os.path.dirname(output), exist_ok=True)
        with open(output, "w") as fh:
            fh.write(buffer.getvalue())

    out(f"# benchmarks/{name}.py{' --quick' if args.quick else ''} -- recorded "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return args, out, save


def main(argv=None):
    args, out, save = recorder("bench_clients", argv, __doc__.splitlines()[0])
    out(machine())
    out(load())
    if scheduling():
        out(scheduling())
    out("")
    if args.quick:
        part1(out, sizes=[1000, 10000], repeats=1, rounds=20)
        part1_heavy(out, repeats=1, n_clients=20, n_rows=100_000, rounds=4)
        part1_compute(out, repeats=2, n_clients=8, n_rows=500, rounds=3)
        part1_why(out, robust_rows=100_000, dict_rows=500)
        part2(out, repeats=1, rounds=3)
    else:
        part1(out, sizes=[1000, 10000], repeats=3, rounds=20)
        part1_heavy(out, repeats=5, n_clients=40, n_rows=100_000, rounds=6)
        part1_compute(out, repeats=5, n_clients=8, n_rows=1000, rounds=4)
        part1_against(out, args.baseline, rounds=4, repeats=3)
        part1_why(out, robust_rows=100_000, dict_rows=1000)
        part2(out, repeats=3, rounds=5)
    out("")
    out(load())
    save()


if __name__ == "__main__":
    main()
