"""Clients run locally (sequential, threads, loky): BLAS limits, timeouts, rows on disk."""

import copy
import glob
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
from joblib import parallel_config
from threadpoolctl import threadpool_info, threadpool_limits

from skfedmm import FedMM, MMProblem
from skfedmm.engine import ClientFailureWarning
from skfedmm.federation import local

POSIX = os.name == "posix"
LINUX = sys.platform.startswith("linux")


def blas_threads():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


needs_blas = pytest.mark.skipif(not blas_threads(), reason="threadpoolctl finds no BLAS")


class Gram(MMProblem):
    """Mean estimation through a Gram matrix (a BLAS product that threads split).

    The statistic is ``mean x + eps * (X X^T 1) X / n^2``: a syrk/gemm whose
    rounding depends on how many BLAS threads compute it. ``strict``: a
    client computing with more than one BLAS thread raises.
    """

    seen = []

    def __init__(self, dim=4, strict=False):
        self.dim = dim
        self.strict = strict

    def init_statistic(self, X):
        return None

    def init_parameter(self, init_stat, rng):
        return np.zeros(self.dim)

    def local_statistic(self, X, theta):
        n_threads = blas_threads()
        Gram.seen.append(n_threads)
        if self.strict and any(n != 1 for n in n_threads):
            raise RuntimeError(f"client ran with BLAS threads {n_threads}")
        G = X @ X.T
        m = X.mean(axis=0) + 1e-3 * (G.sum(axis=0) @ X) / X.shape[0] ** 2
        return {"m": m}, float(np.mean((X - theta) ** 2))

    def minimize(self, stat, theta_prev, rng=None):
        return 0.5 * (stat["m"] + theta_prev)

    def project(self, stat):
        return stat



def gram_clients(n_clients=4, n=300, dim=400, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, dim)) + i for i in range(n_clients)]


class Sleepy(MMProblem):
    """Mean estimation; the client with ``slow_rows`` rows sleeps ``seconds``."""

    def __init__(self, slow_rows=47, seconds=3.0):
        self.slow_rows = slow_rows
        self.seconds = seconds

    def _maybe_sleep(self, X):
        if X.shape[0] == self.slow_rows:
            time.sleep(self.seconds)

    def init_statistic(self, X):
        return None

    def init_parameter(self, init_stat, rng):
        return np.zeros(3)

    def local_statistic(self, X, theta):
        self._maybe_sleep(X)
        return {"m": X.mean(axis=0)}, float(np.mean((X - theta) ** 2))

    def loss(self, X, theta):
        self._maybe_sleep(X)
        return float(np.mean((X - theta) ** 2))

    def minimize(self, stat, theta_prev, rng=None):
        return stat["m"]

    def project(self, stat):
        return stat


def sleepy_clients():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((40 + 7 * i, 3)) for i in range(4)]  # client 1: 47 rows


# --------------------------------------------------------------------------
# BLAS limits
# --------------------------------------------------------------------------
FITS = [
    ("sequential", 1, None),
    ("sequential", 1, 5.0),
    ("threading", 2, None),
    ("threading", 2, 5.0),
    ("loky", 2, None),
    ("loky", 2, 5.0),
]


@needs_blas
@pytest.mark.parametrize("backend, n_jobs, timeout", FITS)
def test_fit_leaves_blas_threads_as_found(backend, n_jobs, timeout):
    clients = gram_clients(n=60, dim=30)
    Gram.seen = []
    # the caller's setting: 2 threads (workers start with 2 as well)
    extra = {"inner_max_num_threads": 2} if backend == "loky" else {}
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        if min(before) < 2:
            pytest.skip("BLAS runs on one thread here")
        with parallel_config(backend=backend, n_jobs=n_jobs, **extra):
            state = FedMM(Gram(dim=30, strict=True), max_iter=4, random_state=0,
                          client_timeout=timeout).fit(clients)
        after = blas_threads()
    assert before == after == [2] * len(before)
    # every client computed with one BLAS thread (in workers too: strict)
    assert all(f == [] for f in state.history.failed)
    if backend != "loky":
        assert Gram.seen and all(n == [1] * len(n) for n in Gram.seen)


