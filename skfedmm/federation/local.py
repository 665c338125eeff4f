"""Clients run in this process or in joblib's workers: the local transport.

What the round loop needs from the place where clients run, for joblib's
backends (sequential, threads, loky or multiprocessing processes, Dask):

- **Placement of rows** (:func:`_place_clients`): once per fit, the rows go
  where the workers read them; every round then ships only parameters,
  statistics and client state.
- **BLAS limits** (:func:`blas_limited`, :class:`_ClientContext`): with
  several clients, BLAS runs on one thread in every process that computes,
  so that results are bitwise independent of ``n_jobs`` and of the backend.
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
                if fit or self._controller is None:
                    # (re)scan the loaded libraries once per fit, once per worker
                    from threadpoolctl import ThreadpoolController

                    self._controller = ThreadpoolController()
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

    def __init__(self, pin):
        self.pin = pin

    def __enter__(self):
        self._held = bool(self.pin) and _BLAS.acquire(fit=False)
        self._err = np.errstate(all="ignore")
        self._err.__enter__()
        return self

    def __exit__(self, *exc):
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

    def __init__(self, handles, arrays, busy):
        super().__init__(handles)
        self.shapes = [X.shape for X in arrays]
        self.busy = busy

    def guard(self, i):
        """The guard that client ``i``'s tasks carry (see :func:`_guarded`)."""
        return _ClientGuard(self.busy, int(i))


def _place_clients(clients, n_jobs, stack, token=None):
    """Put the clients' rows where the workers read them, once per fit.

    - Dask (joblib's ``"dask"`` backend): each client's array is scattered
      to one worker (not broadcast) and replaced by its future; Dask runs
      that client's tasks where its rows live.
    - Process-based backends (loky, multiprocessing) with several workers:
      each array is written once to a ``.npy`` file in a private folder
      (under joblib's ``temp_folder``, see :func:`_temp_root`), and tasks
      carry only its path; a task maps the file read-only while it runs
      (no mapping outlives its task, so the rows are released with the
      folder at the end of the fit). The folder is registered with loky's
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
        owner = os.getpid()
        handles = []
        for i, X in enumerate(clients):
            handles.append(_MappedRows.save(os.path.join(folder, f"client{i}.npy"), X, owner))
        return _Placed(handles, clients, _busy_registry(token, folder))
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


class _MappedRows:
    """A client's rows in a ``.npy`` file; unpickles as a read-only memmap.

    Parameters
    ----------
    path : str
    shape, dtype, offset, order
        Where and how the rows are in the file (read once, when it is
        written).
    owner : int or None
        Process id of the fit; a worker process it started exits once it
        is gone (see :func:`_watch_owner`).
    """

    def __init__(self, path, shape, dtype, offset, order="C", owner=None):
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self.offset = offset
        self.order = order
        self.owner = owner

    @classmethod
    def save(cls, path, X, owner=None):
        """Write ``X`` to ``path`` (``.npy``) and return its handle."""
        np.save(path, X)
        rows = np.load(path, mmap_mode="r")
        order = "F" if rows.flags.f_contiguous and not rows.flags.c_contiguous else "C"
        handle = cls(path, rows.shape, rows.dtype.str, rows.offset, order, owner)
        del rows
        return handle

    def __reduce__(self):
        return _load_rows, (self.path, self.shape, self.dtype, self.offset, self.order, self.owner)


def _load_rows(path, shape, dtype, offset, order="C", owner=None):
    """Map a client's rows read-only, for one task.

    Each task maps the file anew (tens of microseconds, without parsing its
    header again) and the mapping goes with the task: a mapping kept across
    tasks would keep the rows of a finished fit on disk until the next fit,
    and its bookkeeping would grow with the number of clients.
    """
    _watch_owner(owner)
    dtype = np.dtype(dtype)
    if int(np.prod(shape)) == 0:  # (mmap cannot map nothing)
        rows = np.empty(shape, dtype=dtype, order=order)
        rows.flags.writeable = False
        return rows
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.ndarray(shape, dtype=dtype, buffer=buffer, offset=offset, order=order)


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
