r"""The FedMM round loop, independent of any particular MM problem.

One FedMM round (Dieuleveut, Fort, Hegazy, Wai, 2025), with server state
:math:`(\hat S_t, V_t, \theta_t = T(\hat S_t))` and client control variates
:math:`V_i`:

.. math::

    \Delta_i &= \bar S_i(\theta_t) - \hat S_t - V_i, \qquad
    c_i = Q(\Delta_i), \qquad V_i \leftarrow V_i + \alpha c_i
    \quad (i \in A_t), \\
    H_t &= V_t + \sum_{i \in A_t} \frac{w_i}{q_i} c_i, \\
    \hat S_{t+1} &= \hat S_t + \gamma_t \big(\Pi(\hat S_t + H_t) - \hat S_t\big), \qquad
    V_{t+1} = V_t + \alpha \sum_{i \in A_t} w_i c_i, \qquad
    \theta_{t+1} = T(\hat S_{t+1}),

where:

- :math:`A_t` is the set of active clients, :math:`q_i` the probability that
  client :math:`i` is active;
- :math:`\bar S_i(\theta)` is client :math:`i`'s mean statistic on a batch of
  its rows; :math:`w_i` its weight (:math:`\sum_i w_i = 1`);
- :math:`Q` is an unbiased compressor, :math:`\alpha` the control-variate
  rate (``cv_rate``), :math:`\gamma_t` the step size;
- :math:`\Pi` is the problem's ``project`` and :math:`T` its ``minimize``
  (:math:`\hat S_t + H_t` estimates the mean field's target
  :math:`\bar S(\theta_t)`; projected, then approached by the step
  :math:`\gamma_t`, it keeps :math:`\hat S_{t+1}` a convex combination of
  valid statistics; with :math:`\gamma_t = 1` and exact rounds this is batch
  MM).

The same loop runs the parameter-averaging baseline
(``aggregation="parameter"``): each active client runs ``local_steps`` MM
steps on its own rows from :math:`\theta_t` and sends
:math:`Q(\theta_i - \theta_t)`; the server sets
:math:`\theta_{t+1} = P(\theta_t + \sum_{i\in A_t} \frac{w_i}{q_i}
Q(\theta_i - \theta_t))`, with :math:`P` the problem's ``project_parameter``.

It also runs the gradient baselines FedAvg (McMahan et al., 2017), FedProx
(Li et al., 2020) and SCAFFOLD (Karimireddy et al., 2020),
``aggregation="fedavg"``, ``"fedprox"``, ``"scaffold"``, for problems with
a :meth:`~skfedmm.problems.MMProblem.gradient`: each active client runs
``local_steps`` projected gradient steps of size ``learning_rate`` from
:math:`\theta_t` (FedProx adds :math:`\mu(y - \theta_t)` to the gradient,
SCAFFOLD the control-variate correction :math:`c - c_i`), and the server
update is the parameter-averaging one above; SCAFFOLD's clients also send
their control-variate change. The update rules are in
:mod:`skfedmm.baselines`.

References
----------
.. [1] A. Dieuleveut, G. Fort, M. Hegazy, H.-T. Wai. Federated
   Majorize-Minimization: Beyond Parameter Aggregation. arXiv:2507.17534,
   2025.
.. [2] A. Dieuleveut, G. Fort, E. Moulines, G. Robin. Federated-EM with
   heterogeneity mitigation and variance reduction. NeurIPS 2021.
"""

import math
import time
import uuid
import warnings
from dataclasses import dataclass, replace
from numbers import Integral, Real

import numpy as np

from ._params import (
    ENGINE_PARAMS,
    FEDERATED_CONSTRAINTS,
    ENGINE_PARAMS_DOC,
    HasMethods,
    Interval,
    StrOptions,
    validate_params,
)
from .history import _Progress, History  # noqa: F401
from .schedules import PolynomialDecay, _MeasuredStep, _step_schedule, auto_step_size  # noqa: F401
from .federation.client import ClientConfig, ClientMessage, ClientState  # noqa: F401
from .federation.client import Unverified, _copy_rng, _current_cv
from .federation.transport import LocalTransport, RemoteClients, Transport
from ._messages import (
    InvalidMessageError,
    ParamLayout,
    StatLayout,
    check_statistic_message,
    check_vector_message,
    majority_layout,
)
from .compression import Identity, make_compressor
from .baselines import GRADIENT_AGGREGATIONS
from .federation.local import ClientFailure, _single_blas_thread

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
# Client side (module-level functions: they are sent to joblib workers)
# --------------------------------------------------------------------------
# (BLAS limits, guarded calls and placement of rows: skfedmm.federation.local)


def _expected_layout(problem, theta, results):
    """The statistic's layout: declared by the problem, else what most clients sent."""
    shapes = problem.statistic_shapes(theta)
    if shapes is not None:
        return StatLayout(shapes)
    sent = [
        r[0] for r in results
        if not isinstance(r, ClientFailure) and isinstance(r, tuple) and len(r) == 2
    ]
    return majority_layout(sent)


