"""What runs at a client: the only code of a round that touches rows.

Each function here is one client's part of a round: draw its batch,
compute its statistic, form and compress its message, update its control
variate, advance its own random stream. The same functions run in this
process, in joblib's workers, on Dask workers and inside a deployed node,
so the fitted model does not depend on where clients run. They never see
another client's data, and what they return is all that leaves the client.
"""

import copy
import zlib
from dataclasses import dataclass

import numpy as np

from ..compression import Identity
from .local import _aligned, _ClientContext

__all__ = ["ClientConfig", "ClientMessage", "ClientState", "CLIENT_TASKS"]

_SEED = np.random.SeedSequence(0)  # (streams made from it are overwritten at once)


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
        initial round and in parameter aggregation; SCAFFOLD's
        :math:`c_i` (flat parameter) with ``aggregation="scaffold"``.
    rng : numpy.random.Generator
        The client's stream (minibatches, compression, local M-steps).
    log_scale : ndarray or None
        Cumulative log-coordinate of ``cv`` for problems with
        :meth:`MMProblem.rescale`.
    cache : dict of ndarray or None
        The problem's client cache (:meth:`MMProblem.client_cache`, for
        example each row's last sparse code); it never leaves the client.
        While a fit runs on process or Dask workers, the fit's process
        holds a read-only mapping standing for it
        (:class:`~skfedmm.federation.caches.StoredCache`), the data staying
        where the client's rows are.
    """

    cv: object
    rng: object
    log_scale: object = None
    cache: object = None

    def __reduce__(self):
        # a Generator travels as its state: unpickled without drawing OS
        # entropy to seed a stream that is overwritten at once
        rng = self.rng
        if type(rng) is np.random.Generator:
            bit_generator = rng.bit_generator
            rng = (_stream, (type(bit_generator), bit_generator.state))
        return _client_state, (self.cv, rng, self.log_scale, self.cache)


class Unverified:
    """A client cache to check against the client's rows before use.

    A continued fit (or a node that reloads its rows) cannot assume that
    the rows are those the cache was built on: the client compares their
    checksum, once, and forgets a cache that does not match.
    """

    def __init__(self, cache):
        self.cache = cache


def _checksum(X):
    X = np.ascontiguousarray(X)
    return np.array([X.shape[0], X.shape[1], zlib.crc32(X.view(np.uint8))], dtype=np.int64)


def _recall(cache, X):
    """The client's cache if it belongs to these rows, else None."""
    if isinstance(cache, Unverified):
        cache = cache.cache
        if cache is not None and not np.array_equal(cache.get("_rows"), _checksum(X)):
            return None
    return cache


def _stream(bit_generator_type, state):
    """A Generator in the given state."""
    new = np.random.Generator(bit_generator_type(_SEED))
    new.bit_generator.state = state
    return new


def _client_state(cv, rng, log_scale, cache=None):
    if isinstance(rng, tuple) and len(rng) == 2 and rng[0] is _stream:
        rng = _stream(*rng[1])
    return ClientState(cv=cv, rng=rng, log_scale=log_scale, cache=cache)


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


def _copy_rng(rng):
    """A private copy of a random stream (a Generator: state copied, not pickled)."""
    if type(rng) is np.random.Generator:
        bit_generator = rng.bit_generator
        return _stream(type(bit_generator), bit_generator.state)
    return copy.deepcopy(rng)


def _uses_rng(X, cfg):
    """Whether a surrogate round draws from the client's stream."""
    draws = cfg.batch_size is not None and cfg.batch_size < X.shape[0]
    return draws or type(cfg.compressor) is not Identity


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
    cache = _recall(cache, X)
    if cache is None:
        make = getattr(problem, "client_cache", None)
        cache = make(X) if make is not None else None
        if cache is not None:  # the rows it belongs to, checked in continued fits
            cache = {**cache, "_rows": _checksum(X)}
    rows = _draw_rows(X.shape[0], batch_size, rng)
    if cache is None:
        stat, loss = problem.local_statistic(X if rows is None else X[rows], theta)
        return stat, loss, None
    stat, loss, new = problem.cached_statistic(X, theta, cache, rows)
    if new is not None and "_rows" not in new:
        new = {**new, "_rows": cache["_rows"]}
    return stat, loss, new


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


