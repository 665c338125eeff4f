"""Groups of clients submitted to joblib's backends (``_call_groups``)."""

import functools
import os

import pytest
from joblib import Parallel, parallel_config
from joblib.parallel import get_active_backend

from skfedmm.federation.local import _call_groups

BACKENDS = ["loky", "threading", "multiprocessing"]


def _where(i):
    return i, os.getpid(), type(get_active_backend()[0]).__name__


def _fail(i):
    if i == 1:
        raise KeyError(f"group {i}")
    return i


def _no_poll(self, iterable):
    raise AssertionError("went through Parallel's polling loop")


@pytest.mark.parametrize("backend", BACKENDS)
def test_answers_in_order_without_parallels_loop(backend, monkeypatch):
    with parallel_config(backend=backend, n_jobs=2), Parallel() as parallel:
        monkeypatch.setattr(Parallel, "__call__", _no_poll)
        out, _ = _call_groups(parallel, [functools.partial(_where, i) for i in range(5)])
    assert [i for i, _, _ in out] == list(range(5))
    pids = {pid for _, pid, _ in out}
    if backend == "threading":
        assert pids == {os.getpid()}
    else:
        assert os.getpid() not in pids
    # a nested joblib call inside a group uses joblib's backend for nesting,
    # as in joblib's own tasks (never processes started by processes)
    assert {name for _, _, name in out} <= {"ThreadingBackend", "SequentialBackend"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_raised_once_every_group_ended(backend):
    with parallel_config(backend=backend, n_jobs=2), Parallel() as parallel:
        with pytest.raises(KeyError, match="group 1"):
            _call_groups(parallel, [functools.partial(_fail, i) for i in range(3)])
        # the workers still serve the next call
        assert _call_groups(parallel, [functools.partial(_fail, i) for i in (0, 2)])[0] == [0, 2]


def test_other_backends_go_through_parallel(monkeypatch):
    calls = []
    real = Parallel.__call__

    def counted(self, iterable):
        calls.append(1)
        return real(self, iterable)

    monkeypatch.setattr(Parallel, "__call__", counted)
    with parallel_config(backend="sequential"), Parallel(n_jobs=2) as parallel:
        out, fresh = _call_groups(parallel, [functools.partial(_fail, i) for i in (0, 2, 3)])
    assert out == [0, 2, 3] and calls == [1] and fresh is None


def _wait_for(path, seconds=20.0):
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if os.path.exists(path):
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("backend", BACKENDS)
def test_this_process_computes_while_the_groups_run(backend, tmp_path):
    from skfedmm.federation.local import _start_groups

    flag = tmp_path / "flag"
    with parallel_config(backend=backend, n_jobs=2), Parallel() as parallel:
        finish = _start_groups(parallel, [functools.partial(_wait_for, str(flag))] * 2)
        flag.touch()  # (after submitting: a blocking submission would wait 20 s)
        answers, _, _ = finish()
    assert answers == [True, True]


def test_a_parallel_call_computes_its_first_group_here(tmp_path, monkeypatch):
    import numpy as np

    from skfedmm import FedMM

    from .test_local_transport import Mean, mean_clients, on_workers

    pid_file = tmp_path / "pids"
    clients = mean_clients(6)
    ref = FedMM(Mean(), max_iter=3, random_state=0, n_jobs=1).fit(clients)
    on_workers(monkeypatch)
    with parallel_config(backend="loky", n_jobs=2):
        par = FedMM(Mean(str(pid_file)), max_iter=3, random_state=0).fit(clients)
    pids = [int(p) for p in pid_file.read_text().split()]
    here = sum(p == os.getpid() for p in pids)
    # this process and a worker share every call (not only the first clients,
    # which this process computes to measure them)
    assert len(pids) / 3 < here < len(pids)
    np.testing.assert_array_equal(par.theta, ref.theta)


def test_rows_are_appended_to_the_file_when_a_task_first_needs_them(tmp_path):
    import pickle

    import numpy as np

    from skfedmm.federation.local import _RowsFile

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((5 + i, 3)) for i in range(4)]
    arrays[2] = np.asfortranarray(arrays[2])
    path = tmp_path / "clients.rows"
    rows = _RowsFile.later(str(path), arrays)
    assert not path.exists()
    one = pickle.loads(pickle.dumps(rows.subset([3])))
    assert path.stat().st_size == arrays[3].nbytes  # client 3 alone
    two = rows.subset([2, 3])  # client 2 appended, client 3 not written again
    assert path.stat().st_size < sum(a.nbytes for a in arrays[2:]) + 64
    for handle, ids in ((one, [3]), (two, [2, 3])):
        opened = handle.open()
        assert sorted(opened) == ids
        for i in ids:
            np.testing.assert_array_equal(opened[i], arrays[i])
            assert opened[i].ctypes.data % 64 == opened[ids[0]].ctypes.data % 64
    assert opened[2].flags.f_contiguous
    pickle.dumps(rows)  # (a whole handle travels with every client's rows written)
    assert sorted(rows.blocks) == [0, 1, 2, 3]
    for i, X in rows.open().items():
        np.testing.assert_array_equal(X, arrays[i])


def test_a_fresh_workers_first_task_is_not_a_cost_of_later_calls():
    """The first task of a new worker process (which imports modules while
    unpickling it) is reported, and teaches the scheduler nothing about the
    cost of a call."""
    from joblib.externals.loky import get_reusable_executor

    from skfedmm.federation import local

    with parallel_config(backend="loky", n_jobs=2), Parallel() as parallel:
        get_reusable_executor(max_workers=2).shutdown(wait=True)  # (fresh workers)
    with parallel_config(backend="loky", n_jobs=2), Parallel() as parallel:
        fresh = [_call_groups(parallel, [functools.partial(_where, i)])[1] for i in range(12)]
    assert fresh[0] and sum(fresh) <= 2  # (two workers: at most two first tasks)

    key = ("processes", 2)
    scheduler = local._Scheduler(2, "processes")
    before = dict(local._PER_CLIENT), set(local._WARM)
    try:
        local._WARM.add(key)
        local._PER_CLIENT[key] = 1e-4
        scheduler.record_there("surrogate", [4], [0.2], 1.4, fresh=True)
        assert local._PER_CLIENT[key] == 1e-4
        scheduler.record_there("surrogate", [4], [0.2], 1.4)
        assert local._PER_CLIENT[key] > 1e-2
    finally:
        local._PER_CLIENT.clear()
        local._PER_CLIENT.update(before[0])
        local._WARM.clear()
        local._WARM.update(before[1])
