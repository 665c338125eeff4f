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
        out = _call_groups(parallel, [functools.partial(_where, i) for i in range(5)])
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
        assert _call_groups(parallel, [functools.partial(_fail, i) for i in (0, 2)]) == [0, 2]


def test_other_backends_go_through_parallel(monkeypatch):
    calls = []
    real = Parallel.__call__

    def counted(self, iterable):
        calls.append(1)
        return real(self, iterable)

    monkeypatch.setattr(Parallel, "__call__", counted)
    with parallel_config(backend="sequential"), Parallel(n_jobs=2) as parallel:
        out = _call_groups(parallel, [functools.partial(_fail, i) for i in (0, 2, 3)])
    assert out == [0, 2, 3] and calls == [1]