def _compress_statistic(stat, compressor, seed):
    """Each array of a statistic through the compressor, from the stream ``seed``.

    Returns the statistic as the server decodes it (same names, shapes and
    dtypes) and the exact bits of its messages, one message per array.
    """
    rng = np.random.default_rng(seed)
    out, bits = {}, 0
    for name, value in stat.items():
        value = np.asarray(value)
        if value.dtype.kind != "f":
            value = value.astype(np.float64)
        hat, size = compressor.compress(np.ascontiguousarray(value).reshape(-1), rng)
        out[name] = np.asarray(hat).reshape(value.shape)
        bits += int(size)
    return out, bits


def _client_init_compressed(problem, X, pin, compressor, seed_init):
    """Compressed initialization messages: ``(statistic, bits)`` (or None).

    ``seed_init`` is ``(seed, init)``: the seed of the stream the
    compressor draws from, and the client's own initialization data (or
    None), which never leaves the client.
    """
    seed, init = seed_init
    stat = _client_init(problem, X, pin, init)
    if stat is None:
        return None
    with _ClientContext(pin):
        return _compress_statistic(stat, compressor, seed)


def _client_full_compressed(problem, X, theta, pin, compressor, seed):
    """The initial full round, compressed: ``(statistic, loss, bits)``."""
    stat, loss = _client_full(problem, X, theta, pin)
    with _ClientContext(pin):
        stat, bits = _compress_statistic(stat, compressor, seed)
    return stat, loss, bits


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
        # (a round that draws nothing shares the unchanged stream)
        rng = _copy_rng(state.rng) if _uses_rng(X, cfg) else state.rng
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
        rng = _copy_rng(state.rng)
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


def _client_gradient(problem, X, state, theta, c, hyper, cfg):
    """One round of a gradient baseline (FedAvg, FedProx, SCAFFOLD) on one client.

    ``hyper`` is ``(aggregation, learning_rate, mu)``; ``c`` the server's
    control variate (SCAFFOLD) or None. The message is
    :math:`Q(y^K - x_t)`, followed by :math:`Q(c_i^+ - c_i)` for SCAFFOLD
    (see :mod:`skfedmm.baselines`).
    """
    from ..baselines import local_gradient_steps, scaffold_control_change

    aggregation, learning_rate, mu = hyper
    with _ClientContext(cfg.pin):
        rng = copy.deepcopy(state.rng)
        X, theta = _aligned(X), _map_param(_aligned, theta)
        layout, dtype = cfg.param_layout, cfg.dtype
        x0 = layout.flatten(theta, dtype)

        def gradient(y):
            batch = _draw_batch(X, cfg.batch_size, rng)
            grad, loss = problem.gradient(batch, layout.cast(layout.unflatten(y), dtype))
            return layout.flatten(grad, dtype), loss

        def project(y):
            return layout.flatten(problem.project_parameter(layout.unflatten(y)), dtype)

        scaffold = aggregation == "scaffold"
        correction = _aligned(c) - state.cv if scaffold else None
        y, loss = local_gradient_steps(
            gradient, project, x0, steps=cfg.local_steps, learning_rate=learning_rate,
            mu=mu if aggregation == "fedprox" else 0.0, correction=correction,
        )
        payload, bits = cfg.compressor.compress(y - x0, rng)
        cv = None
        if scaffold:
            change = scaffold_control_change(
                x0, y, _aligned(c), steps=cfg.local_steps, learning_rate=learning_rate
            )
            sent, more = cfg.compressor.compress(change.astype(dtype, copy=False), rng)
            cv = state.cv + sent
            payload, bits = np.concatenate([payload, sent]), bits + more
        new_state = ClientState(cv=cv, rng=rng)
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
    "init_compressed": _client_init_compressed,
    "full_compressed": _client_full_compressed,
    "loss": _client_loss,
    "surrogate": _client_surrogate,
    "parameter": _client_parameter,
    "gradient": _client_gradient,
}
