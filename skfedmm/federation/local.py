"""Clients run in this process or in joblib's workers: the local transport.

What the round loop needs from the place where clients run, for joblib's
backends (sequential, threads, loky or multiprocessing processes, Dask):

- **Placement of rows** (:func:`_place_clients`): once per fit, the rows go
  where the workers read them; every round then ships only parameters,
  statistics and client state (the clients' caches stay next to the rows,
  see :mod:`skfedmm.federation.caches`).
- **Groups of clients** (:func:`_run_group`, :class:`_Scheduler`): one
  task carries a group of clients (one group per worker; the fit's
  process computes the first group itself, :func:`_start_groups`), each
  client guarded on its own; a call's clients run in the fit's process
  unless groups on the workers are measured to be faster.
- **BLAS limits** (:func:`blas_limited`, :class:`_ClientContext`): with
  several clients (or one client with few rows, see
  :func:`_single_blas_thread`), BLAS runs on one thread in every process
  that computes, so that results are bitwise independent of ``n_jobs`` and
  of the backend.
  Limits are reference-counted per process: set once for a whole fit in the
  fit's process, and around tasks in worker processes, never undone by an
  overlapping task, and the caller's setting is restored exactly.
- **Guarded calls** (:func:`_guarded`): a client's exception or missed
  deadline makes it absent from the round, not the fit. A computation that
  missed its deadline runs on in a daemon thread (Python cannot stop it; it
  never blocks interpreter exit), and its client is not asked again until
  it has finished: at most one abandoned computation per client.

Nothing here imports the round loop (:mod:`skfedmm.engine`).
"""

import contextlib
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass

import numpy as np

__all__ = ["ClientFailure", "blas_limited"]


@dataclass
class ClientFailure:
    """What the server gets from a client whose computation raised.

    Attributes
    ----------
    error : str
        The exception's type name.
    message : str
    exception : BaseException
    """

    error: str
    message: str
    exception: object = None


# --------------------------------------------------------------------------
# BLAS limits
# --------------------------------------------------------------------------
@contextlib.contextmanager
def _blas_control():
    """Let this thread set OpenBLAS's (process-wide) thread count, then let go.

    threadpoolctl (3.8 and later) lets only one "controlling" Python thread
    change the thread count of OpenBLAS's shared pthreads pool and silently
    ignores the others. The limit here is process-wide by design and may be
    set from any thread (the thread that runs a fit, a worker's thread):
    take control for the change, and release it so that others can change
    the setting afterwards.
    """
    try:
        from threadpoolctl import OpenBLASController

        clear = OpenBLASController.clear_controlling_thread
    except (ImportError, AttributeError):  # older threadpoolctl: no such rule
        clear = None
    if clear is not None:
        clear(force=True)
    try:
        yield
    finally:
        if clear is not None:
            clear()