@needs_blas
def test_concurrent_fits_in_threads_leave_blas_threads_as_found():
    clients = gram_clients(n=60, dim=30)
    results, errors = [], []

    def fit():
        try:
            with parallel_config(backend="threading", n_jobs=2):
                results.append(FedMM(Gram(dim=30, strict=True), max_iter=15,
                                     random_state=0).fit(clients))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        if min(before) < 2:
            pytest.skip("BLAS runs on one thread here")
        threads = [threading.Thread(target=fit) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = blas_threads()
    assert not errors
    assert before == after == [2] * len(before)
    assert all(all(f == [] for f in s.history.failed) for s in results)
    for s in results[1:]:
        np.testing.assert_array_equal(s.theta, results[0].theta)


@needs_blas
def test_threading_fit_is_bitwise_the_sequential_fit_at_blas_sizes():
    clients = gram_clients(n=300, dim=400)
    problem = Gram(dim=400)
    # the computation does round differently with 1 and 2 BLAS threads here
    stats = []
    for n_threads in (1, 2):
        with threadpool_limits(limits=n_threads, user_api="blas"):
            stats.append(problem.local_statistic(clients[0], np.zeros(400))[0]["m"])
    if np.array_equal(*stats):
        pytest.skip("BLAS rounds the same with 1 and 2 threads on this machine")
    with threadpool_limits(limits=2, user_api="blas"):
        ref = FedMM(problem, max_iter=3, random_state=0, n_jobs=1).fit(clients)
        for _ in range(3):
            with parallel_config(backend="threading", n_jobs=2):
                par = FedMM(problem, max_iter=3, random_state=0).fit(clients)
            np.testing.assert_array_equal(par.theta, ref.theta)


def test_blas_limit_is_reference_counted():
    limit = local._BlasLimit()
    if not blas_threads():
        pytest.skip("threadpoolctl finds no BLAS")
    with threadpool_limits(limits=2, user_api="blas"):
        if min(blas_threads()) < 2:
            pytest.skip("BLAS runs on one thread here")
        assert limit.acquire(fit=True)
        assert blas_threads() == [1] * len(blas_threads())
        assert not limit.acquire(fit=False)  # a fit holds it: tasks leave it alone
        assert limit.acquire(fit=True)  # a second fit
        limit.release(fit=True)
        assert blas_threads() == [1] * len(blas_threads())  # the other fit still runs
        limit.release(fit=True)
        assert blas_threads() == [2] * len(blas_threads())
        # in a worker process (no fit there), tasks hold it around themselves
        assert limit.acquire(fit=False) and limit.acquire(fit=False)
        limit.release(fit=False)
        assert blas_threads() == [1] * len(blas_threads())
        limit.release(fit=False)
        assert blas_threads() == [2] * len(blas_threads())


# --------------------------------------------------------------------------
# Timeouts
# --------------------------------------------------------------------------
def test_guarded_does_not_ask_a_busy_client_again(tmp_path):
    for busy in (local._busy_registry("fit-a"), local._busy_registry("fit-b", str(tmp_path))):
        guard = local._ClientGuard(busy, 3)
        release = threading.Event()
        calls = []

        def task(x):
            calls.append(x)
            release.wait(10)
            return x

        first = local._guarded(task, 1, timeout=0.1, guard=guard)
        assert isinstance(first, local.ClientFailure) and first.error == "TimeoutError"
        t0 = time.perf_counter()
        second = local._guarded(task, 2, timeout=5.0, guard=guard)
        assert time.perf_counter() - t0 < 1.0  # not waited for
        assert second.error == "TimeoutError" and "still busy" in second.message
        assert "client 3" in second.message
        assert calls == [1]  # no new work started
        # another client of the same fit is not affected
        assert local._guarded(lambda: 7, timeout=1.0, guard=local._ClientGuard(busy, 4)) == 7
        release.set()
        deadline = time.time() + 5
        while time.time() < deadline and not busy.acquire(3):
            time.sleep(0.01)
        busy.release(3)
        assert local._guarded(lambda: 5, timeout=1.0, guard=guard) == 5  # free again
        release.clear()
        # a pickled registry (how tasks reach workers) is the same registry
        clone = pickle.loads(pickle.dumps(guard))
        assert local._guarded(task, 3, timeout=0.1, guard=guard).error == "TimeoutError"
        assert "still busy" in local._guarded(task, 4, timeout=0.1, guard=clone).message
        release.set()


@pytest.mark.parametrize("backend, n_jobs", [("sequential", 1), ("threading", 2)])
def test_hung_client_does_not_pile_up_threads_or_time(backend, n_jobs):
    clients = sleepy_clients()
    rounds, timeout = 20, 0.5
    baseline = set(threading.enumerate())

    def new_threads():
        return [t.name for t in threading.enumerate() if t not in baseline]

    t0 = time.perf_counter()
    with warnings.catch_warnings(), parallel_config(backend=backend, n_jobs=n_jobs):
        warnings.simplefilter("ignore", ClientFailureWarning)
        state = FedMM(Sleepy(seconds=3.0), max_iter=rounds, eval_every=1, random_state=0,
                      client_timeout=timeout).fit(clients)
    elapsed = time.perf_counter() - t0
    # one abandoned computation at most (client 1's), not one per round and evaluation
    assert len([t for t in new_threads() if "client 1" in t]) <= 1, new_threads()
    assert len(new_threads()) <= 2, new_threads()
    # the dead client costs one timeout, then is known busy: rounds and evaluations
    # do not wait for it again (before: 2 timeouts per round, 21 s here)
    assert elapsed < rounds * timeout + 2.0
    # (on a loaded machine another client may miss a deadline too)
    assert all((1, "TimeoutError") in f for f in state.history.failed)
    assert np.all(np.isnan(state.history.full_objective[1:]))
    # the abandoned computation ends (3 s after it started) and nothing is left
    deadline = time.perf_counter() + 10
    while new_threads() and time.perf_counter() < deadline:
        time.sleep(0.1)
    assert not new_threads()


HUNG_SCRIPT = textwrap.dedent(
    """
    import sys, time, warnings
    import numpy as np
    from joblib import parallel_config
    from skfedmm import FedMM, MMProblem

    class Hung(MMProblem):
        def init_statistic(self, X):
            return None
        def init_parameter(self, init_stat, rng):
            return np.zeros(3)
        def local_statistic(self, X, theta):
            if X.shape[0] == 47:
                time.sleep(60)
            return {"m": X.mean(axis=0)}, 0.0
        def minimize(self, stat, theta_prev, rng=None):
            return stat["m"]
        def project(self, stat):
            return stat

    if __name__ == "__main__":
        warnings.simplefilter("ignore")
        rng = np.random.default_rng(0)
        clients = [rng.standard_normal((40 + 7 * i, 3)) for i in range(4)]
        with parallel_config(backend=sys.argv[1], n_jobs=int(sys.argv[2])):
            FedMM(Hung(), max_iter=10, random_state=0, client_timeout=0.2).fit(clients)
        print("fit returned", flush=True)
    """
)


@pytest.mark.skipif(not POSIX, reason="POSIX process handling")
@pytest.mark.parametrize("backend, n_jobs", [("sequential", 1), ("threading", 2), ("loky", 2)])
def test_process_exits_promptly_after_fit_with_hung_client(tmp_path, backend, n_jobs):
    script = tmp_path / "hung.py"
    script.write_text(HUNG_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), backend, str(n_jobs)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the fit has returned
        returned = time.perf_counter()
        assert line.strip() == "fit returned"
        proc.wait(timeout=40)
        exit_delay = time.perf_counter() - returned
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    # the hung client sleeps 60 s; exiting takes 1-2 s (10 s on a loaded machine)
    assert exit_delay < 20


# --------------------------------------------------------------------------
# Client rows on disk
# --------------------------------------------------------------------------
class Mean(MMProblem):
    """Mean estimation; records where client tasks ran."""

    def __init__(self, pid_file=None, seconds=0.0):
        self.pid_file = pid_file
        self.seconds = seconds

    def init_statistic(self, X):
        return None

    def init_parameter(self, init_stat, rng):
        return np.zeros(3)

    def local_statistic(self, X, theta):
        if self.pid_file is not None:
            with open(self.pid_file, "a") as f:
                f.write(f"{os.getpid()}\n")
        time.sleep(self.seconds)
        return {"m": np.asarray(X.mean(axis=0))}, float(np.mean((X - theta) ** 2))

    def minimize(self, stat, theta_prev, rng=None):
        return stat["m"]

    def project(self, stat):
        return stat


def mean_clients(n_clients=4):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((30 + i, 3)) for i in range(n_clients)]


