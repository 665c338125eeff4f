r"""The FedMM round loop, independent of any particular MM problem.

One FedMM round (Dieuleveut, Fort, Hegazy, Wai, 2025), with server state
:math:`(\hat S_t, V_t, \theta_t = T(\hat S_t))` and client control variates
:math:`V_i`:

.. math::

    \Delta_i &= \bar S_i(\theta_t) - \hat S_t - V_i, \qquad
    c_i = Q(\Delta_i), \qquad V_i \leftarrow V_i + \alpha c_i
    \quad (i \in A_t), \\
    H_t &= V_t + \sum_{i \in A_t} \frac{w_i}{q_i} c_i, \\
    \hat S_{t+1} &= \Pi(\hat S_t + \gamma_t H_t), \qquad
    V_{t+1} = V_t + \alpha \sum_{i \in A_t} w_i c_i, \qquad
    \theta_{t+1} = T(\hat S_{t+1}),

where:

- :math:`A_t` is the set of active clients, :math:`q_i` the probability that
  client :math:`i` is active;
- :math:`\bar S_i(\theta)` is client :math:`i`'s mean statistic on a batch of
  its rows; :math:`w_i` its weight (:math:`\sum_i w_i = 1`);
- :math:`Q` is an unbiased compressor, :math:`\alpha` the control-variate
  rate (``cv_rate``), :math:`\gamma_t` the step size;
- :math:`\Pi` is the problem's ``project`` and :math:`T` its ``minimize``.

The same loop runs the parameter-averaging baseline
(``aggregation="parameter"``): each active client runs ``local_steps`` MM
steps on its own rows from :math:`\theta_t` and sends
:math:`Q(\theta_i - \theta_t)`; the server sets
:math:`\theta_{t+1} = P(\theta_t + \sum_{i\in A_t} \frac{w_i}{q_i}
Q(\theta_i - \theta_t))`, with :math:`P` the problem's ``project_parameter``.

References
----------
.. [1] A. Dieuleveut, G. Fort, M. Hegazy, H.-T. Wai. Federated
   Majorize-Minimization: Beyond Parameter Aggregation. arXiv:2507.17534,
   2025.
.. [2] A. Dieuleveut, G. Fort, E. Moulines, G. Robin. Federated-EM with
   heterogeneity mitigation and variance reduction. NeurIPS 2021.
"""

import contextlib
import copy
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
from joblib import Parallel, delayed

from .compression import make_compressor

__all__ = [
    "ClientFailureWarning",
    "FedMM",
    "FedMMState",
    "History",
    "PolynomialDecay",
    "aggregate",
]


class ClientFailureWarning(UserWarning):
    """A client's computation raised; it was treated as not participating."""


# --------------------------------------------------------------------------
# Statistic layout: named arrays <-> one flat vector
# --------------------------------------------------------------------------
class _Layout:
    """Flattens a dict of arrays into one vector and back."""

    def __init__(self, stat):
        if not isinstance(stat, dict) or not stat:
            raise TypeError(
                "A problem's statistic must be a non-empty dict of arrays, got "
                f"{type(stat).__name__}."
            )
        self.names = list(stat)
        self.shapes = [np.shape(stat[k]) for k in self.names]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.size = sum(self.sizes)

    def flatten(self, stat, dtype):
        out = np.empty(self.size, dtype=dtype)
        start = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            value = np.asarray(stat[name])
            if value.shape != shape:
                raise ValueError(
                    f"Statistic {name!r} has shape {value.shape}, expected {shape}."
                )
            out[start : start + size] = value.ravel()
            start += size
        return out

    def unflatten(self, flat):
        out, start = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = flat[start : start + size].reshape(shape)
            start += size
        return out


# --------------------------------------------------------------------------
# Pure aggregation functions (kept apart from the round logic)
# --------------------------------------------------------------------------
def aggregate(messages, weights, out=None):
    """Weighted sum of client messages, in the order given.

    Parameters
    ----------
    messages : sequence of ndarray of shape (d,)
    weights : sequence of float
    out : ndarray of shape (d,), default=None
        Accumulator to add to (modified in place); zeros when None.

    Returns
    -------
    total : ndarray of shape (d,)
        ``out + sum_k weights[k] * messages[k]``, summed in order so that the
        result does not depend on how clients were scheduled.
    """
    if out is None:
        out = np.zeros_like(messages[0])
    for msg, w in zip(messages, weights):
        out += w * msg
    return out


# --------------------------------------------------------------------------
# Step sizes
# --------------------------------------------------------------------------
class PolynomialDecay:
    r"""Step-size schedule :math:`\gamma_t = \gamma_0 / (t + 1)^a`.

    With :math:`1/2 < a \le 1` this is a stochastic-approximation schedule,
    needed for exact convergence under minibatch noise.

    Parameters
    ----------
    gamma0 : float, default=1.0
        Initial step size, in (0, 1].
    power : float, default=0.6
        Decay exponent :math:`a`.
    """

    def __init__(self, gamma0=1.0, power=0.6):
        self.gamma0 = gamma0
        self.power = power

    def __call__(self, t):
        return self.gamma0 / (t + 1) ** self.power

    def __repr__(self):
        return f"PolynomialDecay(gamma0={self.gamma0!r}, power={self.power!r})"

    def __eq__(self, other):
        return isinstance(other, PolynomialDecay) and vars(self) == vars(other)

    def __hash__(self):
        return hash((self.gamma0, self.power))