class _BlasLimit:
    """This process's BLAS limited to one thread, reference-counted.

    The first holder records the current setting and limits BLAS to one
    thread; the last one restores the recorded setting. A fit holds the
    limit for its whole duration in its own process; while a fit holds it,
    tasks in that process leave it alone (so a computation abandoned after
    a timeout never keeps the caller's process limited after the fit).
    Worker processes, where no fit runs, hold it around each task.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = 0
        self._fits = 0
        self._controller = None
        self._modules = None
        self._limiter = None

    def acquire(self, fit):
        """Take a hold; False when a task need not (a fit holds the limit).

        Parameters
        ----------
        fit : bool
            Whether the holder is a whole fit (True) or one client task.

        Returns
        -------
        held : bool
            Whether a hold was taken (then :meth:`release` must be called).
        """
        with self._lock:
            if not fit and self._fits:
                return False
            if self._holders == 0:
                modules = len(sys.modules)
                if self._controller is None or (fit and modules != self._modules):
                    # (re)scan the loaded libraries (tens of milliseconds) once
                    # per worker, and for a fit when modules were imported since
                    from threadpoolctl import ThreadpoolController

                    self._controller = ThreadpoolController()
                    self._modules = modules
                with _blas_control():
                    self._limiter = self._controller.limit(limits=1, user_api="blas")
            self._holders += 1
            self._fits += bool(fit)
            return True

    def release(self, fit):
        """Give back a hold taken by :meth:`acquire`; the last restores.

        Parameters
        ----------
        fit : bool
            As given to :meth:`acquire`.
        """
        with self._lock:
            self._holders -= 1
            self._fits -= bool(fit)
            if self._holders == 0:
                limiter, self._limiter = self._limiter, None
                with _blas_control():
                    limiter.restore_original_limits()


_BLAS = _BlasLimit()
if hasattr(os, "register_at_fork"):
    # a forked worker starts with no holder (and a fresh lock), whatever the
    # parent held when it forked
    os.register_at_fork(after_in_child=_BLAS.__init__)


@contextlib.contextmanager
def blas_limited(pin):
    """Context of a whole fit: BLAS on one thread in this process.

    Parameters
    ----------
    pin : bool
        Limit (True: several clients) or leave BLAS alone (False).

    Notes
    -----
    Reference-counted: two fits running at once in threads keep the limit
    until the last one ends, which restores the setting found by the first.
    The server's steps run under the same limit as the clients, whatever
    the backend, so that they too are bitwise independent of it.
    """
    held = bool(pin) and _BLAS.acquire(fit=True)
    try:
        yield
    finally:
        if held:
            _BLAS.release(fit=True)


#: A lone client's task whose rows hold fewer values than this computes with
#: one BLAS thread: its products are small, and a second thread saves a
#: fraction of a millisecond on an idle machine but costs tens of
#: milliseconds when other processes keep the cores busy (each product then
#: waits for a descheduled thread).
BLAS_THREADS_MIN_VALUES = 1 << 20


def _single_blas_thread(n_clients, n_rows, n_features):
    """Whether client work runs with BLAS on one thread.

    Several clients: always (results do not depend on ``n_jobs``, and the
    clients are the parallelism). One client: when its task's rows are
    few (see :data:`BLAS_THREADS_MIN_VALUES`). The choice depends only on
    shapes, so that results do not depend on the machine's load.

    Parameters
    ----------
    n_clients : int
    n_rows : array-like of int
        Rows one task of each client computes on.
    n_features : int or None
        None when unknown (then BLAS is left alone for one client).
    """
    if n_clients > 1:
        return True
    if n_features is None or len(n_rows) == 0:
        return False
    return int(np.max(n_rows)) * int(n_features) < BLAS_THREADS_MIN_VALUES


class _ClientContext:
    """Context of all client work.

    Limits BLAS to one thread when several clients may run at once (so that
    results do not depend on ``n_jobs``), unless the fit running in this
    process already does, and silences floating-point warnings: the server
    checks every message instead and raises one clear error naming the
    client.

    Parameters
    ----------
    pin : bool
        Whether BLAS must run on one thread.
    """

    _local = threading.local()  # this thread's open contexts: their pins

    def __init__(self, pin):
        self.pin = pin

    def __enter__(self):
        open_pins = getattr(self._local, "pins", None)
        if open_pins is None:
            open_pins = self._local.pins = []
        # inside a context of this thread that already covers this one (the
        # task of a group of clients): nothing more to set, per client
        self._nested = bool(open_pins) and (open_pins[-1] or not self.pin)
        open_pins.append(bool(self.pin) or (self._nested and open_pins[-1]))
        if self._nested:
            return self
        self._held = bool(self.pin) and _BLAS.acquire(fit=False)
        self._err = np.errstate(all="ignore")
        self._err.__enter__()
        return self

    def __exit__(self, *exc):
        self._local.pins.pop()
        if self._nested:
            return False
        self._err.__exit__(*exc)
        if self._held:
            _BLAS.release(fit=False)
        return False


# --------------------------------------------------------------------------
# Guarded calls, deadlines and busy clients
# --------------------------------------------------------------------------
class _BusyRegistry:
    """Which clients of one fit are still computing (with ``client_timeout``).

    Every guarded computation with a deadline holds its client's slot until
    it ends, even after its deadline: a client whose slot is taken is not
    asked again. Where the slots live depends on where clients run:

    - in one process (sequential, threads, and per worker process on Dask):
      a set in memory, found again by the fit's ``token`` when a task
      unpickles the registry (a registry is kept alive by the computations
      holding its slots, so a fresh one means nobody is busy);
    - across the processes of one machine (loky, multiprocessing): a marker
      file ``client<i>.busy`` in the fit's private folder, created
      exclusively, removed when the computation ends.

    Parameters
    ----------
    token : str
        Identifies the fit.
    folder : str or None
        The fit's private folder for marker files, None for memory.
    """

    def __init__(self, token, folder=None):
        self.token = token
        self.folder = folder
        self._lock = threading.Lock()
        self._busy = set()

    def __reduce__(self):
        return _busy_registry, (self.token, self.folder)

    def _marker(self, client):
        return os.path.join(self.folder, f"client{client}.busy")

    def acquire(self, client):
        """Take the client's slot; False if it is still busy.

        Parameters
        ----------
        client : int

        Returns
        -------
        acquired : bool
        """
        if self.folder is not None:
            try:
                os.close(os.open(self._marker(client), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                return False
            except FileNotFoundError:  # the fit's folder is gone: nothing to track
                pass
            return True
        with self._lock:
            if client in self._busy:
                return False
            self._busy.add(client)
            return True

    def release(self, client):
        """Free the client's slot (its computation has ended).

        Parameters
        ----------
        client : int
        """
        if self.folder is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._marker(client))
            return
        with self._lock:
            self._busy.discard(client)


_REGISTRIES = weakref.WeakValueDictionary()
_REGISTRIES_LOCK = threading.Lock()


def _busy_registry(token, folder=None):
    """This process's registry of the fit ``token`` (created if needed)."""
    if folder is not None:
        return _BusyRegistry(token, folder)
    with _REGISTRIES_LOCK:
        registry = _REGISTRIES.get(token)
        if registry is None:
            registry = _REGISTRIES[token] = _BusyRegistry(token)
        return registry