def test_client_files_go_to_joblibs_temp_folder(tmp_path, monkeypatch):
    system_tmp = tmp_path / "system"
    chosen = tmp_path / "chosen"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    monkeypatch.delenv("JOBLIB_TEMP_FOLDER", raising=False)
    seen = []

    def look(info):
        seen.append(glob.glob(str(chosen / "skfedmm-*" / "clients.rows")))

    on_workers(monkeypatch)  # (small clients would stay here, and their rows unwritten)
    with parallel_config(backend="loky", n_jobs=2, temp_folder=str(chosen)):
        FedMM(Mean(), max_iter=2, random_state=0, callback=look).fit(mean_clients())
    # one file for all clients (from the first round on: the callback also
    # sees the initial round, whose tasks may run here)
    assert seen[1:] and all(len(files) == 1 for files in seen[1:])
    assert not glob.glob(str(chosen / "skfedmm-*"))  # removed at the end
    assert not glob.glob(str(system_tmp / "skfedmm-*"))
    # the environment variable joblib honours, when nothing is configured
    env = tmp_path / "env"
    monkeypatch.setenv("JOBLIB_TEMP_FOLDER", str(env))
    assert local._temp_root() == str(env)


def _alive(pid):
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


TERM_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from joblib import parallel_config
    from skfedmm import FedMM, MMProblem

    class SlowMean(MMProblem):
        def __init__(self, main=None):
            self.main = main
        def init_statistic(self, X):
            return None
        def init_parameter(self, init_stat, rng):
            return np.zeros(3)
        def local_statistic(self, X, theta):
            if os.getpid() != self.main:  # (one write: workers print at once)
                os.write(1, f"worker {os.getpid()}\\n".encode())
            time.sleep(0.5)
            return {"m": X.mean(axis=0)}, 0.0
        def minimize(self, stat, theta_prev, rng=None):
            return stat["m"]
        def project(self, stat):
            return stat

    if __name__ == "__main__":
        rng = np.random.default_rng(0)
        clients = [rng.standard_normal((40, 3)) for i in range(4)]
        with parallel_config(backend="loky", n_jobs=2, temp_folder=sys.argv[1]):
            FedMM(SlowMean(os.getpid()), max_iter=1000, random_state=0).fit(clients)
    """
)


@pytest.mark.skipif(not LINUX, reason="POSIX signals and /proc")
def test_sigterm_during_loky_fit_leaves_no_rows_and_no_workers(tmp_path):
    script = tmp_path / "term.py"
    script.write_text(TERM_SCRIPT)
    folder = tmp_path / "tmp"
    proc = subprocess.Popen([sys.executable, str(script), str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    workers = set()
    try:
        # wait until both workers compute clients (the rows are on disk then)
        deadline = time.time() + 60
        while len(workers) < 2 and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            workers.add(int(line.split()[1]))
        assert len(workers) == 2
        assert glob.glob(str(folder / "skfedmm-*" / "clients.rows"))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        deadline = time.time() + 8
        while time.time() < deadline and (
            glob.glob(str(folder / "skfedmm-*")) or any(_alive(p) for p in workers)
        ):
            time.sleep(0.2)
        assert not glob.glob(str(folder / "skfedmm-*")), "client rows left on disk"
        assert not [p for p in workers if _alive(p)], "orphan workers"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(not LINUX, reason="/proc/<pid>/maps")
def test_idle_workers_do_not_keep_client_rows_mapped(tmp_path, monkeypatch):
    pid_file = tmp_path / "pids"
    folder = tmp_path / "tmp"
    on_workers(monkeypatch)
    with parallel_config(backend="loky", n_jobs=2, temp_folder=str(folder)):
        FedMM(Mean(pid_file=str(pid_file), seconds=0.05), max_iter=3,
              random_state=0).fit(mean_clients())
    workers = {int(p) for p in pid_file.read_text().split()} - {os.getpid()}
    assert workers
    mapped = []
    for pid in workers:
        with open(f"/proc/{pid}/maps") as f:
            mapped += [line for line in f if "skfedmm-" in line]
    assert not mapped


def test_a_task_maps_the_rows_file_once_for_its_group(tmp_path, monkeypatch):
    """One file holds every client's rows; a task maps it once for its group,
    reads only its own clients' blocks, and never looks at other files."""
    n = 3000
    rng = np.random.default_rng(0)
    arrays = [np.full((i % 5, 3), float(i)) for i in range(n)]
    arrays[7] = np.asfortranarray(rng.standard_normal((6, 4))[:, :3])
    rows_file = local._RowsFile.save(str(tmp_path / "clients.rows"), arrays, buffer_bytes=4096)
    assert len(os.listdir(tmp_path)) == 1
    later = local._RowsFile.later(str(tmp_path / "later.rows"), arrays)
    assert len(os.listdir(tmp_path)) == 1  # written when first needed
    assert len(pickle.dumps(later)) < 60 * n  # the handle, never the arrays
    assert len(os.listdir(tmp_path)) == 2
    maps, calls = [], []
    real_mmap = local.mmap.mmap
    monkeypatch.setattr(local.mmap, "mmap", lambda *a, **k: maps.append(1) or real_mmap(*a, **k))
    for name in ("exists", "isdir", "isfile"):
        real = getattr(os.path, name)
        monkeypatch.setattr(os.path, name, lambda p, _real=real: calls.append(p) or _real(p))
    group = list(range(0, n, 2))
    handle = pickle.loads(pickle.dumps(rows_file.subset(group)))
    assert len(pickle.dumps(handle)) < 60 * len(group)  # offsets, never rows
    t0 = time.perf_counter()
    rows = handle.open()
    elapsed = time.perf_counter() - t0
    assert len(maps) == 1 and not calls
    assert sorted(rows) == group
    for i in group:
        np.testing.assert_array_equal(rows[i], arrays[i])
        assert not rows[i].flags.writeable
        assert rows[i].size == 0 or rows[i].ctypes.data % 64 == 0  # aligned as allocated
    assert rows[8].flags.c_contiguous
    assert pickle.loads(pickle.dumps(rows_file.subset([7]))).open()[7].flags.f_contiguous
    assert elapsed < 1.0


