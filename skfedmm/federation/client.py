"""What runs at a client: the only code of a round that touches rows.

Each function here is one client's part of a round: draw its batch,
compute its statistic, form and compress its message, update its control
variate, advance its own random stream. The same functions run in this
process, in joblib's workers, on Dask workers and inside a deployed node,
so the fitted model does not depend on where clients run. They never see
another client's data, and what they return is all that leaves the client.
"""

import copy
from dataclasses import dataclass

import numpy as np

from .local import _aligned, _ClientContext

__all__ = ["ClientConfig", "ClientMessage", "ClientState", "CLIENT_TASKS"]


def _map_param(fn, theta):
    """Apply ``fn`` to a parameter's array(s), keeping its structure."""
    if isinstance(theta, dict):
        return {k: fn(v) for k, v in theta.items()}
    return fn(theta)


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
    cache : dict of ndarray or None
        The problem's client cache (:meth:`MMProblem.client_cache`, for
        example each row's last sparse code); it never leaves the client.
    """

    cv: object
    rng: object
    log_scale: object = None
    cache: object = None


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


def _draw_rows(n, batch_size, rng):
    """The sorted rows of a minibatch, or None for all ``n`` rows."""
    if batch_size is None or batch_size >= n:
        return None
    return np.sort(rng.choice(n, size=batch_size, replace=False))


def _draw_batch(X, batch_size, rng):
    rows = _draw_rows(X.shape[0], batch_size, rng)
    return X if rows is None else X[rows]


def _batch_statistic(problem, X, theta, cache, batch_size, rng):
    """Draw a batch; its statistic and loss, and the client's next cache.

    Problems without a client cache (:meth:`MMProblem.client_cache` returns
    None) get :meth:`MMProblem.local_statistic` on the batch; the others
    :meth:`MMProblem.cached_statistic` on all rows and the batch's indices.
    """
    if cache is None:
        make = getattr(problem, "client_cache", None)
        cache = make(X) if make is not None else None
    rows = _draw_rows(X.shape[0], batch_size, rng)
    if cache is None:
        stat, loss = problem.local_statistic(X if rows is None else X[rows], theta)
        return stat, loss, None
    return problem.cached_statistic(X, theta, cache, rows)


def _client_init(problem, X, pin, init=None):
    """Initialization messages: the init statistic (or None).

    ``init`` is the client's own initialization data (for example its rows'
    initial codes), when the fit was given some; it never leaves the client.
    """
    with _ClientContext(pin):
        if init is None:
            return problem.init_statistic(_aligned(X))
        return problem.init_statistic(_aligned(X), init)


def _client_full(problem, X, theta, pin):
    """Uncompressed statistic and loss on all rows (initial full round)."""
    with _ClientContext(pin):
        return problem.local_statistic(_aligned(X), _map_param(_aligned, theta))


def _client_loss(problem, X, theta, pin):
    with _ClientContext(pin):
        return problem.loss(_aligned(X), _map_param(_aligned, theta))


def _current_cv(cv, cv_log_scale, log_scale):
    """A control variate in the broadcast coordinates ``log_scale``."""
    if log_scale is not None and not np.array_equal(log_scale, cv_log_scale):
        cv = cv * np.exp(log_scale - cv_log_scale).astype(cv.dtype, copy=False)
    return cv


def _next_cv(cv, payload, cv_rate):
    """The control variate after sending ``payload`` (:math:`V_i + \\alpha c_i`).

    A deployment's server mirrors its clients' control variates with this
    function and :func:`_current_cv`, the very operations the client runs.
    """
    return cv + cv_rate * payload if cv_rate != 0 else cv


def _client_surrogate(problem, X, state, theta, s_hat, log_scale, cfg):
    """One surrogate-aggregation round on one client."""
    with _ClientContext(cfg.pin):
        # a private copy: a failed round leaves the client's stream untouched
        rng = copy.deepcopy(state.rng)
        X, s_hat, cv = (_aligned(a) for a in (X, s_hat, state.cv))
        theta = _map_param(_aligned, theta)
        cv = _current_cv(cv, state.log_scale, log_scale)
        stat, loss, cache = _batch_statistic(problem, X, theta, state.cache, cfg.batch_size, rng)
        s_i = cfg.layout.flatten(stat, s_hat.dtype)
        delta = s_i - s_hat - cv
        payload, bits = cfg.compressor.compress(delta, rng)
        new_state = ClientState(
            cv=_next_cv(cv, payload, cfg.cv_rate), rng=rng, log_scale=log_scale, cache=cache,
        )
        return ClientMessage(payload=payload, bits=int(bits), loss=float(loss)), new_state


def _client_parameter(problem, X, state, theta, cfg):
    """One parameter-aggregation round: local MM steps, send the change."""
    with _ClientContext(cfg.pin):
        rng = copy.deepcopy(state.rng)
        X, theta = _aligned(X), _map_param(_aligned, theta)
        param_layout = cfg.param_layout
        local = theta
        loss = np.nan
        cache = state.cache
        for k in range(cfg.local_steps):
            stat, batch_loss, cache = _batch_statistic(
                problem, X, local, cache, cfg.batch_size, rng
            )
            if k == 0:
                loss = batch_loss
            local = param_layout.cast(problem.minimize(stat, local, rng), cfg.dtype)
        delta = param_layout.flatten(local, cfg.dtype) - param_layout.flatten(theta, cfg.dtype)
        payload, bits = cfg.compressor.compress(delta, rng)
        new_state = ClientState(cv=None, rng=rng, cache=cache)
        return ClientMessage(payload=payload, bits=int(bits), loss=float(loss)), new_state


@dataclass(frozen=True)
class ClientConfig:
    """What every client needs to run a round; fixed for one ``fit`` call.

    Attributes
    ----------
    layout : object
        The statistic's layout.
    param_layout : object
        The parameter's layout.
    compressor : Compressor
    cv_rate : float
        The control-variate rate :math:`\\alpha`.
    batch_size : int or None
    local_steps : int
    dtype : numpy.dtype
        The dtype of the clients' rows and of the messages.
    pin : bool
        Limit BLAS to one thread in client work (several clients).
    """

    layout: object
    param_layout: object
    compressor: object
    cv_rate: float
    batch_size: object
    local_steps: int
    dtype: object
    pin: bool


#: The client's tasks by name: what a transport runs for the round loop.
CLIENT_TASKS = {
    "init": _client_init,
    "full": _client_full,
    "loss": _client_loss,
    "surrogate": _client_surrogate,
    "parameter": _client_parameter,
}