def auto_step_size(omega, q):
    r"""The step size of ``step_size="auto"``.

    .. math::

        \gamma = \frac{1}{1 + \omega + (1 - q) / (4 q)},

    where :math:`\omega` is the compressor's variance constant and
    :math:`q` the probability that a client takes part in a round: 1 for
    exact rounds (then FedMM is batch MM), smaller as compression and
    partial participation add variance to the server update (control
    variates make the participation term smaller than the compression
    one). ``benchmarks/bench_step_size.py`` compares it with a grid of
    constants on the dictionary-learning benchmark.

    Parameters
    ----------
    omega : float
    q : float in (0, 1]

    Returns
    -------
    gamma : float in (0, 1]
    """
    return 1.0 / (1.0 + omega + (1.0 - q) / (4.0 * q))


def _step_schedule(step_size, omega, q):
    if isinstance(step_size, str):
        if step_size != "auto":
            raise ValueError(f"step_size must be 'auto', a float or a callable, got {step_size!r}.")
        gamma = auto_step_size(omega, q)
        return lambda t: gamma
    if callable(step_size):
        return step_size
    if isinstance(step_size, Real) and not isinstance(step_size, bool):
        if not 0 < step_size <= 1:
            raise ValueError(f"A constant step_size must be in (0, 1], got {step_size!r}.")
        gamma = float(step_size)
        return lambda t: gamma
    raise TypeError(f"step_size must be 'auto', a float or a callable, got {step_size!r}.")


# --------------------------------------------------------------------------
# History
# --------------------------------------------------------------------------
_HISTORY_FIELDS = (
    "objective",
    "full_objective",
    "mean_field",
    "param_change",
    "stat_change",
    "step_size",
    "bits_up",
    "bits_down",
    "n_active",
    "time",
)


@dataclass
class History:
    """Per-round record of a FedMM fit (design section 6).

    Row 0 is the initialization (the init statistic and, for surrogate
    aggregation, the initial full round); row ``t`` is round ``t``.

    Attributes
    ----------
    objective : ndarray
        Weighted mean of the losses the active clients report at
        :math:`\\theta_t` (NaN when no client reported).
    full_objective : ndarray
        Exact :math:`W(\\theta_t)` on all rows of all clients, when evaluated
        (batch rounds, or every ``eval_every`` rounds); NaN otherwise.
    mean_field : ndarray
        :math:`\\|H_t\\|_1`, the estimate of :math:`\\bar S(\\theta_t) - \\hat
        S_t` (zero at a fixed point); NaN for parameter aggregation.
    param_change : ndarray
        :math:`\\|\\theta_{t+1} - \\theta_t\\|_2`.
    stat_change : ndarray
        :math:`\\|\\hat S_{t+1} - \\hat S_t\\|_2` (NaN for parameter
        aggregation).
    step_size : ndarray
        :math:`\\gamma_t`.
    bits_up, bits_down : ndarray
        Bits sent by the clients to the server and by the server to the
        clients during the round.
    n_active : ndarray
        Number of clients that took part.
    time : ndarray
        Wall-clock seconds since the start of the fit, at the end of the round.
    failed : list of list of (int, str)
        Per round, the clients that failed and the exception type.
    """

    objective: list = field(default_factory=list)
    full_objective: list = field(default_factory=list)
    mean_field: list = field(default_factory=list)
    param_change: list = field(default_factory=list)
    stat_change: list = field(default_factory=list)
    step_size: list = field(default_factory=list)
    bits_up: list = field(default_factory=list)
    bits_down: list = field(default_factory=list)
    n_active: list = field(default_factory=list)
    time: list = field(default_factory=list)
    failed: list = field(default_factory=list)

    def _append(self, **row):
        for name in _HISTORY_FIELDS:
            getattr(self, name).append(row.get(name, np.nan))
        self.failed.append(row.get("failed", []))

    def as_dict(self):
        """The history as a dict of NumPy arrays (``failed`` as a list)."""
        out = {name: np.asarray(getattr(self, name), dtype=float) for name in _HISTORY_FIELDS}
        out["failed"] = list(self.failed)
        return out

    def __getitem__(self, name):
        if name == "failed":
            return list(self.failed)
        return np.asarray(getattr(self, name), dtype=float)

    def __len__(self):
        return len(self.objective)

    def keys(self):
        return list(_HISTORY_FIELDS) + ["failed"]


# --------------------------------------------------------------------------
# Client side (module-level functions: they are sent to joblib workers)
# --------------------------------------------------------------------------
_CONTROLLER = None


class _ClientContext:
    """Context of all client work.

    Pins BLAS to one thread when several clients may run at once (so that
    results do not depend on ``n_jobs``), and silences floating-point
    warnings: the server checks every message for finiteness instead and
    raises one clear error naming the client.
    """

    def __init__(self, pin):
        self.pin = pin

    def __enter__(self):
        global _CONTROLLER
        self._limit = None
        if self.pin:
            if _CONTROLLER is None:
                from threadpoolctl import ThreadpoolController

                _CONTROLLER = ThreadpoolController()
            self._limit = _CONTROLLER.limit(limits=1, user_api="blas")
        self._err = np.errstate(all="ignore")
        self._err.__enter__()
        return self

    def __exit__(self, *exc):
        self._err.__exit__(*exc)
        if self._limit is not None:
            self._limit.__exit__(*exc)
        return False


def _check_message(value, client, what, round_index):
    """Server-side check: a client's message must be finite."""
    if not np.all(np.isfinite(value)):
        raise ValueError(
            f"client {client} sent a non-finite {what} at round {round_index} (overflow "
            "or NaN in its local computation): check the scale of its data."
        )