def _client_cv(state, i):
    """Client ``i``'s control variate as the server mirrors it, in current coordinates."""
    c = state.clients[i]
    return _current_cv(c.cv, c.log_scale, state.log_scale)


def _norm(v):
    """The Euclidean norm for the history (inf, silently, past the float range)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.linalg.norm(v))


def _sent_bits(stat):
    """Bits of an uncompressed statistic as a client sends it: each array at its own dtype."""
    arrays = stat.values() if isinstance(stat, dict) else [stat]
    return sum(8 * np.asarray(a).dtype.itemsize * np.asarray(a).size for a in arrays)


def _check_bits(bits):
    """A client's reported size of a compressed message: a nonnegative int."""
    if isinstance(bits, bool) or not isinstance(bits, (Integral, np.integer)) or bits < 0:
        raise InvalidMessageError(f"the bits of a message must be a nonnegative int, got {bits!r}")
    return int(bits)


def _check_loss(loss):
    """A client's reported loss: a finite real number."""
    try:
        value = float(loss)
    except (TypeError, ValueError) as exc:
        raise InvalidMessageError(f"the loss is not a real number ({exc})") from exc
    if not np.isfinite(value):
        raise InvalidMessageError(
            "the loss is not finite (overflow or NaN in the client's computation: check the "
            "scale of its data)"
        )
    return value


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

    A state is replaced, never half-changed: every round builds the next
    state from the previous one and commits it only once all of the round's
    steps have succeeded (clients, projection, M-step, checks). An exception
    in a round therefore leaves the last committed state, from which a
    resumed fit continues bitwise as if nothing had happened.

    Attributes
    ----------
    theta : ndarray or dict of ndarray
        Current parameter :math:`\\theta_t`.
    s_hat : ndarray or None
        Server statistic :math:`\\hat S_t` (flat); None for parameter
        aggregation.
    cv : ndarray or None
        Aggregate control variate :math:`V_t` (flat).
    log_scale : ndarray or None
        Cumulative log-coordinates (problems with ``rescale`` only).
    clients : list of ClientState
    server_rng : numpy.random.Generator
        The server's participation stream (only participation draws, so
        that runs differing in anything else see the same participants).
    round : int
        Number of rounds run after initialization.
    history : History
    weights : ndarray of shape (n_clients,)
        The client weights :math:`w_i` the state was built with.
    layout : object
        The statistic's layout (names and shapes of its arrays).
    mstep_rng : numpy.random.Generator
        The server's stream for the initialization and the M-steps.
    problem : MMProblem
        The problem the run solves, as returned by
        :meth:`MMProblem.prepare` (with its fit-time constants).
    init_stat : dict of ndarray or None
        The aggregated initialization statistic (kept so that a continued
        run can prepare a problem with changed hyper-parameters).
    param_layout : object
        The parameter's layout (one array or a dict of arrays).
    run_id : str
        The run's id, shared by its continued fits (a client still busy
        from an earlier fit of the run is not asked again).
    aggregation : str or None
        The aggregation the run was started with (None in states saved
        before it was recorded). For SCAFFOLD, ``cv`` is the server's
        control variate :math:`c` (flat parameter) and each client's
        ``cv`` its :math:`c_i`.
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
    problem: object = None
    init_stat: object = None
    param_layout: object = None
    run_id: str = ""
    aggregation: object = None


@dataclass(frozen=True)
class _RoundContext:
    """What every round of one ``fit`` call shares.

    Attributes
    ----------
    transport : Transport
        Where the clients are.
    cfg : ClientConfig
        What the clients need to run a round.
    failures : _FailureLog
        The fit's failure record (warned once, ``min_clients``).
    q : ndarray of shape (n_clients,)
        Each client's probability of taking part in a round.
    t0 : float
        The fit's start (``time.perf_counter``), for the history.
    step_rule : object, default=None
        The measured step of ``step_size="auto"`` in noisy rounds
        (:class:`~skfedmm.schedules._MeasuredStep`), which sets each
        round's step from its messages; None for the other schedules.
    """

    transport: object
    cfg: object
    failures: object
    q: object
    t0: float
    step_rule: object = None


class _FailureLog:
    """Failures of one ``fit`` call: warned about once, counted against ``min_clients``."""

    def __init__(self, min_clients):
        self.min_clients = min_clients
        self.warned = False

    def answers(self, indices, results, round_index, needed=None, validate=None):
        """Answers of the clients that did not fail; warn once, check the count.

        ``validate(i, answer)`` checks an answer on arrival and returns it (or
        a checked form of it); an :class:`InvalidMessageError` makes it a
        failure of that client in that round, like any other.
        """
        answered, failures = _split_answers(indices, results)
        if validate is not None:
            checked = []
            for i, res in answered:
                try:
                    checked.append((i, validate(i, res)))
                except InvalidMessageError as exc:
                    err = InvalidMessageError(
                        f"client {i} sent an invalid message at round {round_index}: {exc}"
                    )
                    failures.append((i, ClientFailure("InvalidMessageError", str(err), err)))
            answered = checked
            failures.sort(key=lambda f: f[0])
        if failures and not self.warned:
            i, f = failures[0]
            warnings.warn(
                f"client {i} failed at round {round_index} ({f.error}: {f.message}); failed "
                "clients are treated as not participating in that round. Further failures "
                "in this fit are recorded in history_.failed without a warning.",
                ClientFailureWarning,
                stacklevel=4,
            )
            self.warned = True
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