class _ClientGuard:
    """A client's index and its fit's busy registry, sent with its tasks.

    Parameters
    ----------
    busy : _BusyRegistry
    client : int
    """

    def __init__(self, busy, client):
        self.busy = busy
        self.client = client


def _guarded(task, *args, timeout=None, guard=None):
    """Run a client task; an exception makes the client absent, not the fit.

    Parameters
    ----------
    task : callable
        The client function, called as ``task(*args)``.
    *args
        Its arguments.
    timeout : float or None, default=None
        Seconds the client may take. The task then runs in a daemon thread;
        when it has not answered in time the client is absent
        (``TimeoutError``). Python cannot stop that thread: it finishes in
        the background (never blocking interpreter exit) and its result is
        discarded (it works on copies, so it changes nothing).
    guard : _ClientGuard or None, default=None
        With a ``timeout``: the client's slot in its fit's busy registry. A
        client still busy with an abandoned computation is absent at once
        (``TimeoutError``, "still busy") without starting new work, so
        there is at most one abandoned computation per client.

    Returns
    -------
    result : object or ClientFailure
        The task's result, or the failure that stands for it.
    """
    try:
        if timeout is None:
            return task(*args)
        return _call_with_deadline(task, args, timeout, guard)
    except Exception as exc:  # noqa: BLE001 - any client error is a failure
        return ClientFailure(type(exc).__name__, str(exc), exc)