@dataclass
class ClientState:
    """What a client keeps between rounds.

    Attributes
    ----------
    cv : ndarray or None
        The control variate :math:`V_i` (flat statistic), None before the
        initial round and in parameter aggregation.
    rng : numpy.random.Generator
        The client's stream (minibatches, compression, local M-steps).
    log_scale : ndarray or None
        Cumulative log-coordinate of ``cv`` for problems with
        :meth:`MMProblem.rescale`.
    """

    cv: object
    rng: object
    log_scale: object = None


@dataclass
class ClientMessage:
    """What a client sends to the server in one round.

    Attributes
    ----------
    payload : ndarray of shape (d,)
        The compressed message (:math:`c_i`, or the compressed parameter
        change for parameter aggregation).
    bits : int
        Exact size of the encoded payload.
    loss : float
        Mean loss on the client's batch at the broadcast parameter.
    """

    payload: object
    bits: int
    loss: float


def _draw_batch(X, batch_size, rng):
    n = X.shape[0]
    if batch_size is None or batch_size >= n:
        return X
    rows = np.sort(rng.choice(n, size=batch_size, replace=False))
    return X[rows]


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


def _guarded(task, *args, timeout=None):
    """Run a client task; an exception makes the client absent, not the fit.

    With a ``timeout`` (seconds) the task runs in a helper thread and a
    client that has not answered in time is absent too (``TimeoutError``).
    Python cannot stop that thread: it finishes in the background and its
    result is discarded (it works on copies, so it changes nothing).
    """
    try:
        if timeout is None:
            return task(*args)
        from concurrent.futures import ThreadPoolExecutor
        from concurrent.futures import TimeoutError as FutureTimeout

        executor = ThreadPoolExecutor(max_workers=1)
        try:
            return executor.submit(task, *args).result(timeout=timeout)
        except FutureTimeout:
            exc = TimeoutError(f"no answer within client_timeout={timeout} s")
            return ClientFailure("TimeoutError", str(exc), exc)
        finally:
            executor.shutdown(wait=False)
    except Exception as exc:  # noqa: BLE001 - any client error is a failure
        return ClientFailure(type(exc).__name__, str(exc), exc)


def _client_init(problem, X, pin):
    """Initialization messages: the init statistic (or None)."""
    with _ClientContext(pin):
        return problem.init_statistic(_aligned(X))


def _client_full(problem, X, theta, pin):
    """Uncompressed statistic and loss on all rows (initial full round)."""
    with _ClientContext(pin):
        return problem.local_statistic(_aligned(X), _aligned(theta))


def _client_loss(problem, X, theta, pin):
    with _ClientContext(pin):
        return problem.loss(_aligned(X), _aligned(theta))


def _client_surrogate(problem, X, state, theta, s_hat, log_scale, cfg):
    """One surrogate-aggregation round on one client."""
    with _ClientContext(cfg["pin"]):
        # a private copy: a failed round leaves the client's stream untouched
        rng = copy.deepcopy(state.rng)
        X, theta, s_hat, cv = (_aligned(a) for a in (X, theta, s_hat, state.cv))
        if log_scale is not None and not np.array_equal(log_scale, state.log_scale):
            cv = cv * np.exp(log_scale - state.log_scale).astype(cv.dtype, copy=False)
        batch = _draw_batch(X, cfg["batch_size"], rng)
        stat, loss = problem.local_statistic(batch, theta)
        s_i = cfg["layout"].flatten(stat, s_hat.dtype)
        delta = s_i - s_hat - cv
        payload, bits = cfg["compressor"].compress(delta, rng)
        new_cv = cv + cfg["cv_rate"] * payload if cfg["cv_rate"] != 0 else cv
        new_state = ClientState(cv=new_cv, rng=rng, log_scale=log_scale)
        return ClientMessage(payload=payload, bits=int(bits), loss=float(loss)), new_state


def _client_parameter(problem, X, state, theta, cfg):
    """One parameter-aggregation round: local MM steps, send the change."""
    with _ClientContext(cfg["pin"]):
        rng = copy.deepcopy(state.rng)
        X, theta = _aligned(X), _aligned(theta)
        local = theta
        loss = np.nan
        for k in range(cfg["local_steps"]):
            batch = _draw_batch(X, cfg["batch_size"], rng)
            stat, batch_loss = problem.local_statistic(batch, local)
            if k == 0:
                loss = batch_loss
            local = np.asarray(problem.minimize(stat, local, rng), dtype=theta.dtype)
        delta = np.asarray(local - theta).ravel()
        payload, bits = cfg["compressor"].compress(delta, rng)
        new_state = ClientState(cv=None, rng=rng)
        return ClientMessage(payload=payload, bits=int(bits), loss=float(loss)), new_state


class _Placed:
    """Client data placed on remote workers, with its metadata kept here."""

    def __init__(self, futures, arrays):
        self.futures = futures
        self.shapes = [X.shape for X in arrays]

    def __len__(self):
        return len(self.futures)

    def __getitem__(self, i):
        return self.futures[i]


def _place_clients(clients, n_jobs, stack):
    """Put the clients' rows where the workers read them, once per fit.

    - Dask (joblib's ``"dask"`` backend): each client's array is scattered
      to one worker (not broadcast) and replaced by its future; Dask runs
      that client's tasks where its rows live.
    - Process-based backends (loky, multiprocessing) with several workers:
      each array is written once to a memory-mapped ``.npy`` file in a
      temporary folder, and tasks carry only its path; workers map it
      read-only (and cache the mapping).
    - Sequential and thread-based runs use the arrays themselves.

    Every round then ships only parameters, statistics and client state.
    """
    from joblib import effective_n_jobs
    from joblib.parallel import get_active_backend

    backend, _ = get_active_backend()
    name = type(backend).__name__
    client = _dask_client()
    if client is not None:
        return _Placed(client.scatter([_AlignedRows(X) for X in clients], hash=False), clients)
    if name in ("LokyBackend", "MultiprocessingBackend") and effective_n_jobs(n_jobs) > 1:
        import tempfile

        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="skfedmm-"))
        handles = []
        for i, X in enumerate(clients):
            path = os.path.join(folder, f"client{i}.npy")
            np.save(path, X)
            handles.append(_MappedRows(path))
        return _Placed(handles, clients)
    return clients


