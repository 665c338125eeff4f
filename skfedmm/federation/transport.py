"""Transports: how the server reaches its clients.

The round loop (:class:`skfedmm.FedMM`) never touches rows. It asks a
transport to run one of the clients' tasks (:data:`CLIENT_TASKS`: ``"init"``,
``"full"``, ``"loss"``, ``"surrogate"``, ``"parameter"``) on some clients
with one payload, and gets back each client's answer or a
:class:`~skfedmm.federation.local.ClientFailure`, in the order asked. Every
transport runs the same client functions (:mod:`skfedmm.federation.client`),
so the fitted model does not depend on the transport.

- :class:`LocalTransport` runs them in this process or in joblib's workers
  (any backend, including Dask), with the clients' rows placed once per fit.
- A deployment (for example on Flower) implements the same interface with
  the clients on other machines; their state stays with them.
"""

import contextlib
import dataclasses
import functools
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from joblib import Parallel, delayed

from .caches import CacheStore, in_memory, split_cache
from .client import CLIENT_TASKS
from .local import (
    ClientFailure,
    _call_groups,
    _start_groups,
    _submits,
    _client_guard,
    _dask_client,
    _guarded,
    _place_clients,
    _run_group,
    _single_blas_thread,
    _RowsFile,
    _Scheduler,
    blas_limited,
)

__all__ = ["LocalTransport", "RemoteClients", "Transport"]


class Transport(ABC):
    """How the server reaches its clients (the interface of the round loop).

    A transport is entered (``with transport:``) for one fit; it then knows
    how many clients there are, how many rows each holds and the dtype of
    their rows, and runs tasks on them.

    Notes
    -----
    Each task's answer must be exactly what the corresponding function of
    :data:`~skfedmm.federation.client.CLIENT_TASKS` returns, or a
    :class:`~skfedmm.federation.local.ClientFailure` when the client failed,
    did not answer in time, or cannot be reached. The server checks every
    answer on arrival (:mod:`skfedmm._messages`), whatever the transport.
    """

    @property
    @abstractmethod
    def n_clients(self):
        """Number of clients."""

    @property
    @abstractmethod
    def n_rows(self):
        """Rows per client, an integer array of shape (n_clients,)."""

    @property
    @abstractmethod
    def dtype(self):
        """The floating dtype of the clients' rows (and messages)."""

    @abstractmethod
    def run(self, task, indices, problem, *args, states=None, per_client=None):
        """Run a client task on the clients ``indices``.

        Parameters
        ----------
        task : str
            A key of :data:`~skfedmm.federation.client.CLIENT_TASKS`.
        indices : sequence of int
            The clients to run it on.
        problem : MMProblem
            The (prepared) problem.
        *args
            The round's payload, the same for every client (the task
            function's arguments after the rows and the client state).
        states : list of ClientState, default=None
            The clients' states, for tasks that take one (indexed by client).
            A deployment keeps them on the clients and may ignore these.
        per_client : list, default=None
            A last argument that differs per client (indexed by client), for
            example initialization data.

        Returns
        -------
        answers : list
            One answer or ClientFailure per entry of ``indices``, in order.
        """

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _RemoteRows:
    """Stands for one remote client's rows: their shape and dtype, no values."""

    ndim = 2

    def __init__(self, n_rows, n_features, dtype):
        self.shape = (int(n_rows), int(n_features))
        self.dtype = np.dtype(dtype)


class RemoteClients(Sequence):
    """The clients of a transport, where an estimator's ``fit`` expects arrays.

    An estimator fitted on a ``RemoteClients`` (see
    :meth:`~skfedmm._base.FederatedMixin.fit_transport`) validates the
    shapes the clients reported (``n_features_in_`` from the transport) and
    runs its rounds on the transport; the items only carry each client's
    shape and dtype.

    Parameters
    ----------
    transport : Transport
        A transport that knows its clients' ``n_features`` (the number of
        columns every client reported).
    """

    def __init__(self, transport):
        self.transport = transport
        n_features = getattr(transport, "n_features", None)
        if n_features is None:
            raise TypeError(
                f"{type(transport).__name__} does not report its clients' n_features; an "
                "estimator cannot be fitted on it."
            )
        dtype = transport.dtype
        self._rows = [_RemoteRows(n, n_features, dtype) for n in transport.n_rows]

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, i):
        return self._rows[i]