def test_continued_fits_of_a_run_share_the_busy_record():
    """Warm or partial fits against a hung client leave one abandoned
    computation for the run, not one per fit."""
    clients = sleepy_clients()
    baseline = set(threading.enumerate())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClientFailureWarning)
        engine = FedMM(Sleepy(seconds=3.0), max_iter=1, random_state=0, client_timeout=0.3)
        state = engine.fit(clients)
        for _ in range(4):
            state = engine.fit(clients, state=state)
    hung = [t for t in threading.enumerate() if t not in baseline and "client 1" in t.name]
    assert len(hung) <= 1, hung
    assert all((1, "TimeoutError") in f for f in state.history.failed[1:])


# --------------------------------------------------------------------------
# Groups of clients, and where they run
# --------------------------------------------------------------------------
def on_workers(monkeypatch):
    """Every call of several clients goes to the workers; counts those calls."""
    from skfedmm.federation.transport import LocalTransport

    calls = []
    real = LocalTransport._workers
    monkeypatch.setattr(local._Scheduler, "parallel",
                        lambda self, task, n: self.n_workers > 1 and n > 1)
    monkeypatch.setattr(LocalTransport, "_workers",
                        lambda self: calls.append(1) or real(self))
    return calls


class Fragile(MMProblem):
    """Mean estimation; the client with ``bad_rows`` rows raises."""

    def __init__(self, bad_rows=47):
        self.bad_rows = bad_rows

    def init_statistic(self, X):
        return None

    def init_parameter(self, init_stat, rng):
        return np.zeros(3)

    def local_statistic(self, X, theta):
        if X.shape[0] == self.bad_rows:
            raise ArithmeticError("this client is broken")
        return {"m": X.mean(axis=0)}, float(np.mean((X - theta) ** 2))

    def minimize(self, stat, theta_prev, rng=None):
        return stat["m"]

    def project(self, stat):
        return stat


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_groups_on_workers_give_the_model_of_one_process(monkeypatch, backend):
    from ._helpers import CauchyLocation, make_clients

    clients = make_clients(n_clients=9)
    params = dict(max_iter=4, participation=0.7, compression="qsgd", batch_size=30,
                  random_state=0, eval_every=2)
    ref = FedMM(CauchyLocation(), n_jobs=1, **params).fit(clients)
    calls = on_workers(monkeypatch)
    with parallel_config(backend=backend, n_jobs=2):
        par = FedMM(CauchyLocation(), **params).fit(clients)
    assert len(calls) >= 5  # init, full, rounds and evaluations, all on the workers
    np.testing.assert_array_equal(par.theta, ref.theta)
    np.testing.assert_array_equal(par.history["objective"], ref.history["objective"])
    for a, b in zip(par.clients, ref.clients):
        assert a.rng.bit_generator.state == b.rng.bit_generator.state
        np.testing.assert_array_equal(a.cv, b.cv)