def _dask_client():
    """The Dask client of joblib's active ``"dask"`` backend, or None."""
    from joblib.parallel import get_active_backend

    backend, _ = get_active_backend()
    if type(backend).__name__ == "DaskDistributedBackend":
        return getattr(backend, "client", None)
    return None


class _MappedRows:
    """A client's rows in a ``.npy`` file; unpickles as a read-only memmap."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _load_rows, (self.path,)


_MAPPED = {}


def _load_rows(path):
    rows = _MAPPED.get(path)
    if rows is None:
        # forget the mappings of finished fits (their folders are gone)
        for old in [p for p in _MAPPED if not os.path.exists(p)]:
            del _MAPPED[old]
        rows = _MAPPED[path] = np.load(path, mmap_mode="r")
    return rows


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


def _n_rows(clients, i):
    return clients.shapes[i][0] if isinstance(clients, _Placed) else clients[i].shape[0]


def _split_answers(indices, results):
    """Separate answers from failures, keeping client-index order."""
    answered, failures = [], []
    for i, res in zip(indices, results):
        if isinstance(res, ClientFailure):
            failures.append((int(i), res))
        else:
            answered.append((int(i), res))
    return answered, failures


# --------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------
@dataclass
class FedMMState:
    """Complete state of a FedMM run (server and simulated clients).

    Attributes
    ----------
    theta : ndarray
        Current parameter :math:`\\theta_t`.
    s_hat : ndarray or None
        Server statistic :math:`\\hat S_t` (flat).
    cv : ndarray or None
        Aggregate control variate :math:`V_t` (flat).
    log_scale : ndarray or None
        Cumulative log-coordinates (problems with ``rescale`` only).
    clients : list of ClientState
    server_rng : numpy.random.Generator
        The server's participation stream (only participation draws, so
        that runs differing in anything else see the same participants).
    mstep_rng : numpy.random.Generator
        The server's stream for the initialization and the M-steps.
    round : int
        Number of rounds run after initialization.
    history : History
    """

    theta: object
    s_hat: object
    cv: object
    log_scale: object
    clients: list
    server_rng: object
    round: int
    history: History
    weights: object
    layout: object = None
    mstep_rng: object = None


def _check_participation(participation, scheme):
    if (
        not isinstance(participation, Real)
        or isinstance(participation, bool)
        or not 0 < participation <= 1
    ):
        raise ValueError(f"participation must be a float in (0, 1], got {participation!r}.")
    if scheme not in ("bernoulli", "fixed"):
        raise ValueError(
            f"participation_scheme must be 'bernoulli' or 'fixed', got {scheme!r}."
        )


def client_weights(n_rows, client_weights="proportional"):
    """Normalized client weights :math:`w_i`.

    Parameters
    ----------
    n_rows : sequence of int
        Number of rows of each client.
    client_weights : {"proportional", "uniform"} or array-like of shape (n_clients,)
        ``"proportional"``: :math:`w_i = n_i / \\sum_j n_j`; ``"uniform"``:
        :math:`1/n`; an array: nonnegative weights, normalized to sum to 1.

    Returns
    -------
    weights : ndarray of shape (n_clients,)
    """
    n_rows = np.asarray(n_rows, dtype=float)
    if isinstance(client_weights, str):
        if client_weights == "proportional":
            return n_rows / n_rows.sum()
        if client_weights == "uniform":
            return np.full(len(n_rows), 1.0 / len(n_rows))
        raise ValueError(
            "client_weights must be 'proportional', 'uniform' or an array, got "
            f"{client_weights!r}."
        )
    w = np.asarray(client_weights, dtype=float)
    if w.shape != n_rows.shape:
        raise ValueError(
            f"client_weights has {w.size} entries for {n_rows.size} clients."
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("client_weights must be finite, nonnegative and not all zero.")
    return w / w.sum()


class FedMM:
    """The FedMM engine: runs an :class:`~skfedmm.problems.MMProblem` on clients.

    Parameters
    ----------
    problem : MMProblem
        The MM problem.
    aggregation : {"surrogate", "parameter"}, default="surrogate"
        Aggregate surrogate statistics (FedMM) or parameters (baseline).
    participation : float in (0, 1], default=1.0
        Probability that a client takes part in a round (``"bernoulli"``), or
        fraction of clients drawn each round (``"fixed"``:
        ``ceil(participation * n_clients)`` clients without replacement).
    participation_scheme : {"bernoulli", "fixed"}, default="bernoulli"
    compression : None, str, (str, dict) or Compressor, default=None
        See :func:`skfedmm.compression.make_compressor`.
    step_size : "auto", float or callable, default="auto"
        :math:`\\gamma_t`: a constant in (0, 1], a callable of the round index
        ``t`` (from 0), e.g. :class:`PolynomialDecay`. ``"auto"``:
        :func:`auto_step_size`, 1 when there is no compression and full
        participation (then FedMM with full batches is batch MM).
    cv_rate : "auto" or float, default="auto"
        Control-variate rate :math:`\\alpha`; 0 disables control variates.
        ``"auto"``: :math:`1 / (1 + \\omega)`.
    batch_size : int or None, default=None
        Rows each active client draws per round; None uses all its rows.
    local_steps : int, default=1
        Local MM steps per round in parameter aggregation.
    client_weights : {"proportional", "uniform"} or array-like, default="proportional"
    max_iter : int, default=100
        Number of rounds after the initialization.
    tol : float, default=0.0
        Stopping tolerance; see ``convergence``.
    convergence : {"objective", "mean_field"}, default="objective"
        ``"objective"``: stop when the exact objective decreases by less than
        ``tol`` times its value between two evaluated rounds (as
        scikit-learn's DictionaryLearning). ``"mean_field"``: stop when
        :math:`\\|H_t\\|_1 \\le` ``tol`` (surrogate aggregation).
    eval_every : int or None, default=None
        Evaluate the exact objective on all rows every ``eval_every`` rounds
        (it is free, and always done, in exact rounds).
    n_jobs : int or None, default=None
        Clients run in parallel through joblib; the backend is whatever
        :func:`joblib.parallel_config` selects.
    random_state : int, RandomState, Generator or None, default=None
    verbose : int, default=0
    callback : callable or None, default=None
        Called after each round with a dict (``round``, ``theta``,
        ``history``); returning True stops the fit.
    min_clients : int, default=1
        A client whose computation raises is treated as not participating
        in that round (its control variate is unchanged; the failure is
        recorded in the history and warned about once per fit). A round in
        which fewer than ``min(min_clients, n_sampled)`` clients answer
        raises instead of updating from too little.
    client_timeout : float or None, default=None
        Seconds a client may take in a round; a client that has not answered
        by then is treated as failed (``TimeoutError``). None waits forever.
        The timed-out computation cannot be stopped: it finishes in the
        background and is discarded. Results then depend on timing.
    """

    def __init__(
        self,
        problem,
        *,
        aggregation="surrogate",
        participation=1.0,
        participation_scheme="bernoulli",
        compression=None,
        step_size="auto",
        cv_rate="auto",
        batch_size=None,
        local_steps=1,
        client_weights="proportional",
        max_iter=100,
        tol=0.0,
        convergence="objective",
        eval_every=None,
        n_jobs=None,
        random_state=None,
        verbose=0,
        callback=None,
        min_clients=1,
        client_timeout=None,
    ):
        self.problem = problem
        self.aggregation = aggregation
        self.participation = participation
        self.participation_scheme = participation_scheme
        self.compression = compression
        self.step_size = step_size
        self.cv_rate = cv_rate
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.client_weights = client_weights
        self.max_iter = max_iter
        self.tol = tol
        self.convergence = convergence
        self.eval_every = eval_every
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose
        self.callback = callback
        self.min_clients = min_clients
        self.client_timeout = client_timeout

    # ---------------------------------------------------------------- checks
    def _validate(self, clients):
        if self.aggregation not in ("surrogate", "parameter"):
            raise ValueError(
                f"aggregation must be 'surrogate' or 'parameter', got {self.aggregation!r}."
            )
        _check_participation(self.participation, self.participation_scheme)
        if self.batch_size is not None and (
            not isinstance(self.batch_size, Integral)
            or isinstance(self.batch_size, bool)
            or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be None or an integer >= 1, got {self.batch_size!r}.")
        if (
            not isinstance(self.local_steps, Integral)
            or isinstance(self.local_steps, bool)
            or self.local_steps < 1
        ):
            raise ValueError(f"local_steps must be an integer >= 1, got {self.local_steps!r}.")
        if not isinstance(self.max_iter, Integral) or self.max_iter < 0:
            raise ValueError(f"max_iter must be an integer >= 0, got {self.max_iter!r}.")
        if not isinstance(self.tol, Real) or self.tol < 0:
            raise ValueError(f"tol must be a float >= 0, got {self.tol!r}.")
        if self.convergence not in ("objective", "mean_field"):
            raise ValueError(
                f"convergence must be 'objective' or 'mean_field', got {self.convergence!r}."
            )
        if self.eval_every is not None and (
            not isinstance(self.eval_every, Integral) or self.eval_every < 1
        ):
            raise ValueError(f"eval_every must be None or an integer >= 1, got {self.eval_every!r}.")
        compressor = make_compressor(self.compression)
        if not (
            isinstance(self.cv_rate, str)
            and self.cv_rate == "auto"
            or isinstance(self.cv_rate, Real)
            and not isinstance(self.cv_rate, bool)
            and 0 <= self.cv_rate <= 1
        ):
            raise ValueError(f"cv_rate must be 'auto' or a float in [0, 1], got {self.cv_rate!r}.")
        if len(clients) == 0:
            raise ValueError("At least one client is needed.")
        if (
            not isinstance(self.min_clients, Integral)
            or isinstance(self.min_clients, bool)
            or self.min_clients < 1
        ):
            raise ValueError(f"min_clients must be an integer >= 1, got {self.min_clients!r}.")
        if self.client_timeout is not None and (
            not isinstance(self.client_timeout, Real)
            or isinstance(self.client_timeout, bool)
            or not self.client_timeout > 0
        ):
            raise ValueError(
                f"client_timeout must be None or a number of seconds > 0, got {self.client_timeout!r}."
            )
        weights = client_weights([X.shape[0] for X in clients], self.client_weights)
        exact = (
            self.participation == 1
            and compressor.omega(2) == 0
            and (self.batch_size is None or self.batch_size >= max(X.shape[0] for X in clients))
        )
        _step_schedule(self.step_size, 0.0, 1.0)  # validate early
        return compressor, weights, exact

    def _streams(self):
        from sklearn.utils import check_random_state

        rs = self.random_state
        if isinstance(rs, np.random.Generator):
            entropy = int(rs.integers(2**63))
        else:
            entropy = int(check_random_state(rs).randint(np.iinfo(np.int32).max))
        return np.random.SeedSequence(entropy)

    # ------------------------------------------------------------ main API
    def fit(self, clients, state=None, max_iter=None):
        """Run FedMM on the clients.

        Parameters
        ----------
        clients : list of ndarray of shape (n_i, n_features)
            Validated client datasets (all of one floating dtype).
        state : FedMMState, default=None
            A state to continue from: the server statistic, every client's
            control variate and stream, the round counter and the history.
            Continuing a run for ``k`` more rounds gives bitwise the model of
            one run of the same total length. A new run when None.
        max_iter : int, default=None
            Rounds to run in this call; ``self.max_iter`` when None.

        Returns
        -------
        state : FedMMState
            The final state; ``state.theta`` is the fitted parameter and
            ``state.history`` the per-round record.
        """
        compressor, weights, exact = self._validate(clients)
        max_iter = self.max_iter if max_iter is None else max_iter
        n = len(clients)
        dtype = clients[0].dtype
        problem = self.problem
        pin = n > 1
        if state is not None:
            if len(state.clients) != n:
                raise ValueError(
                    f"Cannot continue a run of {len(state.clients)} clients with {n} clients."
                )
            weights = state.weights
        with contextlib.ExitStack() as stack:
            # one task per client on Dask, so that each runs where its rows are
            # (joblib's automatic batching would group clients of different
            # workers into one task and move their rows every round)
            batch_size = 1 if _dask_client() is not None else "auto"
            parallel = stack.enter_context(Parallel(n_jobs=self.n_jobs, batch_size=batch_size))
            # the rows go where the workers read them once, here
            clients = _place_clients(clients, self.n_jobs, stack)
            warned = [False]
            t0 = time.perf_counter()
            if state is None:
                state = self._initialize(parallel, clients, weights, dtype, pin, t0, warned)
            else:
                t0 -= state.history.time[-1]
            d = state.layout.size
            omega = compressor.omega(d if self.aggregation == "surrogate" else state.theta.size)
            cv_rate = 1.0 / (1.0 + omega) if self.cv_rate == "auto" else float(self.cv_rate)
            if self.participation_scheme == "fixed":
                m = min(n, math.ceil(self.participation * n))
                q = np.full(n, m / n)
            else:
                m = None
                q = np.full(n, float(self.participation))
            schedule = _step_schedule(self.step_size, omega, float(q[0]))
            cfg = dict(
                batch_size=self.batch_size,
                layout=state.layout,
                compressor=compressor,
                cv_rate=cv_rate,
                local_steps=self.local_steps,
                pin=pin,
            )
            progress = _Progress(self.verbose, max_iter)
            for _ in range(max_iter):
                t = state.round
                rng = state.server_rng
                if m is None:
                    active = np.flatnonzero(rng.random(n) < self.participation)
                else:
                    active = np.sort(rng.choice(n, size=m, replace=False))
                gamma = float(schedule(t))
                if not (np.isfinite(gamma) and 0 < gamma <= 1):
                    raise ValueError(f"step_size gave gamma={gamma!r} at round {t}; it must be in (0, 1].")
                evaluate = exact or (self.eval_every is not None and (t + 1) % self.eval_every == 0)
                row = self._round(
                    parallel, problem, clients, state, active, weights, q, gamma, cv_rate, cfg,
                    evaluate, warned,
                )
                state.round += 1
                row["time"] = time.perf_counter() - t0
                state.history._append(**row)
                progress.update(state)
                stop = False
                if self.callback is not None:
                    stop = bool(
                        self.callback({"round": state.round, "theta": state.theta, "history": state.history})
                    )
                if stop or self._converged(state.history):
                    break
            progress.close()
        return state

    def _converged(self, history):
        if self.tol <= 0:
            return False
        if self.convergence == "mean_field":
            # (a round where no client answered has H = V, which says nothing)
            return bool(history.n_active[-1] > 0 and history.mean_field[-1] <= self.tol)
        full = history.full_objective
        if len(full) < 2 or not (np.isfinite(full[-1]) and np.isfinite(full[-2])):
            return False
        return bool(full[-2] - full[-1] < self.tol * full[-1])

    # ------------------------------------------------------------ failures
    def _answers(self, indices, results, round_index, warned, needed=None):
        """Answers of the clients that did not fail; warn once, check the count."""
        answered, failures = _split_answers(indices, results)
        if failures and not warned[0]:
            i, f = failures[0]
            warnings.warn(
                f"client {i} failed at round {round_index} ({f.error}: {f.message}); failed "
                "clients are treated as not participating in that round. Further failures "
                "in this fit are recorded in history_.failed without a warning.",
                ClientFailureWarning,
                stacklevel=4,
            )
            warned[0] = True
        needed = min(self.min_clients, len(indices)) if needed is None else needed
        if len(answered) < needed:
            i, f = failures[0]
            msg = (
                f"round {round_index}: {len(answered)} of {len(indices)} clients answered, "
                f"fewer than min_clients={self.min_clients}; client {i} failed with "
                f"{f.error}: {f.message}"
            )
            try:
                error = type(f.exception)(msg)
            except Exception:  # noqa: BLE001 - exotic exception signatures
                error = RuntimeError(msg)
            raise error from f.exception
        return answered, [(i, f.error) for i, f in failures]

    # -------------------------------------------------------------- rounds
    def _initialize(self, parallel, clients, weights, dtype, pin, t0, warned):
        problem = self.problem
        n = len(clients)
        seeds = self._streams().spawn(n + 2)
        server_rng = np.random.default_rng(seeds[0])
        init_rng = np.random.default_rng(seeds[1])
        client_rngs = [np.random.default_rng(s) for s in seeds[2:]]
        itemsize = np.dtype(dtype).itemsize
        bits_up = 0
        failed = []
        results = parallel(
            delayed(_guarded)(_client_init, problem, X, pin, timeout=self.client_timeout)
            for X in clients
        )
        answered, fails = self._answers(range(n), results, 0, warned, needed=1)
        failed += fails
        agg_init = None
        if answered[0][1] is not None:
            init_layout = _Layout(answered[0][1])
            idx = [i for i, _ in answered]
            flat = [init_layout.flatten(s, dtype) for _, s in answered]
            for i, f in zip(idx, flat):
                _check_message(f, i, "initialization statistic", 0)
            bits_up += len(idx) * init_layout.size * 8 * itemsize
            w = weights[idx] / weights[idx].sum()
            agg_init = init_layout.unflatten(aggregate(flat, w))
        theta0 = np.asarray(problem.init_parameter(agg_init, init_rng), dtype=dtype)
        theta_bits = theta0.size * 8 * itemsize
        bits_down = n * theta_bits
        history = History()
        if self.aggregation == "parameter":
            # The baseline needs no statistic: only theta0 is broadcast.
            history._append(
                bits_up=bits_up, bits_down=bits_down, n_active=n, failed=failed,
                time=time.perf_counter() - t0,
            )
            return FedMMState(
                theta=theta0, s_hat=None, cv=None, log_scale=None,
                clients=[ClientState(cv=None, rng=r) for r in client_rngs],
                server_rng=server_rng, round=0, history=history, weights=weights,
                layout=_Layout({"theta": theta0}), mstep_rng=init_rng,
            )
        results = parallel(
            delayed(_guarded)(_client_full, problem, X, theta0, pin, timeout=self.client_timeout)
            for X in clients
        )
        answered, fails = self._answers(range(n), results, 0, warned, needed=1)
        failed += fails
        idx = [i for i, _ in answered]
        layout = _Layout(answered[0][1][0])
        stats = [layout.flatten(s, dtype) for _, (s, _) in answered]
        losses = np.array([loss for _, (_, loss) in answered], dtype=float)
        for i, f, loss in zip(idx, stats, losses):
            _check_message(f, i, "statistic", 0)
            _check_message(loss, i, "loss", 0)
        bits_up += len(idx) * (layout.size * 8 * itemsize + 64)
        w = weights[idx] / weights[idx].sum()
        s_agg = aggregate(stats, w)
        s_hat = layout.flatten(problem.project(layout.unflatten(s_agg)), dtype)
        use_cv = isinstance(self.cv_rate, str) or self.cv_rate != 0
        cvs = [np.zeros_like(s_hat) for _ in range(n)]
        if use_cv:  # (with cv_rate=0, the ablation, there are no control variates)
            # against the unprojected aggregate, so that sum_i w_i V_i = 0 = V
            for i, stat in zip(idx, stats):
                cvs[i] = stat - s_agg
        theta1 = np.asarray(problem.minimize(layout.unflatten(s_hat), theta0, init_rng), dtype=dtype)
        if not np.all(np.isfinite(theta1)):
            raise ValueError(
                "The initial server update produced a non-finite parameter; check the "
                "scale of the data."
            )
        factor = problem.rescale(layout.unflatten(s_hat), theta0, theta1)
        log_scale = None
        if factor is not None:
            factor = layout.flatten(factor, dtype)
            s_hat = s_hat * factor
            cvs = [c * factor for c in cvs]
            log_scale = np.zeros(layout.size)
        loss = float(np.dot(w, losses))
        history._append(
            objective=loss, full_objective=loss if len(idx) == n else np.nan,
            param_change=float(np.linalg.norm(theta1 - theta0)),
            bits_up=bits_up, bits_down=bits_down, n_active=len(idx), failed=failed,
            time=time.perf_counter() - t0,
        )
        return FedMMState(
            theta=theta1, s_hat=s_hat, cv=np.zeros_like(s_hat), log_scale=log_scale,
            clients=[
                ClientState(cv=c, rng=r, log_scale=None if log_scale is None else log_scale.copy())
                for c, r in zip(cvs, client_rngs)
            ],
            server_rng=server_rng, round=0, history=history, weights=weights, layout=layout,
            mstep_rng=init_rng,
        )

    def _round(self, parallel, problem, clients, state, active, weights, q, gamma, cv_rate, cfg,
               evaluate, warned):
        theta = state.theta
        round_index = state.round + 1
        theta_bits = theta.size * 8 * theta.dtype.itemsize
        if self.aggregation == "surrogate":
            task = _client_surrogate
            tasks = (
                delayed(_guarded)(
                    task, problem, clients[i], state.clients[i], theta, state.s_hat,
                    state.log_scale, cfg, timeout=self.client_timeout,
                )
                for i in active
            )
        else:
            tasks = (
                delayed(_guarded)(
                    _client_parameter, problem, clients[i], state.clients[i], theta, cfg,
                    timeout=self.client_timeout,
                )
                for i in active
            )
        results = parallel(tasks) if len(active) else []
        answered, failed = self._answers(active, results, round_index, warned)
        idx = np.array([i for i, _ in answered], dtype=int)
        messages = [msg for _, (msg, _) in answered]
        for i, msg in zip(idx, messages):
            _check_message(msg.payload, i, "message", round_index)
            _check_message(msg.loss, i, "loss", round_index)
        for i, (_, new_state) in answered:
            state.clients[i] = new_state
        bits_up = sum(m.bits for m in messages) + 64 * len(messages)
        w_ans = weights[idx]
        objective = (
            float(np.dot(w_ans, [m.loss for m in messages]) / w_ans.sum()) if len(idx) else np.nan
        )
        row = dict(objective=objective, n_active=len(idx), step_size=gamma, failed=failed)
        full_batch = self.batch_size is None or all(
            self.batch_size >= _n_rows(clients, i) for i in idx
        )
        if evaluate:
            if len(idx) == len(clients) and full_batch:
                row["full_objective"] = objective
            else:
                row["full_objective"] = self._full_loss(parallel, clients, theta, weights, cfg["pin"])
        payloads = [m.payload for m in messages]
        # Failed clients are absent: the answers stand for the whole sampled
        # weight, so that H keeps its scale (an exact correction when the
        # failures are independent of the messages).
        reweight = weights[active].sum() / w_ans.sum() if len(idx) else 0.0
        if self.aggregation == "surrogate":
            layout = state.layout
            row["bits_down"] = len(active) * (theta_bits + state.s_hat.size * 8 * state.s_hat.dtype.itemsize)
            H = state.cv.copy()
            if len(idx):
                H = aggregate(payloads, reweight * w_ans / q[idx], out=H)
            s_old = state.s_hat
            # S_hat + H estimates sbar(theta_t); project that estimate, then
            # move by gamma towards it (a convex combination of valid
            # statistics stays valid; exact rounds are unchanged).
            s_est = layout.flatten(problem.project(layout.unflatten(s_old + H)), s_old.dtype)
            s_new = s_old + gamma * (s_est - s_old)
            if cv_rate != 0 and len(idx):
                state.cv = aggregate(payloads, cv_rate * w_ans, out=state.cv.copy())
            theta_new = np.asarray(
                problem.minimize(layout.unflatten(s_new), theta, state.mstep_rng), dtype=theta.dtype
            )
            row["mean_field"] = float(np.abs(H).sum())
            row["stat_change"] = float(np.linalg.norm(s_new - s_old))
            factor = problem.rescale(layout.unflatten(s_new), theta, theta_new)
            if factor is not None:
                factor = layout.flatten(factor, s_new.dtype)
                s_new = s_new * factor
                state.log_scale = state.log_scale + np.log(factor)
                # The running sum V would carry its rounding error times the
                # cumulative factor, which can be huge; the server mirrors
                # every V_i (it receives each increment and knows the
                # factors), so it re-derives V = sum_i w_i V_i exactly.
                state.cv = aggregate(
                    [
                        c.cv * np.exp(state.log_scale - c.log_scale).astype(c.cv.dtype, copy=False)
                        for c in state.clients
                    ],
                    weights.astype(state.cv.dtype),
                ).astype(state.cv.dtype, copy=False)
            state.s_hat = s_new
        else:
            row["bits_down"] = len(active) * theta_bits
            if len(idx):
                step = aggregate(payloads, reweight * w_ans / q[idx])
                theta_new = np.asarray(
                    problem.project_parameter(theta + step.reshape(theta.shape).astype(theta.dtype)),
                    dtype=theta.dtype,
                )
            else:
                theta_new = theta
        if not np.all(np.isfinite(theta_new)):
            raise ValueError(
                f"The server update produced a non-finite parameter at round {round_index}; "
                "check the scale of the data and the step size."
            )
        row["param_change"] = float(np.linalg.norm(theta_new - theta))
        row["bits_up"] = bits_up
        state.theta = theta_new
        return row

    def _full_loss(self, parallel, clients, theta, weights, pin):
        results = parallel(
            delayed(_guarded)(_client_loss, self.problem, X, theta, pin, timeout=self.client_timeout)
            for X in clients
        )
        answered, _ = _split_answers(range(len(clients)), results)
        if len(answered) < len(clients):
            return np.nan  # not an exact evaluation
        return float(np.dot(weights, [loss for _, loss in answered]))

    def evaluate(self, clients, theta, weights=None):
        """Exact objective and aggregated statistic at ``theta``.

        Parameters
        ----------
        clients : list of ndarray
        theta : ndarray
        weights : ndarray of shape (n_clients,), default=None
            Client weights; from ``client_weights`` when None.

        Returns
        -------
        loss : float
            :math:`\\sum_i w_i f_i(\\theta)`.
        stat : dict of ndarray
            :math:`\\sum_i w_i \\bar S_i(\\theta)`.
        """
        if weights is None:
            weights = client_weights([X.shape[0] for X in clients], self.client_weights)
        pin = len(clients) > 1
        with Parallel(n_jobs=self.n_jobs) as parallel:
            results = parallel(delayed(_client_full)(self.problem, X, theta, pin) for X in clients)
        layout = _Layout(results[0][0])
        dtype = clients[0].dtype
        stat = aggregate([layout.flatten(s, dtype) for s, _ in results], weights)
        loss = float(np.dot(weights, [loss for _, loss in results]))
        return loss, layout.unflatten(stat)



class _Progress:
    """Per-round progress report: a tqdm bar when available, else lines."""

    def __init__(self, verbose, total):
        self.verbose = verbose
        self.bar = None
        if verbose:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="FedMM", leave=False)
            except ImportError:
                self.bar = None

    def update(self, state):
        if not self.verbose:
            return
        h = state.history
        bits = sum(h.bits_up) + sum(h.bits_down)
        info = dict(
            objective=f"{h.objective[-1]:.5g}",
            active=h.n_active[-1],
            Mbits=f"{bits / 1e6:.3g}",
        )
        if self.bar is not None:
            self.bar.set_postfix(info)
            self.bar.update(1)
        else:
            print(
                f"[FedMM] round {state.round:4d}  objective {info['objective']}  "
                f"active {info['active']}  bits {bits:.3e}  elapsed {h.time[-1]:.2f}s"
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()