def _mirrored_cv(clients, weights, log_scale, dtype):
    """:math:`V = \\sum_i w_i V_i`, re-derived from the clients' control variates.

    The server mirrors every :math:`V_i` (it receives each increment and
    knows the coordinate factors), so it can recompute the aggregate exactly
    instead of carrying a running sum.
    """
    cvs = [_current_cv(c.cv, c.log_scale, log_scale) for c in clients]
    return aggregate(cvs, weights.astype(dtype)).astype(dtype, copy=False)


def _check_finite_param(param_layout, theta, round_index):
    if not np.all(np.isfinite(param_layout.flatten(theta))):
        where = "initial server update" if round_index == 0 else f"server update at round {round_index}"
        raise ValueError(
            f"The {where} produced a non-finite parameter; check the scale of the data "
            "and the step size."
        )


class FedMM:
    __doc__ = """The FedMM engine: runs an :class:`~skfedmm.problems.MMProblem` on clients.

    Parameters
    ----------
    problem : MMProblem
        The MM problem. It is not modified: fit-time constants live in the
        problem returned by :meth:`MMProblem.prepare`, stored in the state.
""" + ENGINE_PARAMS_DOC.lstrip("\n") + """    max_iter : int, default=100
        Number of rounds after the initialization.
    tol : float, default=0.0
        Stopping tolerance; see ``convergence``.
    convergence : {"objective", "absolute", "mean_field"}, default="objective"
        ``"objective"``: stop when the exact objective changes by less than
        ``tol`` times its magnitude between two evaluated rounds,
        :math:`|W_{t-1} - W_t| < \\mathrm{tol}\\,|W_t|` (objectives of
        either sign). ``"absolute"``: stop when :math:`|W_{t-1} - W_t| <
        \\mathrm{tol}` (as :mod:`sklearn.mixture` does with the lower
        bound). ``"mean_field"``: stop when :math:`\\|H_t\\|_1 \\le`
        ``tol`` (surrogate aggregation; a problem with a
        ``mean_field_norm(H)`` method measures :math:`H_t` its own way, for
        example on one block of the statistic).
    n_jobs : int or None, default=None
        Clients run in parallel through joblib; the backend is whatever
        :func:`joblib.parallel_config` selects.
    random_state : int, RandomState, Generator or None, default=None
    verbose : int, default=0
        Report progress: a tqdm bar when tqdm is installed, else a line per
        reported round.
    verbose_interval : int, default=1
        Rounds between two progress reports (the bar still advances every
        round).
    callback : callable or None, default=None
        Called after each round, the initial one included, with a dict
        (``round``, ``theta``, ``history``); returning True stops the fit.
    """

    _parameter_constraints = {
        "problem": [HasMethods(["local_statistic", "minimize", "init_parameter"])],
        **{name: FEDERATED_CONSTRAINTS[name] for name in ENGINE_PARAMS},
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "convergence": [StrOptions({"objective", "absolute", "mean_field"})],
        "n_jobs": [Integral, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "verbose_interval": [Interval(Integral, 1, None, closed="left")],
        "callback": [callable, None],
    }

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
        learning_rate="auto",
        mu=0.01,
        client_weights="proportional",
        eval_every=None,
        min_clients=1,
        client_timeout=None,
        max_iter=100,
        tol=0.0,
        convergence="objective",
        n_jobs=None,
        random_state=None,
        verbose=0,
        verbose_interval=1,
        callback=None,
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
        self.learning_rate = learning_rate
        self.mu = mu
        self.client_weights = client_weights
        self.eval_every = eval_every
        self.min_clients = min_clients
        self.client_timeout = client_timeout
        self.max_iter = max_iter
        self.tol = tol
        self.convergence = convergence
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.callback = callback

    def get_params(self, deep=False):
        """The engine's parameters (those of its constructor).

        Parameters
        ----------
        deep : bool, default=False
            Ignored; present for scikit-learn compatibility.

        Returns
        -------
        params : dict
        """
        return {name: getattr(self, name) for name in self._parameter_constraints}

    # ---------------------------------------------------------------- checks
    def _transport(self, clients, run_id=None):
        """The clients as a transport: a :class:`Transport` as given, or local."""
        if isinstance(clients, Transport):
            return clients
        if isinstance(clients, RemoteClients):
            return clients.transport
        if len(clients) == 0:
            raise ValueError("At least one client is needed.")
        return LocalTransport(
            clients, n_jobs=self.n_jobs, timeout=self.client_timeout, run_id=run_id
        )

    def _validate(self, transport):
        validate_params(self._parameter_constraints, self.get_params(), "FedMM")
        compressor = make_compressor(self.compression)
        if transport.n_clients == 0:
            raise ValueError("At least one client is needed.")
        exact = (
            self.participation == 1
            and compressor.omega(2) == 0
            and (self.batch_size is None or self.batch_size >= int(np.max(transport.n_rows)))
        )
        return compressor, exact

    def _streams(self):
        from sklearn.utils import check_random_state

        rs = self.random_state
        if isinstance(rs, np.random.Generator):
            entropy = int(rs.integers(2**63))
        else:
            entropy = int(check_random_state(rs).randint(np.iinfo(np.int32).max))
        return np.random.SeedSequence(entropy)

    # ------------------------------------------------------------ main API
    def fit(self, clients, state=None, max_iter=None, *, on_commit=None, client_init=None,
            first_step=True):
        """Run FedMM on the clients.

        Parameters
        ----------
        clients : list of ndarray of shape (n_i, n_features)
            Validated client datasets (all of one floating dtype).
        state : FedMMState, default=None
            A state to continue from: the server statistic, every client's
            control variate and stream, the round counter and the history.
            Continuing a run for ``k`` more rounds gives bitwise the model of
            one run of the same total length. A new run when None. The state
            is not modified; the returned state is a new object.
        max_iter : int, default=None
            Rounds to run in this call; ``self.max_iter`` when None.
        on_commit : callable, default=None
            Called with each committed state (after the initialization and
            after every round), before the user's ``callback``: an
            interrupted fit has handed out the state it can be resumed from.
        client_init : list, default=None
            Per-client initialization data (for example initial codes),
            passed to each client's :meth:`MMProblem.init_statistic` as its
            second argument in a new run; it stays with its client.
        first_step : bool, default=True
            False: a new run stops after its initialization, whose full
            round computes the statistic at the initial parameter without
            minimizing it; ``state.theta`` is the initial parameter (as
            scikit-learn's mixtures with ``max_iter=0``). A continued run
            ignores it.

        Returns
        -------
        state : FedMMState
            The final state; ``state.theta`` is the fitted parameter and
            ``state.history`` the per-round record.
        """
        run_id = uuid.uuid4().hex if state is None else state.run_id
        transport = self._transport(clients, run_id)
        compressor, exact = self._validate(transport)
        self._check_gradient_aggregation(transport)
        max_iter = self.max_iter if max_iter is None else max_iter
        n = transport.n_clients
        dtype = transport.dtype
        n_features = getattr(transport, "n_features", getattr(transport, "_n_features", None))
        pin = _single_blas_thread(n, transport.n_rows, n_features)
        weights = client_weights(transport.n_rows, self.client_weights)
        if client_init is not None and len(client_init) != n:
            raise ValueError(f"client_init has {len(client_init)} entries for {n} clients.")
        if state is not None:
            state = self._resume(state, weights)
        with transport:
            failures = _FailureLog(self.min_clients)
            t0 = time.perf_counter()
            if state is None:
                state = self._initialize(
                    transport, weights, dtype, pin, t0, failures, client_init, compressor,
                    first_step,
                )
                state = replace(state, run_id=run_id)
                if on_commit is not None:
                    on_commit(state)
                if not first_step or self._stop(state):
                    max_iter = 0
            else:
                t0 -= state.history.time[-1]
            d = state.layout.size
            omega = compressor.omega(d)
            cv_rate = 1.0 / (1.0 + omega) if self.cv_rate == "auto" else float(self.cv_rate)
            if self.participation_scheme == "fixed":
                m = min(n, math.ceil(self.participation * n))
                q = np.full(n, m / n)
            else:
                m = None
                q = np.full(n, float(self.participation))
            n_rows = np.asarray(transport.n_rows, dtype=float)
            drawn = n_rows if self.batch_size is None else np.minimum(self.batch_size, n_rows)
            schedule = _step_schedule(
                self.step_size, omega, float(q[0]), fraction=float(drawn.sum() / n_rows.sum())
            )
            cfg = ClientConfig(
                layout=state.layout,
                param_layout=state.param_layout,
                compressor=compressor,
                cv_rate=cv_rate,
                batch_size=self.batch_size,
                local_steps=self.local_steps,
                dtype=np.dtype(dtype),
                pin=pin if self.batch_size is None else _single_blas_thread(
                    n, np.minimum(transport.n_rows, self.batch_size), n_features),
            )
            progress = _Progress(self.verbose, max_iter, self.verbose_interval)
            for _ in range(max_iter):
                t = state.round
                # drawn from a copy: the stream advances only with the commit
                server_rng = _copy_rng(state.server_rng)
                if m is None:
                    active = np.flatnonzero(server_rng.random(n) < self.participation)
                else:
                    active = np.sort(server_rng.choice(n, size=m, replace=False))
                gamma = float(schedule(t))
                if not (np.isfinite(gamma) and 0 < gamma <= 1):
                    raise ValueError(f"step_size gave gamma={gamma!r} at round {t}; it must be in (0, 1].")
                evaluate = exact or (self.eval_every is not None and (t + 1) % self.eval_every == 0)
                state = self._round(
                    _RoundContext(transport, cfg, failures, q, t0,
                                  schedule if isinstance(schedule, _MeasuredStep) else None),
                    state, server_rng, active, gamma, evaluate,
                )
                if on_commit is not None:
                    on_commit(state)
                progress.update(state)
                if self._stop(state):
                    break
            progress.close()
        return state

    def _resume(self, state, weights):
        """The state to continue from, with this engine's problem and weights."""
        n = len(weights)
        if len(state.clients) != n:
            raise ValueError(
                f"Cannot continue a run of {len(state.clients)} clients with {n} clients."
            )
        if state.aggregation is not None and state.aggregation != self.aggregation:
            raise ValueError(
                f"aggregation cannot change when training continues: the state is that of an "
                f"aggregation={state.aggregation!r} run, not {self.aggregation!r}; start a new fit."
            )
        if (state.s_hat is None) != (self.aggregation != "surrogate") or (
            self.aggregation == "scaffold" and state.cv is None
        ):
            raise ValueError(
                "aggregation cannot change when training continues: the state of a "
                f"{'parameter' if state.s_hat is None else 'surrogate'}-aggregation run holds "
                f"no {'server statistic' if state.s_hat is None else 'parameter-only state'} "
                f"for aggregation={self.aggregation!r}; start a new fit."
            )
        problem = self.problem.prepare(state.init_stat)
        # the clients' rows may have changed since: each checks its cache once
        clients = [
            c if c.cache is None or isinstance(c.cache, Unverified)
            else replace(c, cache=Unverified(c.cache))
            for c in state.clients
        ]
        changes = dict(problem=problem, clients=clients)
        if not np.array_equal(weights, state.weights):
            # new client weights take effect now: V = sum_i w_i V_i with the new w
            changes["weights"] = weights
            if state.cv is not None:
                changes["cv"] = _mirrored_cv(state.clients, weights, state.log_scale, state.cv.dtype)
        return replace(state, **changes)

    def _check_gradient_aggregation(self, transport):
        """Refuse a gradient baseline the problem or the transport cannot run."""
        if self.aggregation not in GRADIENT_AGGREGATIONS:
            return
        from .problems.base import MMProblem

        method = getattr(type(self.problem), "gradient", None)
        if method is None or method is MMProblem.gradient:
            raise ValueError(
                f"aggregation={self.aggregation!r} trains by gradient steps, and "
                f"{type(self.problem).__name__} does not provide the gradient of its loss "
                "(MMProblem.gradient); use aggregation='surrogate' or 'parameter'."
            )
        tasks = getattr(transport, "supported_tasks", None)
        if tasks is not None and "gradient" not in tasks:
            raise ValueError(
                f"aggregation={self.aggregation!r} needs the client task 'gradient', which "
                f"{type(transport).__name__} does not run (its clients run only "
                f"{', '.join(repr(t) for t in sorted(tasks))}); use aggregation='surrogate' or "
                "'parameter' there, or run the gradient baselines in-process."
            )

    def _learning_rate(self, problem, init_stat):
        """The gradient baselines' learning rate (``"auto"``: the problem's default)."""
        if self.learning_rate != "auto":
            return float(self.learning_rate)
        default = getattr(problem, "default_learning_rate", None)
        rate = None if default is None else default(init_stat)
        if rate is None or not (np.isfinite(rate) and rate > 0):
            raise ValueError(
                f"learning_rate='auto', and {type(problem).__name__} proposes no learning rate "
                f"(default_learning_rate gave {rate!r}); give a float learning_rate."
            )
        return float(rate)

    def _stop(self, state):
        """After a committed round (the initial one included): the user's
        ``callback`` asks to stop, or the run has converged."""
        if self.callback is not None and self.callback(
            {"round": state.round, "theta": state.theta, "history": state.history}
        ):
            return True
        return self._converged(state.history)

    def _converged(self, history):
        if self.tol <= 0:
            return False
        if history.restarted and history.restarted[-1] == 1:
            return False  # the problem restarted part of theta: not a plateau
        if self.convergence == "mean_field":
            # (a round where no client answered has H = V, which says nothing)
            return bool(history.n_active[-1] > 0 and history.mean_field[-1] <= self.tol)
        full = history.full_objective
        if len(full) < 2 or not (np.isfinite(full[-1]) and np.isfinite(full[-2])):
            return False
        change = abs(full[-2] - full[-1])
        if self.convergence == "absolute":
            return bool(change < self.tol)
        return bool(change < self.tol * abs(full[-1]))

    # -------------------------------------------------------------- rounds
    def _initialize(self, transport, weights, dtype, pin, t0, failures, client_init,
                    compressor=None, first_step=True):
        n = transport.n_clients
        seeds = self._streams().spawn(n + 2)
        server_rng = np.random.default_rng(seeds[0])
        init_rng = np.random.default_rng(seeds[1])
        client_rngs = [np.random.default_rng(s) for s in seeds[2:]]
        itemsize = np.dtype(dtype).itemsize
        bits_up = 0
        failed = []
        # With compression the initialization messages are compressed too,
        # each client drawing from streams of its own (two seeds: the init
        # statistic, the initial full round); the control variates then
        # carry the compression error of the initial round into the next.
        squeeze = compressor is not None and type(compressor) is not Identity
        squeeze_init = squeeze and bool(getattr(self.problem, "compress_init_statistic", False))
        squeeze_full = squeeze and bool(getattr(self.problem, "compress_first_round", True))
        if squeeze:
            init_seeds = [
                [int(v >> np.uint64(1)) for v in s.spawn(1)[0].generate_state(2, np.uint64)]
                for s in seeds[2:]
            ]
            per = [(sd[0], None if client_init is None else client_init[i])
                   for i, sd in enumerate(init_seeds)]
        if squeeze_init:
            results = transport.run(
                "init_compressed", range(n), self.problem, pin, compressor, per_client=per
            )
        else:
            results = transport.run("init", range(n), self.problem, pin, per_client=client_init)

        def unpack_init(answer):
            """(statistic or None, reported bits or None) of an init answer."""
            if not squeeze_init or answer is None:
                return answer, None
            if not (isinstance(answer, tuple) and len(answer) == 2):
                raise InvalidMessageError("expected a (statistic, bits) pair")
            return answer[0], _check_bits(answer[1])

        # the expected layout: what most clients sent (one faulty client
        # cannot impose its own on the honest ones)
        sent = []
        for r in results:
            if not isinstance(r, ClientFailure):
                try:
                    sent.append(unpack_init(r)[0])
                except InvalidMessageError:
                    pass
        init_layout = None
        if any(r is not None for r in sent):
            init_layout = majority_layout([r for r in sent if r is not None])

        def check_init(i, answer):
            stat, bits = unpack_init(answer)
            if init_layout is None:
                if stat is not None:
                    raise InvalidMessageError("sent an initialization statistic nobody else sent")
                return None
            flat = init_layout.flatten(stat, dtype)
            flat = check_vector_message(flat, init_layout.size, "initialization statistic")
            return flat, _sent_bits(stat) if bits is None else bits

        answered, fails = failures.answers(range(n), results, 0, needed=1, validate=check_init)
        failed += fails
        agg_init = None
        if init_layout is not None:
            idx = [i for i, _ in answered]
            flat = [f for _, (f, _) in answered]
            bits_up += sum(b for _, (_, b) in answered)
            w = weights[idx] / weights[idx].sum()
            combine = getattr(self.problem, "combine_init_statistics", None)
            agg_init = (
                combine([init_layout.unflatten(f) for f in flat], w) if combine is not None
                else init_layout.unflatten(aggregate(flat, w))
            )
        problem = self.problem.prepare(agg_init)
        theta0 = problem.init_parameter(agg_init, init_rng)
        param_layout = ParamLayout(theta0)
        theta0 = param_layout.cast(theta0, dtype)
        theta_bits = param_layout.size * 8 * itemsize
        bits_down = n * theta_bits
        history = History()
        common = dict(
            server_rng=server_rng, round=0, history=history, weights=weights,
            mstep_rng=init_rng, problem=problem, init_stat=agg_init, param_layout=param_layout,
            aggregation=self.aggregation,
        )
        if self.aggregation != "surrogate":
            # The baselines need no statistic: only theta0 is broadcast
            # (SCAFFOLD's control variates start at zero on both sides).
            if self.aggregation in GRADIENT_AGGREGATIONS:
                self._learning_rate(problem, agg_init)  # fails before any round
            history._append(
                bits_up=bits_up, bits_down=bits_down, n_active=n, failed=failed,
                time=time.perf_counter() - t0,
            )
            zero = (
                (lambda: np.zeros(param_layout.size, dtype=dtype))
                if self.aggregation == "scaffold" else (lambda: None)
            )
            return FedMMState(
                theta=theta0, s_hat=None, cv=zero(), log_scale=None,
                clients=[ClientState(cv=zero(), rng=r) for r in client_rngs],
                layout=StatLayout.of(param_layout.as_dict(theta0)), **common,
            )
        if squeeze_full:
            results = transport.run(
                "full_compressed", range(n), problem, theta0, pin, compressor,
                per_client=[sd[1] for sd in init_seeds],
            )
            # (the layout from the (statistic, loss) part of the answers)
            layout = _expected_layout(problem, theta0, [
                r[:2] if isinstance(r, tuple) and len(r) == 3 else r for r in results
            ])
        else:
            results = transport.run("full", range(n), problem, theta0, pin)
            layout = _expected_layout(problem, theta0, results)

        def check_full(i, answer):
            if squeeze_full:
                # a compressed statistic may leave the valid set (the
                # server's projection brings the aggregate back)
                if not (isinstance(answer, tuple) and len(answer) == 3):
                    raise InvalidMessageError("expected a (statistic, loss, bits) triple")
                stat, loss, bits = answer
                flat = check_vector_message(layout.flatten(stat, dtype), layout.size, "statistic")
                return flat, _check_loss(loss), _check_bits(bits)
            if not (isinstance(answer, tuple) and len(answer) == 2):
                raise InvalidMessageError("expected a (statistic, loss) pair")
            stat, loss = answer
            flat = check_statistic_message(problem, layout, layout.flatten(stat, dtype), theta0)
            return flat, _check_loss(loss), _sent_bits(stat)

        answered, fails = failures.answers(range(n), results, 0, needed=1, validate=check_full)
        failed += fails
        idx = [i for i, _ in answered]
        stats = [f for _, (f, _, _) in answered]
        losses = np.array([loss for _, (_, loss, _) in answered], dtype=float)
        bits_up += sum(b + 64 for _, (_, _, b) in answered)
        w = weights[idx] / weights[idx].sum()
        s_agg = aggregate(stats, w)
        s_hat = layout.flatten(problem.project(layout.unflatten(s_agg)), dtype)
        use_cv = isinstance(self.cv_rate, str) or self.cv_rate != 0
        cvs = [np.zeros_like(s_hat) for _ in range(n)]
        if use_cv:  # (with cv_rate=0, the ablation, there are no control variates)
            # against the unprojected aggregate, so that sum_i w_i V_i = 0 = V
            for i, stat in zip(idx, stats):
                cvs[i] = stat - s_agg
        theta1 = theta0 if not first_step else param_layout.cast(
            problem.minimize(layout.unflatten(s_hat), theta0, init_rng), dtype)
        _check_finite_param(param_layout, theta1, 0)
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
            param_change=_norm(param_layout.flatten(theta1) - param_layout.flatten(theta0)),
            bits_up=bits_up, bits_down=bits_down, n_active=len(idx), failed=failed,
            time=time.perf_counter() - t0,
        )
        return FedMMState(
            theta=theta1, s_hat=s_hat, cv=np.zeros_like(s_hat), log_scale=log_scale,
            clients=[
                ClientState(cv=c, rng=r, log_scale=None if log_scale is None else log_scale.copy())
                for c, r in zip(cvs, client_rngs)
            ],
            layout=layout, **common,
        )

    def _round(self, ctx, state, server_rng, active, gamma, evaluate):
        """One round; returns the next state and leaves ``state`` untouched."""
        transport, cfg, failures, q, t0 = ctx.transport, ctx.cfg, ctx.failures, ctx.q, ctx.t0
        problem = state.problem
        weights = state.weights
        theta = state.theta
        round_index = state.round + 1
        param_layout = state.param_layout
        theta_bits = param_layout.size * 8 * cfg.dtype.itemsize
        if self.aggregation == "surrogate":
            results = transport.run(
                "surrogate", active, problem, theta, state.s_hat, state.log_scale, cfg,
                states=state.clients,
            )
        elif self.aggregation == "parameter":
            results = transport.run("parameter", active, problem, theta, cfg, states=state.clients)
        else:
            hyper = (self.aggregation, self._learning_rate(problem, state.init_stat), float(self.mu))
            results = transport.run(
                "gradient", active, problem, theta, state.cv, hyper, cfg, states=state.clients
            )
        surrogate = self.aggregation == "surrogate"
        scaffold = self.aggregation == "scaffold"
        size = state.layout.size if surrogate else param_layout.size * (2 if scaffold else 1)
        exact = surrogate and cfg.compressor.omega(size) == 0
        if exact:  # (the round's part of the rounding slack, once)
            s_scale = np.abs(state.s_hat).max() + 1.0
            eps16 = 16 * np.finfo(state.s_hat.dtype).eps

        def check(i, answer):
            msg, new_client = answer
            payload = check_vector_message(msg.payload, size, "message")
            loss = _check_loss(msg.loss)
            if exact:
                # an exact message is S_i - S_hat - V_i: check S_i itself
                implied = state.s_hat + _client_cv(state, i) + payload
                atol = eps16 * (s_scale + np.abs(payload).max())
                check_statistic_message(problem, state.layout, implied, theta, atol)
            return ClientMessage(payload=payload, bits=msg.bits, loss=loss), new_client

        answered, failed = failures.answers(active, results, round_index, validate=check)
        idx = np.array([i for i, _ in answered], dtype=int)
        messages = [msg for _, (msg, _) in answered]
        new_clients = list(state.clients)
        for i, (_, new_client) in answered:
            new_clients[i] = new_client
        bits_up = sum(m.bits for m in messages) + 64 * len(messages)
        w_ans = weights[idx]
        objective = (
            float(np.dot(w_ans, [m.loss for m in messages]) / w_ans.sum()) if len(idx) else np.nan
        )
        row = dict(objective=objective, n_active=len(idx), step_size=gamma, failed=failed)
        full_batch = self.batch_size is None or all(
            self.batch_size >= transport.n_rows[i] for i in idx
        )
        if evaluate:
            if len(idx) == transport.n_clients and full_batch:
                row["full_objective"] = objective
            else:
                row["full_objective"] = self._full_loss(
                    transport, problem, theta, weights, cfg.pin
                )
        payloads = [m.payload for m in messages]
        # Failed clients are absent: the answers stand for the whole sampled
        # weight, so that H keeps its scale (an exact correction when the
        # failures are independent of the messages).
        reweight = weights[active].sum() / w_ans.sum() if len(idx) else 0.0
        changes = {}
        if self.aggregation == "surrogate":
            layout = state.layout
            row["bits_down"] = len(active) * (theta_bits + state.s_hat.size * 8 * state.s_hat.dtype.itemsize)
            H = state.cv.copy()
            if len(idx):
                H = aggregate(payloads, reweight * w_ans / q[idx], out=H)
            if ctx.step_rule is not None and state.log_scale is None:
                gamma = ctx.step_rule.step(H, payloads, reweight * w_ans / q[idx], q[idx],
                                           cfg.compressor)
                row["step_size"] = gamma
            s_old = state.s_hat
            # S_hat + H estimates sbar(theta_t); project that estimate, then
            # move by gamma towards it (a convex combination of valid
            # statistics stays valid; exact rounds are unchanged).
            s_est = layout.flatten(problem.project(layout.unflatten(s_old + H)), s_old.dtype)
            s_new = s_old + gamma * (s_est - s_old)
            cv_new = state.cv
            if cfg.cv_rate != 0 and len(idx):
                cv_new = aggregate(payloads, cfg.cv_rate * w_ans, out=state.cv.copy())
            mstep_rng = _copy_rng(state.mstep_rng)
            theta_new = param_layout.cast(
                problem.minimize(layout.unflatten(s_new), theta, mstep_rng), cfg.dtype
            )
            _check_finite_param(param_layout, theta_new, round_index)
            row["restarted"] = float(bool(problem.restarted(layout.unflatten(s_new), theta, theta_new)))
            field = getattr(problem, "mean_field_norm", None)  # (optional: a part of H)
            row["mean_field"] = (
                float(np.abs(H).sum()) if field is None else float(field(layout.unflatten(H)))
            )
            row["stat_change"] = _norm(s_new - s_old)
            log_scale = state.log_scale
            factor = problem.rescale(layout.unflatten(s_new), theta, theta_new)
            if factor is not None:
                factor = layout.flatten(factor, s_new.dtype)
                s_new = s_new * factor
                log_scale = state.log_scale + np.log(factor)
                # The running sum V would carry its rounding error times the
                # cumulative factor, which can be huge: re-derive it.
                cv_new = _mirrored_cv(new_clients, weights, log_scale, state.cv.dtype)
            changes.update(s_hat=s_new, cv=cv_new, log_scale=log_scale, mstep_rng=mstep_rng)
        else:
            row["bits_down"] = len(active) * theta_bits * (2 if scaffold else 1)
            if scaffold:
                p = param_layout.size
                payloads, controls = [c[:p] for c in payloads], [c[p:] for c in payloads]
                # c = sum_i w_i c_i: add the answering clients' (sent) changes
                if len(idx):
                    changes["cv"] = aggregate(controls, w_ans.astype(cfg.dtype), out=state.cv.copy())
            if len(idx):
                step = aggregate(payloads, reweight * w_ans / q[idx])
                moved = param_layout.flatten(theta, cfg.dtype) + step.astype(cfg.dtype)
                theta_new = param_layout.cast(
                    problem.project_parameter(param_layout.unflatten(moved)), cfg.dtype
                )
            else:
                theta_new = theta
            _check_finite_param(param_layout, theta_new, round_index)
        row["param_change"] = _norm(param_layout.flatten(theta_new) - param_layout.flatten(theta))
        row["bits_up"] = bits_up
        row["time"] = time.perf_counter() - t0
        # commit: nothing above changed ``state``; from here nothing can fail
        new_state = replace(
            state, theta=theta_new, clients=new_clients, server_rng=server_rng,
            round=round_index, **changes,
        )
        new_state.history._append(**row)
        return new_state

    def _full_loss(self, transport, problem, theta, weights, pin):
        n = transport.n_clients
        results = transport.run("loss", range(n), problem, theta, pin)
        answered, _ = _split_answers(range(n), results)
        if len(answered) < n:
            return np.nan  # not an exact evaluation
        return float(np.dot(weights, [loss for _, loss in answered]))

    def evaluate(self, clients, theta, weights=None, state=None):
        """Exact objective and aggregated statistic at ``theta``.

        Parameters
        ----------
        clients : list of ndarray
        theta : ndarray or dict of ndarray
        weights : ndarray of shape (n_clients,), default=None
            Client weights; from ``client_weights`` when None.
        state : FedMMState, default=None
            Evaluate with the state's prepared problem (its fit-time
            constants); ``self.problem`` when None.

        Returns
        -------
        loss : float
            :math:`\\sum_i w_i f_i(\\theta)`.
        stat : dict of ndarray
            :math:`\\sum_i w_i \\bar S_i(\\theta)`.
        """
        transport = self._transport(clients)
        if weights is None:
            weights = client_weights(transport.n_rows, self.client_weights)
        problem = self.problem if state is None else state.problem
        n = transport.n_clients
        with transport:
            results = transport.run("full", range(n), problem, theta, n > 1)
        answered, failures = _split_answers(range(n), results)
        if failures:
            i, f = failures[0]
            raise RuntimeError(
                f"client {i} failed in the evaluation ({f.error}: {f.message})"
            ) from f.exception
        results = [r for _, r in answered]
        layout = _expected_layout(problem, theta, results)
        dtype = transport.dtype
        stat = aggregate([layout.flatten(s, dtype) for s, _ in results], weights)
        loss = float(np.dot(weights, [loss for _, loss in results]))
        return loss, layout.unflatten(stat)