def test_a_failing_client_in_a_group_is_absent_alone(monkeypatch):
    clients = sleepy_clients()  # client 1 has 47 rows
    calls = on_workers(monkeypatch)
    with parallel_config(backend="threading", n_jobs=2), \
            pytest.warns(ClientFailureWarning, match="client 1 failed"):
        state = FedMM(Fragile(), max_iter=3, random_state=0).fit(clients)
    assert calls
    assert all(f == [(1, "ArithmeticError")] for f in state.history.failed)
    assert list(state.history.n_active[1:]) == [3, 3, 3]


def test_a_hung_client_in_a_group_misses_only_its_own_deadline(monkeypatch):
    clients = sleepy_clients()
    calls = on_workers(monkeypatch)
    t0 = time.perf_counter()
    with parallel_config(backend="threading", n_jobs=2), warnings.catch_warnings():
        warnings.simplefilter("ignore", ClientFailureWarning)
        state = FedMM(Sleepy(seconds=2.0), max_iter=3, random_state=0,
                      client_timeout=0.3).fit(clients)
    elapsed = time.perf_counter() - t0
    assert calls
    # its group-mates answered, in every round
    assert all((1, "TimeoutError") in f for f in state.history.failed[1:])
    assert all(n >= 2 for n in state.history.n_active[1:])
    assert elapsed < 2.0 + 6 * 0.3  # one deadline missed, then known busy