def _call_with_deadline(task, args, timeout, guard):
    """``task(*args)`` in a daemon thread; TimeoutError after ``timeout`` s."""
    who = "the client" if guard is None else f"client {guard.client}"
    if guard is not None and not guard.busy.acquire(guard.client):
        raise TimeoutError(
            f"{who} is still busy with a computation that missed an earlier deadline "
            f"(client_timeout={timeout} s); it is not asked again until that computation ends"
        )
    outcome = {}
    done = threading.Event()

    def run():
        try:
            outcome["value"] = task(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc
        finally:
            if guard is not None:
                guard.busy.release(guard.client)
            done.set()

    thread = threading.Thread(target=run, name=f"skfedmm {who}", daemon=True)
    try:
        thread.start()
    except BaseException:
        if guard is not None:
            guard.busy.release(guard.client)
        raise
    if not done.wait(timeout):
        raise TimeoutError(f"no answer within client_timeout={timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _client_guard(clients, i):
    """The guard of client ``i`` of placed ``clients`` (None if not placed)."""
    return clients.guard(i) if isinstance(clients, _Placed) else None


# --------------------------------------------------------------------------
# Placement of the clients' rows
# --------------------------------------------------------------------------
class _Placed(list):
    """The clients' rows as the workers read them, with metadata kept here.

    A list of per-client handles: the arrays themselves (sequential and
    threads), paths that unpickle as read-only memory maps (processes), or
    Dask futures.

    Parameters
    ----------
    handles : list
        What a task receives for each client.
    arrays : list of ndarray
        The clients' rows (only their shapes are kept).
    busy : _BusyRegistry
        The fit's registry of busy clients.
    """

    def __init__(self, handles, arrays, busy, rows=None):
        super().__init__(handles)
        self.shapes = [X.shape for X in arrays]
        self.busy = busy
        self.rows = arrays if rows is None else rows

    def __getitem__(self, i):
        if isinstance(self.rows, _RowsFile):  # (handles made when asked for)
            return self.rows.subset([int(i)])
        return super().__getitem__(i)

    def guard(self, i):
        """The guard that client ``i``'s tasks carry (see :func:`_guarded`)."""
        return _ClientGuard(self.busy, int(i))


def _place_clients(clients, n_jobs, stack, token=None):
    """Put the clients' rows where the workers read them, once per fit.

    - Dask (joblib's ``"dask"`` backend): each client's array is scattered
      to one worker (not broadcast) and replaced by its future; Dask runs
      that client's tasks where its rows live.
    - Process-based backends (loky, multiprocessing) with several workers:
      each array is written once, when a task first needs it, to one
      file in a private folder (under
      joblib's ``temp_folder``, see :func:`_temp_root`), and tasks carry
      only its path and their clients' offsets (:class:`_RowsFile`); a task
      maps the file read-only while it runs (no mapping outlives its task,
      so the rows are released with the folder at the end of the fit). The folder is registered with loky's
      resource tracker, which removes it if this process dies before the
      end of the fit, and workers exit when this process is gone.
    - Sequential and thread-based runs use the arrays themselves.

    Every round then ships only parameters, statistics and client state.

    Parameters
    ----------
    clients : list of ndarray
    n_jobs : int or None
    stack : contextlib.ExitStack
        The fit's stack: the folder is removed when it closes.
    token : str, default=None
        The training run's id: continued fits of one run share the record
        of busy clients (a client still busy from an earlier fit of the run
        is not asked again). A new id when None.

    Returns
    -------
    placed : _Placed
    """
    from joblib import effective_n_jobs
    from joblib.parallel import get_active_backend

    if token is None:
        token = uuid.uuid4().hex
    backend, _ = get_active_backend()
    name = type(backend).__name__
    client = _dask_client()
    if client is not None:
        futures = client.scatter([_AlignedRows(X) for X in clients], hash=False)
        return _Placed(futures, clients, _busy_registry(token))
    if name in ("LokyBackend", "MultiprocessingBackend") and effective_n_jobs(n_jobs) > 1:
        folder = _private_folder(stack)
        # (written when a task first needs it: small clients may never leave)
        rows = _RowsFile.later(os.path.join(folder, "clients.rows"), clients, os.getpid())
        return _Placed([], clients, _busy_registry(token, folder), rows)
    return _Placed(clients, clients, _busy_registry(token))


def _temp_root():
    """Where joblib puts its own memory maps: its ``temp_folder`` setting.

    ``parallel_config(temp_folder=...)`` first, then the
    ``JOBLIB_TEMP_FOLDER`` environment variable, then the system's temporary
    folder (``TMPDIR``); unlike joblib, never ``/dev/shm`` (client data can
    be large).

    Returns
    -------
    folder : str or None
        None for the system's temporary folder.
    """
    folder = None
    try:  # joblib keeps the active configuration private
        from joblib.parallel import _backend, _get_config_param, default_parallel_config

        config = getattr(_backend, "config", default_parallel_config)
        folder = _get_config_param(default_parallel_config["temp_folder"], config, "temp_folder")
    except (ImportError, AttributeError, KeyError, TypeError):
        folder = None
    if folder is None:
        folder = os.environ.get("JOBLIB_TEMP_FOLDER")
    if folder is None:
        return None
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    os.makedirs(folder, exist_ok=True)
    return folder


def _private_folder(stack):
    """A new ``skfedmm-*`` folder for one fit's rows, removed however it ends.

    Removed when ``stack`` closes; registered with loky's resource tracker
    (as joblib registers its own memmapping folders), which removes it when
    every process of the fit is gone without having removed it (killed by a
    signal, for example).
    """
    folder = tempfile.mkdtemp(prefix="skfedmm-", dir=_temp_root())
    tracker = None
    if os.name == "posix":
        try:
            from joblib.externals.loky.backend import resource_tracker as tracker

            tracker.register(folder, "folder")
        except Exception:  # noqa: BLE001 - the tracker is a safety net only
            tracker = None

    def remove():
        shutil.rmtree(folder, ignore_errors=True)
        if tracker is not None:
            with contextlib.suppress(Exception):
                tracker.unregister(folder, "folder")

    stack.callback(remove)
    return folder


def _dask_client():
    """The Dask client of joblib's active ``"dask"`` backend, or None."""
    from joblib.parallel import get_active_backend

    backend, _ = get_active_backend()
    if type(backend).__name__ == "DaskDistributedBackend":
        return getattr(backend, "client", None)
    return None


_WATCHING = []
_WATCH_LOCK = threading.Lock()


def _watch_owner(owner, interval=0.5):
    """In a worker process started by ``owner``: exit soon after it is gone.

    A worker busy with a client's computation would otherwise outlive a fit
    whose process was killed, keep the client's rows mapped and keep loky's
    resource tracker from removing them. One daemon thread per worker
    process watches its parent; it does nothing in the fit's own process or
    in processes that ``owner`` did not start.
    """
    if owner is None or os.name != "posix" or os.getpid() == owner or os.getppid() != owner:
        return
    with _WATCH_LOCK:
        if owner in _WATCHING:
            return
        _WATCHING.append(owner)

    def watch():
        while os.getppid() == owner:
            time.sleep(interval)
        os._exit(1)  # orphaned: nobody will ever read this worker's results

    threading.Thread(target=watch, name="skfedmm owner watch", daemon=True).start()


def _aligned(a):
    """``a`` itself, or an aligned copy when a transport left it unaligned.

    Dask may deliver arrays at unaligned addresses, where BLAS kernels round
    differently; aligned inputs keep results bitwise independent of where a
    client runs.
    """
    if isinstance(a, np.ndarray) and not a.flags.aligned:
        return np.require(a, requirements=["ALIGNED", "C"])
    return a


class _AlignedRows:
    """Pickles as its array and unpickles as an aligned copy (scatter once)."""

    def __init__(self, X):
        self.X = X

    def __reduce__(self):
        return _aligned, (self.X,)


# --------------------------------------------------------------------------
# Groups of clients: one task per worker, and where each group runs
# --------------------------------------------------------------------------
def _run_group(fn, problem, args, rows, items, pin, timeout=None, busy=None, guarded=None,
               caches=None):
    """Run one client task on a group of clients, each guarded on its own.

    One joblib task carries a whole group: the problem and the round's
    payload travel once for the group, the rows are read where they are
    (``rows[i]``), and a client's exception or missed deadline makes only
    that client absent (:func:`_guarded`, one deadline per client).

    Parameters
    ----------
    fn : callable
        The client function.
    problem : MMProblem
    args : tuple
        The round's payload, the same for every client.
    rows : sequence
        Indexed by client: the rows themselves, or a :class:`_RowsFile`
        (which maps its file once for the group).
    items : list of (int, tuple, tuple)
        Per client: its index, the arguments before the payload (its
        state) and after it (its initialization data).
    pin : bool
        Limit BLAS to one thread (several clients).
    timeout : float or None
    busy : _BusyRegistry or None
        The fit's registry of busy clients (with a ``timeout``).
    guarded : callable, default=None
        The guard of each call; :func:`_guarded` when None.
    caches : CacheFolder or None, default=None
        Where the clients' caches are stored (process workers): a client's
        stored cache is mapped back before its call, and its new cache is
        written as a new version, of which the answer carries the path
        (see :mod:`skfedmm.federation.caches`).

    Returns
    -------
    answers : list
        One answer or :class:`ClientFailure` per item, in order.
    seconds : float
        The group's computing time (for the placement decisions).
    """
    start = time.perf_counter()
    if isinstance(rows, _RowsFile) and rows.owner not in (None, os.getpid()):  # (a worker)
        _keep_freed_memory()
    try:
        rows = rows.open() if isinstance(rows, _RowsFile) else rows
    except Exception as exc:  # noqa: BLE001 - the group's clients are absent, not the fit
        failure = ClientFailure(type(exc).__name__, str(exc), exc)
        return [failure] * len(items), time.perf_counter() - start
    guarded = _guarded if guarded is None else guarded
    answers = []
    with _ClientContext(pin):
        for i, head, tail in items:
            guard = None if timeout is None or busy is None else _ClientGuard(busy, i)
            opened = loaded = None
            try:
                X = rows[i]
                if caches is not None and head:
                    from .caches import open_cache

                    loaded, opened = open_cache(head[0].cache)
                    if opened is not None:
                        head = (_with_cache(head[0], loaded), *head[1:])
            except Exception as exc:  # noqa: BLE001 - this client's rows only
                answers.append(ClientFailure(type(exc).__name__, str(exc), exc))
                continue
            answer = guarded(fn, problem, X, *head, *args, *tail, timeout=timeout, guard=guard)
            if caches is not None:
                from .caches import store_answer

                try:
                    answer = store_answer(answer, caches, i, opened, loaded)
                except Exception as exc:  # noqa: BLE001 - this client is absent
                    answer = ClientFailure(type(exc).__name__, str(exc), exc)
            answers.append(answer)
    del rows
    return answers, time.perf_counter() - start


_RAN = []  # (whether this process has run a group's task)


class _Nested:
    """A group's task as a worker runs it: nested joblib calls inside it use
    the backend joblib chooses for nesting (as in joblib's own tasks).

    Returns the task's answer and whether this was the first task of the
    process: a fresh worker imports the modules of the problem's class when
    it unpickles its first task, which takes up to a second and is not part
    of the cost of later calls."""

    def __init__(self, task, nested):
        self.task = task
        self.nested = nested

    def __call__(self):
        from joblib import parallel_config

        fresh = not _RAN
        if fresh:
            _RAN.append(True)
        backend, n_jobs = self.nested
        with parallel_config(backend=backend, n_jobs=n_jobs):
            return self.task(), fresh


def _submits(parallel):
    """Whether tasks can be submitted to ``parallel``'s backend one by one
    (:func:`_start_groups`): joblib's own loky, multiprocessing and
    threading backends."""
    from joblib._parallel_backends import LokyBackend, MultiprocessingBackend, ThreadingBackend

    backend = getattr(parallel, "_backend", None)
    return (
        type(backend) in (LokyBackend, MultiprocessingBackend, ThreadingBackend)
        and callable(getattr(backend, "submit", None))
        and callable(getattr(backend, "retrieve_result_callback", None))
    )


def _start_groups(parallel, tasks):
    """Submit ``tasks`` (callables without arguments) to ``parallel``'s workers.

    joblib's :class:`~joblib.Parallel` collects answers by polling every
    10 ms, so a call ends on average 5 ms after its last task. Here the
    tasks are submitted to the backend that
    ``parallel`` configured (which must pass :func:`_submits`) and the
    returned function sleeps until the last one has ended, so this process
    can compute meanwhile.

    Returns
    -------
    finish : callable
        Returns the answers in order, the time (``time.perf_counter``)
        when the last task ended, and whether a task ran on a fresh worker
        (see :class:`_Nested`); an exception raised by a task (a worker
        lost: clients' own exceptions are answers) is raised once every
        task has ended.
    """
    backend = parallel._backend
    nested = backend.get_nested_backend()
    done = threading.Event()
    outs = [None] * len(tasks)
    left = [len(tasks), time.perf_counter()]
    lock = threading.Lock()

    def callback(i):
        def store(out):
            outs[i] = out
            with lock:
                left[0] -= 1
                if not left[0]:
                    left[1] = time.perf_counter()
                    done.set()

        return store

    for i, task in enumerate(tasks):
        backend.submit(_Nested(task, nested), callback=callback(i))
    if not tasks:
        done.set()

    def finish():
        done.wait()
        answers, error, fresh = [], None, False
        for out in outs:
            try:
                answer, first = backend.retrieve_result_callback(out)
            except BaseException as exc:  # noqa: BLE001 - raised after every task ended
                error = exc if error is None else error
                continue
            answers.append(answer)
            fresh = fresh or first
        if error is not None:
            raise error
        return answers, left[1], fresh

    return finish


def _call_groups(parallel, tasks):
    """Run ``tasks`` on ``parallel``'s workers.

    Submitted one by one (:func:`_start_groups`) where the backend allows,
    else through ``parallel`` itself.

    Returns
    -------
    answers : list
        In order.
    fresh : bool or None
        Whether a task ran on a fresh worker (None: not known).
    """
    from joblib import delayed

    if not _submits(parallel):
        return parallel(delayed(task)() for task in tasks), None
    answers, _, fresh = _start_groups(parallel, tasks)()
    return answers, fresh


#: glibc's malloc settings in process workers (see :func:`_keep_freed_memory`):
#: the largest values its own adaptive rule reaches on 64-bit machines.
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # (mallopt's parameter numbers)
_MALLOC_KEPT = []  # (this process's decision, once: True when the settings apply)


def _keep_freed_memory():
    """In a process worker: keep freed memory for the next client (glibc).

    A client's computation allocates temporaries as large as its rows
    (``X - theta``: a few MiB each) and frees them when it returns. glibc's
    malloc then gives the top of its heap back to the system as soon as
    more than twice the largest freed block lies free there (its adaptive
    ``M_TRIM_THRESHOLD``), so in a worker, whose heap holds little else,
    every call faults its temporaries in afresh, page by page, each page
    zeroed by the kernel: a streaming statistic (a few operations per value
    read) then computes about 1.6 times slower on a worker than in the
    fit's process (whose heap, holding the fit's other objects, was
    measured to fault in next to nothing per call). Here the
    worker's malloc takes the settings its adaptive rule would reach after
    freeing a 32 MiB block (blocks below 32 MiB from the heap, which keeps
    up to 64 MiB free at its top), so temporaries reuse the pages of the
    previous call. The cost: up to 64 MiB of freed memory per worker stays
    resident between tasks (glibc's own bound for processes with large
    temporaries).

    Done once per worker process, never in a fit's process (the user's),
    on glibc only, and not when the user set malloc's thresholds through
    the environment (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TOP_PAD_`` or ``GLIBC_TUNABLES``). Results do not change: only
    where temporaries live.

    Returns
    -------
    kept : bool
        Whether the settings apply in this process.
    """
    if _MALLOC_KEPT:
        return _MALLOC_KEPT[0]
    kept = False
    try:
        user = any(k in os.environ for k in (
            "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"))
        user = user or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
        glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
        if glibc and not user and sys.maxsize > 2**32:
            import ctypes

            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # (the mmap threshold first: any setting freezes the adaptive rule)
            kept = bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
                mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))
    except (AttributeError, OSError, ValueError):  # not glibc, no confstr name: leave it
        kept = False
    _MALLOC_KEPT.append(kept)
    return kept