class LocalTransport(Transport):
    """Clients in this process or in joblib's workers.

    Parameters
    ----------
    clients : list of ndarray of shape (n_i, n_features)
        The clients' rows, all of one floating dtype.
    n_jobs : int or None, default=None
        Clients run in parallel through joblib; the backend is whatever
        :func:`joblib.parallel_config` selects (threads, processes, Dask).
    timeout : float or None, default=None
        Seconds a client may take before it counts as failed.
    run_id : str, default=None
        The training run's id: continued fits of one run share the record of
        busy clients, so a client whose computation is still running from an
        earlier fit is not asked again.

    Notes
    -----
    Entering the transport places the rows where the workers read them
    (once per fit: one memory-mapped file for process workers, scattered
    once on Dask) and limits BLAS to one thread when several clients may
    compute at once (results do not depend on ``n_jobs``). Every task then
    ships only parameters, statistics and client states; a client's cache
    (:meth:`MMProblem.client_cache`) stays where its rows are (see
    :mod:`skfedmm.federation.caches`).

    On one machine a call splits its clients into one group per worker
    (each client guarded on its own) and sends a task per group (but the
    first, which this process computes meanwhile, with joblib's own
    backends), or runs the clients in this
    process when that is measured to be faster (small clients; workers
    are started only when they pay). On Dask each client is one task, run
    where its rows are.
    """

    def __init__(self, clients, n_jobs=None, timeout=None, run_id=None):
        self.clients = clients
        self.n_jobs = n_jobs
        self.timeout = timeout
        self.run_id = run_id
        self._stack = None

    @property
    def n_clients(self):
        return len(self.clients)

    @property
    def n_rows(self):
        return np.array([X.shape[0] for X in self.clients], dtype=int)

    @property
    def dtype(self):
        return self.clients[0].dtype

    @property
    def _n_features(self):
        # (for the choice of BLAS threads only: not ``n_features``, which
        # would make the transport usable as RemoteClients)
        return self.clients[0].shape[1] if np.ndim(self.clients[0]) == 2 else None

    @property
    def pin(self):
        """BLAS on one thread in client work (several clients, or small ones)."""
        return _single_blas_thread(len(self.clients), self.n_rows, self._n_features)

    def __enter__(self):
        from joblib import effective_n_jobs
        from joblib.parallel import get_active_backend

        stack = contextlib.ExitStack()
        try:
            # BLAS on one thread in this process for the whole fit (clients
            # run here and the server's steps alike); workers limit theirs
            stack.enter_context(blas_limited(self.pin))
            backend = type(get_active_backend()[0]).__name__
            self._dask = _dask_client() is not None
            self._processes = backend in ("LokyBackend", "MultiprocessingBackend")
            n_workers = 1 if self.n_jobs == 1 else effective_n_jobs(self.n_jobs)
            kind = "processes" if self._processes else (
                "threads" if backend == "ThreadingBackend" else backend)
            self._scheduler = _Scheduler(n_workers, kind)
            self._parallel = None
            self._problems = {}  # (Dask: id -> the problem and its future)
            if self._dask:
                # one task per client on Dask, each where its rows are
                self._parallel = stack.enter_context(Parallel(n_jobs=self.n_jobs, batch_size=1))
            # the rows go where the workers read them once, here (and the
            # record of busy clients is one that they and this process see)
            self._placed = _place_clients(self.clients, n_workers, stack, token=self.run_id)
            self._busy = self._placed.busy
            # the clients' caches stay where their rows are: files next to
            # the rows' file, futures on Dask; read back here before the
            # folder goes (the stack closes in reverse order)
            rows = self._placed.rows
            folder = os.path.dirname(rows.path) if isinstance(rows, _RowsFile) else None
            self._caches = CacheStore(folder)
            stack.callback(self._caches.close)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        # a thread pool's idle threads end soon after it is closed: wait for
        # them, so that a finished fit leaves no threads behind
        pool = getattr(getattr(self._parallel, "_backend", None), "_pool", None)
        threads = [t for t in getattr(pool, "_pool", None) or [] if isinstance(t, threading.Thread)]
        self._parallel = self._placed = None
        self._problems = {}
        try:
            if stack is not None:
                return stack.__exit__(*exc)
            return False
        finally:
            for thread in threads:
                thread.join(timeout=5.0)

    def _workers(self):
        """joblib's workers (started on first use) and the rows as they read them."""
        if self._parallel is None:
            self._parallel = self._stack.enter_context(Parallel(n_jobs=self.n_jobs))
        return self._parallel, self._placed.rows

    def run(self, task, indices, problem, *args, states=None, per_client=None):
        if self._stack is None:
            raise RuntimeError("Enter the transport (`with transport:`) before running tasks.")
        fn = CLIENT_TASKS[task]
        indices = [int(i) for i in indices]
        if not indices:
            return []
        if self._dask:
            if states is not None and self._may_cache(problem, indices, states):
                return self._run_dask_states(fn, indices, problem, args, states, per_client)
            return self._run_per_client(fn, indices, problem, args, states, per_client)
        items = [
            (i, () if states is None else (states[i],), () if per_client is None else (per_client[i],))
            for i in indices
        ]
        scheduler = self._scheduler
        scheduler.family = type(problem).__qualname__

        def here(group):
            if states is not None:  # (caches in memory here)
                group = [(i, tuple(_state_with(s, in_memory(s.cache)) for s in head), tail)
                         for i, head, tail in group]
            return _run_group(
                fn, problem, args, self.clients, group, self.pin, self.timeout, self._busy,
                _guarded,
            )

        answers = []
        everyone = items
        if not scheduler.known(task) and scheduler.n_workers > 1:
            # the first clients run here (a few milliseconds), then decide
            start = time.perf_counter()
            times = []
            # (at least 3 clients unless they are heavy, so that the median
            # is not one client slowed down by a busy moment)
            while len(times) < len(items) and (
                not times or time.perf_counter() - start < scheduler.probe
                or (len(times) < 3 and sum(times) < 20 * scheduler.probe)
            ):
                (answer,), seconds = here(items[len(times):len(times) + 1])
                answers.append(answer)
                times.append(seconds)
            # (a low quantile: a first call may pay one-off costs, and a busy
            # moment of the machine slows a run of consecutive clients; an
            # estimate too low keeps clients here, which later calls correct,
            # while one too high would send a whole pass of tiny clients to
            # the workers)
            scheduler.record_here(task, 1, float(np.percentile(times, 25)))
            items = items[len(times):]
        if not items:
            return answers
        if not scheduler.parallel(task, len(items)):
            out, seconds = here(items)
            scheduler.record_here(task, len(items), seconds)
            return answers + out
        parallel, rows = self._workers()
        # one group per worker; where tasks can be submitted one by one,
        # this process computes the first group itself meanwhile (so that
        # n_jobs processes compute), counting the clients it has already
        # computed above
        groups = self._groups(everyone, scheduler.n_workers)
        done = len(everyone) - len(items)
        groups = [g[max(done - sum(len(h) for h in groups[:k]), 0):]
                  for k, g in enumerate(groups)]
        mine = []
        if _submits(parallel) and len(groups) > 1:
            mine, groups = groups[0], groups[1:]
        groups = [g for g in groups if g]
        caches = self._caches
        sent = {}
        if states is not None:
            # a client's cache goes as a reference to where it is stored
            out_groups = []
            for g in groups:
                out_items = []
                for i, head, tail in g:
                    outgoing = []
                    for s in head:
                        carried, sent[i] = caches.outgoing(i, s.cache)
                        outgoing.append(_state_with(s, carried))
                    out_items.append((i, tuple(outgoing), tail))
                out_groups.append(out_items)
            groups = out_groups
        tasks = [
            functools.partial(
                _run_group, fn, problem, args,
                rows.subset([i for i, _, _ in g]) if isinstance(rows, _RowsFile) else rows,
                g, self.pin, self.timeout, self._busy, _guarded,
                caches.folder if states is not None else None,
            )
            for g in groups
        ]
        start = time.perf_counter()
        if mine:
            finish = _start_groups(parallel, tasks)
            try:
                out, seconds = here(mine)
            finally:
                outs, end, fresh = finish()  # (never leave the workers' answers behind)
            scheduler.record_here(task, len(mine), seconds)
            answers += out
        else:
            outs, fresh = _call_groups(parallel, tasks)
            end = time.perf_counter()
        scheduler.record_there(
            task, [len(g) for g in groups], [sec for _, sec in outs], end - start, bool(fresh)
        )
        for (out, _), g in zip(outs, groups):
            answers += [caches.incoming(a, sent.get(i)) for a, (i, _, _) in zip(out, g)]
        return answers

    def _groups(self, items, n_groups):
        """Consecutive groups of clients with about equal numbers of rows."""
        sizes = np.array([self.clients[i].shape[0] for i, _, _ in items], dtype=float) + 1.0
        bounds = np.searchsorted(np.cumsum(sizes), sizes.sum() * np.arange(1, n_groups) / n_groups)
        cuts = [0, *sorted(set(int(b) + 1 for b in bounds)), len(items)]
        cuts = sorted(set(min(c, len(items)) for c in cuts))
        return [items[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

    def _dask_problem(self, problem):
        """The problem as Dask tasks take it: sent to every worker once per
        fit (a future), not with every client's task (a prepared problem
        holds aggregates, such as a second moment, that never change)."""
        held = self._problems.get(id(problem))
        if held is None or held[0] is not problem:
            (future,) = _dask_client().scatter([problem], broadcast=True, hash=False)
            held = self._problems[id(problem)] = (problem, future)
        return held[1]

    def _run_dask_states(self, fn, indices, problem, args, states, per_client):
        """One Dask task per client; each client's cache stays on the workers.

        The task's result is the client's answer and its new cache: only the
        answer is gathered (by a second, tiny task); the result stays on the
        worker as a future, which the client's next task takes as an
        argument (Dask gives it to the task where it is, normally the
        worker holding the client's rows).
        """
        from operator import itemgetter

        from .caches import DaskCache, StoredCache

        client = _dask_client()
        caches = self._caches
        problem = self._dask_problem(problem)
        # the round's payload, the same for every client: to each worker once
        args = list(args)
        if len(indices) > 1:
            (args,) = client.scatter([args], broadcast=True, hash=False)
        pending = []
        for i in indices:
            state = states[i]
            inner, unverified = split_cache(state.cache)
            previous = inner if isinstance(inner, StoredCache) else None
            if previous is not None and isinstance(previous.ref, DaskCache):
                cache, picked = previous.ref.future, True
            else:
                cache, picked = (previous.data() if previous is not None else inner), False
            tail = () if per_client is None else (per_client[i],)
            future = client.submit(
                _dask_task, fn, problem, self._placed[i], _state_with(state, None), cache,
                picked, unverified, args, list(tail), self.timeout,
                _client_guard(self._placed, i),
                pure=False,
            )
            pending.append((future, client.submit(itemgetter(0), future, pure=False), previous))
        answers = []
        for future, answer_f, previous in pending:
            try:
                answer = answer_f.result()
            except Exception as exc:  # noqa: BLE001 - the client is unreachable
                answers.append(ClientFailure(type(exc).__name__, str(exc), exc))
                continue
            where = answer[1].cache if isinstance(answer, tuple) and len(answer) == 2 else None
            if where is _KEPT and previous is not None and isinstance(previous.ref, DaskCache):
                answer[1].cache = previous  # the client kept its cache: the same version
            elif where is _KEPT or where is _ON_WORKER:
                answer[1].cache = caches.handle(DaskCache(future))
            answers.append(answer)
        return answers

    def _may_cache(self, problem, indices, states):
        """Whether clients may hold caches (then Dask keeps them on the workers)."""
        if any(states[i].cache is not None for i in indices):
            return True
        make = getattr(problem, "client_cache", None)
        if make is None:
            return False
        X = self.clients[indices[0]]
        try:  # (a cache is decided from the rows' shape and dtype)
            return make(_RemoteRows(X.shape[0], X.shape[1], X.dtype)) is not None
        except Exception:  # noqa: BLE001 - it needs the rows: assume it may
            return True

    def _run_per_client(self, fn, indices, problem, args, states, per_client):
        """One task per client (Dask: each runs where its rows were scattered)."""

        problem = self._dask_problem(problem)

        def call(i):
            head = (problem, self._placed[i]) + (() if states is None else (states[i],))
            tail = () if per_client is None else (per_client[i],)
            return delayed(_guarded)(
                fn, *head, *args, *tail, timeout=self.timeout,
                guard=_client_guard(self._placed, i),
            )

        return self._parallel(call(i) for i in indices)


def _state_with(state, cache):
    """A copy of a client state with another cache (the state itself if the same)."""
    if state.cache is cache:
        return state
    return dataclasses.replace(state, cache=cache)


class _Marker:
    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return _marker, (self.name,)


def _marker(name):
    return _KEPT if name == "kept" else _ON_WORKER


#: A Dask task's answer: the client kept the cache it was given, or its new
#: cache is the task's second result (kept on the worker).
_KEPT = _Marker("kept")
_ON_WORKER = _Marker("on worker")


def _dask_task(fn, problem, X, state, cache, picked, unverified, args, tail, timeout, guard):
    """A client's task on a Dask worker: ``(answer, new cache)``.

    ``cache`` is the client's cache, or (``picked``) the result of its last
    task, whose second item is its cache.
    """
    from .caches import rewrap

    if picked:
        cache = cache[1]
    if cache is not None:
        state = _state_with(state, rewrap(cache, unverified))
    answer = _guarded(fn, problem, X, state, *args, *tail, timeout=timeout, guard=guard)
    if not (isinstance(answer, tuple) and len(answer) == 2):
        return answer, None
    msg, new_state = answer
    new = new_state.cache
    if new is None:
        return answer, None
    kept = cache is not None and new is cache
    return (msg, _state_with(new_state, _KEPT if kept else _ON_WORKER)), new
