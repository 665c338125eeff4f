"""What every federated estimator shares: parameters, engine, fitted record."""

from numbers import Integral, Real

import numpy as np

from .engine import FedMM

#: The federated parameters every estimator takes, with their defaults.
FEDERATED_PARAMS = dict(
    aggregation="surrogate",
    participation=1.0,
    participation_scheme="bernoulli",
    compression=None,
    step_size="auto",
    cv_rate="auto",
    batch_size=None,
    local_steps=1,
    client_weights="proportional",
    eval_every=None,
    min_clients=1,
    client_timeout=None,
    warm_start=False,
)

FEDERATED_PARAMS_DOC = """
    aggregation : {"surrogate", "parameter"}, default="surrogate"
        ``"surrogate"``: FedMM, the server aggregates the clients' surrogate
        statistics exactly. ``"parameter"``: the baseline, clients run
        ``local_steps`` MM steps on their own rows and the server averages
        the parameters.
    participation : float in (0, 1], default=1.0
        Probability that a client takes part in a round (or fraction of
        clients per round with ``participation_scheme="fixed"``).
    participation_scheme : {"bernoulli", "fixed"}, default="bernoulli"
        Each client independently, or exactly ``ceil(participation *
        n_clients)`` clients drawn without replacement.
    compression : None, {"qsgd", "randk"}, (str, dict) or Compressor, default=None
        Unbiased compression of the clients' messages, e.g. ``"qsgd"``,
        ``("qsgd", {"s": 4})``, ``RandK(ratio=0.1)``.
    step_size : "auto", float or callable, default="auto"
        Server step size :math:`\\gamma_t`: a constant in (0, 1], or a
        callable of the round index such as
        :class:`~skfedmm.PolynomialDecay`. ``"auto"``:
        :math:`1 / (1 + \\omega + (1 - q) / (4 q))` for the compressor's
        :math:`\\omega` and participation :math:`q` (1 without compression
        and with full participation; see :func:`skfedmm.engine.auto_step_size`).
    cv_rate : "auto" or float in [0, 1], default="auto"
        Control-variate rate :math:`\\alpha`; 0 disables control variates.
        ``"auto"``: :math:`1 / (1 + \\omega)` for the compressor's
        :math:`\\omega`.
    batch_size : int or None, default=None
        Rows each active client uses per round; None: all of them.
    local_steps : int, default=1
        Local MM steps per round for ``aggregation="parameter"``.
    client_weights : {"proportional", "uniform"} or array-like, default="proportional"
        Client weights :math:`w_i`: proportional to the number of rows,
        uniform, or given.
    eval_every : int or None, default=None
        Also evaluate the exact objective on all clients every
        ``eval_every`` rounds (exact rounds are always evaluated).
    min_clients : int, default=1
        A client whose computation raises is treated as not participating
        in that round (recorded in ``history_.failed``, warned about once
        per fit). A round where fewer than ``min(min_clients, n_sampled)``
        clients answer raises an error instead of updating.
    client_timeout : float or None, default=None
        Seconds a client may take in a round before it counts as failed
        (``TimeoutError``, recorded like any failure); None waits forever.
        The late computation finishes in the background and is discarded;
        with a timeout, results depend on timing.
    warm_start : bool, default=False
        Continue from the full training state of the previous fit (server
        statistic, every client's control variate and random stream, round
        counter, history): fitting 10 rounds, then 10 more, gives bitwise
        the model of fitting 20. Needs the same clients.
"""


def check_scalar_param(name, value, *, kind=Real, low=None, high=None, low_open=False, allow_none=False):
    """Raise a clear ValueError/TypeError for an invalid scalar parameter."""
    if value is None and allow_none:
        return
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{name} must be {'an integer' if kind is Integral else 'a number'}, got {value!r}.")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}.")


def check_option(name, value, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}.")


class FederatedMixin:
    """Builds the engine from an estimator's parameters and records the fit."""

    def _make_engine(self, problem, *, max_iter, tol, convergence):
        return FedMM(
            problem,
            aggregation=self.aggregation,
            participation=self.participation,
            participation_scheme=self.participation_scheme,
            compression=self.compression,
            step_size=self.step_size,
            cv_rate=self.cv_rate,
            batch_size=self.batch_size,
            local_steps=self.local_steps,
            client_weights=self.client_weights,
            max_iter=max_iter,
            tol=tol,
            convergence=convergence,
            eval_every=self.eval_every,
            n_jobs=self.n_jobs,
            random_state=self.random_state,
            verbose=self.verbose,
            callback=self.callback,
            min_clients=self.min_clients,
            client_timeout=self.client_timeout,
        )

    def _run_engine(self, clients, make_problem, *, max_iter, tol, convergence, resume):
        """Run (or continue) FedMM and record the fitted state.

        ``make_problem`` builds the problem for a new run; a continued run
        reuses ``problem_`` and ``fedmm_state_``.
        """
        problem = self.problem_ if resume else make_problem()
        engine = self._make_engine(problem, max_iter=max_iter, tol=tol, convergence=convergence)
        state = engine.fit(clients, state=self.fedmm_state_ if resume else None)
        self.problem_ = problem
        self.fedmm_state_ = state
        self._record_fit(state, len(clients))
        return state

    def _can_resume(self):
        return hasattr(self, "fedmm_state_")

    def _record_fit(self, state, n_clients):
        history = state.history
        self.history_ = history
        self.n_iter_ = state.round
        self.n_clients_ = n_clients
        self.bits_up_ = int(np.sum(history.bits_up))
        self.bits_down_ = int(np.sum(history.bits_down))