def _with_cache(state, cache):
    """A copy of a client state with another cache."""
    import dataclasses

    return dataclasses.replace(state, cache=cache)


class _RowsFile:
    """The clients' rows in one file, each written once per fit; tasks map it.

    Each client's rows are one block of the file (its own memory order,
    starting on a 64-byte boundary, as freshly allocated arrays do, so that
    vectorized kernels see the same alignment wherever a client runs),
    appended when a task first needs them (:meth:`later`): the rows of
    clients that the fit's process computes never go to the file. A task
    carries only the path and the offsets of its own clients, and maps the
    file once, read-only, for its whole group of clients; the mapping goes
    with the task (a mapping kept across tasks would keep the rows of a
    finished fit on disk until the next fit).

    Parameters
    ----------
    path : str
    dtype : str
    blocks : dict
        Client index to ``(offset, shape, order)``.
    owner : int or None
        Process id of the fit (see :func:`_watch_owner`).
    """

    ALIGN = 64

    def __init__(self, path, dtype, blocks, owner=None):
        self.path = path
        self.dtype = dtype
        self.blocks = blocks
        self.owner = owner
        self._pending = None  # all the arrays, while some are not written (see :meth:`later`)
        self._end = 0  # (the file's used length, in elements)

    @classmethod
    def save(cls, path, arrays, owner=None, buffer_bytes=1 << 20, write=True):
        """Write ``arrays`` (one dtype) to ``path`` and return the handle.

        Small arrays are gathered into one buffer of at most
        ``buffer_bytes``, reused, and written together; larger ones are
        written directly (a buffer as large as the rows would cost more
        than their copy: the system hands over its fresh pages one fault at
        a time). With ``write=False`` only the handle is made (nothing is
        written).
        """
        handle = cls.later(path, arrays, owner)
        handle._append(range(len(arrays)), buffer_bytes, write)
        return handle

    def _append(self, indices, buffer_bytes=1 << 20, write=True):
        """Append the blocks of clients ``indices`` (of the pending arrays)."""
        arrays = self._pending
        dtype = np.dtype(self.dtype)
        step = max(self.ALIGN // dtype.itemsize, 1)  # 64 bytes, in elements
        end = self._end
        pending, start = [], end
        staging = []  # (the buffer, made once when first needed)
        mode = "r+b" if end else "wb"
        with open(self.path, mode) if write else contextlib.nullcontext() as f:

            def flush():
                if pending and write:
                    if not staging:
                        staging.append(np.empty(buffer_bytes // dtype.itemsize + 1, dtype=dtype))
                    buf = staging[0][: end - start]
                    buf.fill(0)  # (the gaps between arrays)
                    for at, flat in pending:
                        buf[at - start : at - start + flat.size] = flat
                    f.seek(start * dtype.itemsize)
                    f.write(memoryview(buf).cast("B"))
                pending.clear()

            for i in indices:
                X = np.asarray(arrays[i], dtype=dtype)
                order = "F" if X.flags.f_contiguous and not X.flags.c_contiguous else "C"
                at = -(-end // step) * step
                self.blocks[i] = (at * dtype.itemsize, X.shape, order)
                flat = np.ravel(X, order=order) if write else X
                if (at + flat.size - start) * dtype.itemsize > buffer_bytes:
                    flush()
                    start = at
                if flat.size * dtype.itemsize > buffer_bytes:  # directly, no copy
                    if write:
                        f.seek(at * dtype.itemsize)
                        f.write(memoryview(np.ascontiguousarray(flat)).cast("B"))
                    end = start = at + flat.size
                    continue
                pending.append((at, flat))
                end = at + flat.size
            flush()
        self._end = end
        if len(self.blocks) == len(arrays):
            self._pending = None

    def __reduce__(self):  # (never the pending arrays: write them first)
        if self._pending is not None:
            self.subset(range(len(self._pending)))
        return _RowsFile, (self.path, self.dtype, self.blocks, self.owner)

    @classmethod
    def later(cls, path, arrays, owner=None):
        """The handle of ``arrays``, each written to ``path`` when first needed."""
        dtype = np.dtype(arrays[0].dtype) if len(arrays) else np.dtype(float)
        handle = cls(path, dtype.str, {}, owner)
        handle._pending = arrays if len(arrays) else None
        return handle

    def subset(self, indices):
        """The handle of some clients only (what one task carries)."""
        indices = [int(i) for i in indices]
        missing = [i for i in indices if i not in self.blocks]
        if missing and self._pending is not None:
            # (a fit's folder gone: the fit is over and no task will read it)
            write = os.path.isdir(os.path.dirname(self.path) or ".")
            self._append(missing, write=write)
        return _RowsFile(self.path, self.dtype, {i: self.blocks[i] for i in indices}, self.owner)

    def open(self):
        """The clients' rows, read-only, from one mapping of the file."""
        _watch_owner(self.owner)
        dtype = np.dtype(self.dtype)
        buffer = None
        rows = {}
        for i, (offset, shape, order) in self.blocks.items():
            if int(np.prod(shape)) == 0:  # (mmap cannot map nothing)
                X = np.empty(shape, dtype=dtype, order=order)
                X.flags.writeable = False
            else:
                if buffer is None:
                    with open(self.path, "rb") as f:
                        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                X = np.ndarray(shape, dtype=dtype, buffer=buffer, offset=offset, order=order)
            rows[i] = X
        return rows


#: The cost of one parallel call beyond its clients' work: a fixed part
#: (dispatch, and joblib's polling for answers where a call goes through
#: :class:`~joblib.Parallel`; the fixed part is kept at that cost even where
#: tasks are submitted one by one, which costs less: this errs towards
#: keeping small clients here) and a part per client
#: (sending its state and payload, collecting its answer), learned per
#: joblib backend and number of workers from the calls of this process; the
#: first call, which may have started the workers, is not measured (it puts
#: the key in ``_WARM``).
_CALL_FIXED = {"processes": 0.01, "threads": 5e-3}
_PER_CLIENT_DEFAULT = {"processes": 5e-5, "threads": 5e-6}
_PER_CLIENT = {}
_WARM = set()
#: Starting process workers (which import numpy, scikit-learn and this
#: package) takes a second or more. Until they run, calls stay here while
#: the savings they forgo (``_FORGONE``, summed over the fits of this
#: process) are less than ``_START_PAYBACK`` times that cost: a fit of small
#: clients never starts them, heavy clients start them at once or after a
#: few calls (renting before buying: never more than 1.5 times the better
#: choice in hindsight).
_START_COST = {"processes": 1.0}
_START_PAYBACK = 0.5
_FORGONE = {}
#: How much longer a client computes on the workers than here (contention:
#: the GIL for threads; for processes, a machine whose other processes get
#: the cores, or memory bandwidth), learned across fits of one problem
#: class (:attr:`_Scheduler.family`): a new fit predicts from it. Learned
#: only from clients that compute at least ``_SLOWDOWN_MIN_WORK`` seconds
#: each here: a tiny client's time on a worker is mostly the per-client
#: cost of a task (its state unpickled, its guard), and that ratio, carried
#: over to heavy clients, would keep them here for good.
_SLOWDOWN = {}
_SLOWDOWN_MIN_WORK = 1e-3
#: Calls kept here on a predicted (not measured in this fit) or measured
#: slowdown re-measure the workers after this many calls, then after twice
#: as many, and so on up to ``_RETRY_MAX`` (counted across the fits of this
#: process, per backend, workers, problem class and kind of task): a machine
#: whose load has gone is noticed, at the cost of one call in ``_RETRY_MAX``
#: at most while it stays loaded.
_RETRY_AFTER = 4
_RETRY_MAX = 64
_RETRY = {}


class _Scheduler:
    """Where a call's clients run: here, or in groups on joblib's workers.

    Clients run here (in the fit's process, one after another) unless
    running them in ``n_workers`` groups is predicted to be faster, from
    what earlier calls measured: the computing time per client here and in
    the workers (which counts contention, such as the GIL for threads), and
    the cost of a parallel call beyond that (a fixed part, and per client:
    sending its state, collecting its answer; learned per backend across
    fits, the first call of a process, which may start the workers,
    excepted). The first call of
    a kind measures its first clients here (for about ``probe`` seconds,
    and at least three unless they take ``20 * probe`` together) before
    deciding for the rest. Where a client runs does not change its
    answer (BLAS runs on one thread in both places), only the time.

    Parameters
    ----------
    n_workers : int
    backend : str
        Key of the backend ("processes", "threads", ...), for the measured
        cost of a parallel call.
    """

    def __init__(self, n_workers, backend, probe=2e-3, margin=0.9, decay=0.3):
        self.n_workers = int(n_workers)
        self.backend = backend
        self.probe = probe
        self.margin = margin
        self.decay = decay
        self.here = {}
        self.there = {}
        self.family = None  # the problem's class, set by the transport

    @property
    def _key(self):
        return (self.backend, self.n_workers)

    @property
    def _slow_key(self):
        # (a slowdown depends on the clients' work too: memory-bound work
        # slows down on two workers at once, compute-bound work does not)
        return self._key if self.family is None else (*self._key, self.family)

    def overhead(self, n):
        """Predicted seconds of a parallel call of ``n`` clients beyond their work."""
        fixed = _CALL_FIXED.get(self.backend, 0.01)
        per_client = _PER_CLIENT.get(self._key, _PER_CLIENT_DEFAULT.get(self.backend, 5e-5))
        return fixed + n * per_client

    @staticmethod
    def kind(task):
        """Tasks of like cost share their measurements."""
        return "init" if task in ("init", "init_compressed") else "statistic"

    def _mix(self, table, key, value):
        old = table.get(key)
        table[key] = value if old is None else (1 - self.decay) * old + self.decay * value

    def known(self, task):
        return self.kind(task) in self.here

    def record_here(self, task, n, seconds):
        """Clients run here: how many, and their computing time."""
        if n:
            self._mix(self.here, self.kind(task), seconds / n)

    def record_there(self, task, sizes, seconds, wall, fresh=False):
        """A parallel call: its groups' sizes and computing times, its wall
        time, and whether a group ran on a fresh worker (whose first task
        imported modules: not a cost of later calls)."""
        n = sum(sizes)
        if not n:
            return
        kind = self.kind(task)
        per_client = sum(seconds) / n
        if self.here.get(kind, 0.0) >= _SLOWDOWN_MIN_WORK:
            self._mix(_SLOWDOWN, self._slow_key, per_client / self.here[kind])
        self._mix(self.there, kind, per_client)
        if self.here.get(kind, 0.0) > self.there[kind]:
            # clients computing faster there than measured here: the
            # measurement here was inflated (a first call, a busy moment)
            self.here[kind] = self.there[kind]
        if self._key not in _WARM or fresh:  # this call may have started the workers
            _WARM.add(self._key)
            return
        fixed = _CALL_FIXED.get(self.backend, 0.01)
        self._mix(_PER_CLIENT, self._key, max(wall - max(seconds) - fixed, 0.0) / n)

    def parallel(self, task, n):
        """Whether ``n`` clients of ``task`` go to the workers."""
        if self.n_workers < 2 or n < 2:
            return False
        kind = self.kind(task)
        here = self.here.get(kind)
        if here is None:
            return True
        there = self.there.get(kind, here * _SLOWDOWN.get(self._slow_key, 1.0))
        groups = min(self.n_workers, n)
        saving = n * here - (self.overhead(n) + n * there / groups)
        if saving <= (1 - self.margin) * n * here:
            # kept here; but when workers computing as fast as here would
            # save time, measure them again now and then (backing off)
            hoped = n * here - (self.overhead(n) + n * here / groups)
            if self._key not in _WARM or hoped <= (1 - self.margin) * n * here:
                return False
            record = _RETRY.setdefault((self._slow_key, kind), [0, _RETRY_AFTER])
            record[0] += 1  # calls kept here, and calls to keep before measuring again
            if record[0] < record[1]:
                return False
            record[:] = [0, min(2 * record[1], _RETRY_MAX)]
            self.there.pop(kind, None)  # (measured afresh by this call)
            return True
        if self._key not in _WARM:  # the workers may have to start first
            forgone = _FORGONE.get(self._key, 0.0) + saving
            if forgone < _START_PAYBACK * _START_COST.get(self.backend, 0.0):
                _FORGONE[self._key] = forgone
                return False
        return True