def test_the_scheduler_keeps_small_clients_here(monkeypatch):
    monkeypatch.setattr(local, "_WARM", set())
    monkeypatch.setattr(local, "_PER_CLIENT", {})
    monkeypatch.setattr(local, "_FORGONE", {})
    monkeypatch.setattr(local, "_SLOWDOWN", {})
    s = local._Scheduler(2, "processes")
    assert not s.known("surrogate")
    assert s.parallel("surrogate", 10)  # unknown: let the workers measure
    s.record_here("full", 100, 100 * 30e-6)  # 30 us per client
    assert s.known("surrogate") and not s.known("init")
    assert not s.parallel("surrogate", 100)
    for _ in range(100):  # sending states costs more than the clients' work
        assert not s.parallel("surrogate", 10_000)
    assert local._FORGONE == {}
    heavier = local._Scheduler(2, "processes")
    heavier.record_here("full", 10, 10 * 0.04)  # about 0.4 s saved per call of 20
    assert not heavier.parallel("surrogate", 20)  # not yet worth starting the workers...
    assert heavier.parallel("surrogate", 20)  # ... but it is after two such calls
    s.record_here("full", 10, 10 * 0.2)  # heavy clients
    assert s.parallel("surrogate", 10)
    assert not s.parallel("surrogate", 1)
    assert not local._Scheduler(1, "processes").parallel("surrogate", 10)
    # measured: the workers' start is not counted, then a call costs 50 ms per client
    s.record_there("surrogate", [5, 5], [0.1, 0.1], 5.0)
    assert local._PER_CLIENT == {}
    s.record_there("surrogate", [5, 5], [0.1, 0.1], 0.1 + 0.01 + 10 * 0.05)
    assert local._PER_CLIENT[("processes", 2)] == pytest.approx(0.05)
    assert s.here["statistic"] == pytest.approx(0.02)  # corrected by the workers' time
    assert not s.parallel("surrogate", 10)
    # clients computing three times slower on the workers (a loaded machine): a
    # new fit predicts it before sending anything
    monkeypatch.setattr(local, "_PER_CLIENT", {})
    monkeypatch.setattr(local, "_SLOWDOWN", {})
    s = local._Scheduler(2, "processes")
    s.record_here("full", 10, 10 * 0.1)
    assert s.parallel("surrogate", 10)
    s.record_there("surrogate", [5, 5], [1.5, 1.5], 1.5 + 0.01)
    assert local._SLOWDOWN[("processes", 2)] == pytest.approx(3.0)
    fresh = local._Scheduler(2, "processes")
    fresh.record_here("full", 10, 10 * 0.1)
    assert not fresh.parallel("surrogate", 10)


def test_tiny_clients_teach_no_slowdown_and_kept_calls_remeasure(monkeypatch):
    monkeypatch.setattr(local, "_RETRY", {})
    monkeypatch.setattr(local, "_WARM", {("processes", 2)})
    monkeypatch.setattr(local, "_PER_CLIENT", {})
    monkeypatch.setattr(local, "_SLOWDOWN", {})
    tiny = local._Scheduler(2, "processes")
    tiny.record_here("full", 100, 100 * 20e-6)
    # 5x slower on the workers: their per-client cost, not contention
    tiny.record_there("surrogate", [50, 50], [50 * 100e-6] * 2, 0.02)
    assert local._SLOWDOWN == {}
    heavy = local._Scheduler(2, "processes")
    heavy.record_here("full", 20, 20 * 0.01)
    assert heavy.parallel("surrogate", 20)  # not kept here by the tiny clients' ratio
    # measured three times slower there: kept here, but measured again after
    # local._RETRY_AFTER calls, then after twice as many
    heavy.record_there("surrogate", [10, 10], [0.3, 0.3], 0.31)
    decisions = [heavy.parallel("surrogate", 20) for _ in range(3 * local._RETRY_AFTER)]
    assert [i for i, d in enumerate(decisions) if d] == [
        local._RETRY_AFTER - 1, 3 * local._RETRY_AFTER - 1]
    assert "statistic" not in heavy.there  # the retry measures afresh
    # the back-off goes on across fits (a machine that stays loaded), up to a cap
    heavy.record_there("surrogate", [10, 10], [0.3, 0.3], 0.31)
    fresh = local._Scheduler(2, "processes")
    fresh.record_here("full", 20, 20 * 0.01)
    decisions = [fresh.parallel("surrogate", 20) for _ in range(4 * local._RETRY_MAX)]
    gaps = np.diff([-1] + [i for i, d in enumerate(decisions) if d])
    assert gaps[0] == 4 * local._RETRY_AFTER and set(gaps[-2:]) == {local._RETRY_MAX}
    # a slowdown is learned per problem class: memory-bound clients that slow
    # down on two workers at once say nothing of compute-bound ones
    monkeypatch.setattr(local, "_SLOWDOWN", {})
    memory_bound = local._Scheduler(2, "processes")
    memory_bound.family = "RobustLocation"
    memory_bound.record_here("full", 20, 20 * 0.01)
    memory_bound.record_there("surrogate", [10, 10], [0.3, 0.3], 0.31)
    again = local._Scheduler(2, "processes")
    again.family = "RobustLocation"
    again.record_here("full", 20, 20 * 0.01)
    assert not again.parallel("surrogate", 20)
    other = local._Scheduler(2, "processes")
    other.family = "DictionaryLearningProblem"
    other.record_here("full", 20, 20 * 0.01)
    assert other.parallel("surrogate", 20)


def test_tiny_clients_never_start_workers(monkeypatch):
    from skfedmm.federation.transport import LocalTransport

    from ._helpers import CauchyLocation

    monkeypatch.setattr(local, "_WARM", set())  # as in a fresh process
    monkeypatch.setattr(local, "_FORGONE", {})
    monkeypatch.setattr(local, "_SLOWDOWN", {})
    calls = []
    real = LocalTransport._workers
    monkeypatch.setattr(LocalTransport, "_workers", lambda self: calls.append(1) or real(self))
    rng = np.random.default_rng(0)
    clients = [rng.standard_normal((20, 3)) for _ in range(300)]
    params = dict(max_iter=5, participation=0.1, random_state=0)
    ref = FedMM(CauchyLocation(), n_jobs=1, **params).fit(clients)
    with parallel_config(backend="loky", n_jobs=2):
        state = FedMM(CauchyLocation(), **params).fit(clients)
    assert not calls
    np.testing.assert_array_equal(state.theta, ref.theta)


# --------------------------------------------------------------------------
# One client: BLAS threads by the size of its task
# --------------------------------------------------------------------------
def test_single_blas_thread_rule():
    rule = local._single_blas_thread
    big = local.BLAS_THREADS_MIN_VALUES
    assert rule(2, [10, 10], 3)  # several clients: always
    assert rule(1, [10], 3)
    assert not rule(1, [big], 1)
    assert not rule(1, [10], None)  # unknown shapes: left alone


@needs_blas
def test_a_small_lone_client_computes_on_one_blas_thread(monkeypatch):
    clients = gram_clients(n_clients=1, n=60, dim=30)
    with threadpool_limits(limits=2, user_api="blas"):
        if min(blas_threads()) < 2:
            pytest.skip("BLAS runs on one thread here")
        Gram.seen = []
        state = FedMM(Gram(dim=30, strict=True), max_iter=3, random_state=0).fit(clients)
        assert all(f == [] for f in state.history.failed)
        assert Gram.seen and all(n == [1] * len(n) for n in Gram.seen)
        assert blas_threads() == [2] * len(blas_threads())  # restored
        # a large task keeps every thread (the threshold lowered to make it large)
        monkeypatch.setattr(local, "BLAS_THREADS_MIN_VALUES", 100)
        Gram.seen = []
        FedMM(Gram(dim=30), max_iter=2, random_state=0).fit(clients)
        assert Gram.seen and all(n == [2] * len(n) for n in Gram.seen)
        # minibatches: the size of the batch decides
        Gram.seen = []
        FedMM(Gram(dim=30), max_iter=2, random_state=0, batch_size=3).fit(clients)
        assert [1] * len(Gram.seen[-1]) == Gram.seen[-1]


def test_client_streams_copy_and_travel_as_their_state():
    from skfedmm.federation.client import ClientState, _copy_rng

    rng = np.random.default_rng(3)
    rng.random(5)
    copy_ = _copy_rng(rng)
    assert copy_ is not rng and copy_.bit_generator is not rng.bit_generator
    expected = copy.deepcopy(rng).random(4)
    np.testing.assert_array_equal(copy_.random(4), expected)
    np.testing.assert_array_equal(rng.random(4), expected)  # the original did not move
    state = ClientState(cv=np.arange(3.0), rng=rng, log_scale=None)
    back = pickle.loads(pickle.dumps(state))
    assert back.rng.bit_generator.state == rng.bit_generator.state
    np.testing.assert_array_equal(back.cv, state.cv)
    mt = ClientState(cv=None, rng=np.random.Generator(np.random.MT19937(1)))
    assert pickle.loads(pickle.dumps(mt)).rng.random() == copy.deepcopy(mt.rng).random()


def test_a_group_whose_rows_cannot_be_read_is_absent_not_the_fit(tmp_path):
    rows_file = local._RowsFile.save(str(tmp_path / "clients.rows"), [np.ones((3, 2))] * 3)
    handle = rows_file.subset([0, 2])
    os.unlink(rows_file.path)
    answers, seconds = local._run_group(
        lambda problem, X: X.sum(), None, (), handle, [(0, (), ()), (2, (), ())], pin=False)
    assert [a.error for a in answers] == ["FileNotFoundError"] * 2 and seconds >= 0
