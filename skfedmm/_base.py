"""What every federated estimator shares: parameters, engine, fitted record."""

import numpy as np

from ._params import (
    ENGINE_PARAMS,
    FEDERATED_CONSTRAINTS,
    FEDERATED_PARAMS,
    FEDERATED_PARAMS_DOC,
    validate_params,
)
from .engine import FedMM
from .federation.local import ClientFailure

__all__ = ["FEDERATED_PARAMS", "FEDERATED_PARAMS_DOC", "FederatedMixin"]


def _same_value(a, b):
    """Equality of parameter values, arrays and lists of arrays included."""
    if a is b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if hasattr(a, "shape") or hasattr(b, "shape"):
        try:
            return bool(np.array_equal(np.asarray(a), np.asarray(b)))
        except (TypeError, ValueError):
            return False
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


class FederatedMixin:
    """Builds the engine from an estimator's parameters and records the fit.

    Subclasses declare ``_parameter_constraints`` (merging
    ``FederatedMixin._parameter_constraints``), and may list in
    ``_fixed_when_resuming`` the parameters that cannot change between a fit
    and a continued (``warm_start`` or ``partial_fit``) one, each with the
    reason, used in the error.
    """

    _parameter_constraints = dict(FEDERATED_CONSTRAINTS)

    #: name -> why it cannot change when training continues
    _fixed_when_resuming = {}

    def _validate_params(self):
        validate_params(
            self._parameter_constraints, self.get_params(deep=False), type(self).__name__
        )

    def _make_engine(self, problem, *, max_iter, tol, convergence):
        federated = {name: getattr(self, name) for name in ENGINE_PARAMS}
        return FedMM(
            problem,
            **federated,
            max_iter=max_iter,
            tol=tol,
            convergence=convergence,
            n_jobs=self.n_jobs,
            random_state=self.random_state,
            verbose=self.verbose,
            verbose_interval=getattr(self, "verbose_interval", 1),
            callback=self.callback,
        )

    def _check_resumable(self):
        """Raise if a parameter that cannot change mid-training has changed."""
        previous = getattr(self, "_resume_params", {})
        for name, why in self._fixed_when_resuming.items():
            old, new = previous.get(name), getattr(self, name)
            if not _same_value(old, new):
                raise ValueError(
                    f"{name} changed from {old!r} to {new!r} since the previous fit, but it "
                    f"cannot change when training continues ({why}); set warm_start=False "
                    "(or fit a new estimator) to train with the new value."
                )

    def _run_engine(
        self, clients, problem, *, max_iter, tol, convergence, resume, record, client_init=None,
        first_step=True,
    ):
        """Run (or continue) FedMM and record the fitted state.

        ``problem`` is built from the current, validated parameters; a
        continued run prepares it with the stored initialization statistic
        and continues from ``fedmm_state_``. ``record(state)`` sets the
        estimator's own fitted attributes; it runs after every committed
        round, so that an interrupted fit leaves attributes that describe the
        state a resumed fit continues from.
        """
        if resume:
            self._check_resumable()
        engine = self._make_engine(problem, max_iter=max_iter, tol=tol, convergence=convergence)
        n_clients = len(clients)

        def on_commit(state):
            self.fedmm_state_ = state
            self.problem_ = state.problem
            self._record_fit(state, n_clients)
            record(state)

        self._resume_params = {name: getattr(self, name) for name in self._fixed_when_resuming}
        return engine.fit(
            clients, state=self.fedmm_state_ if resume else None, on_commit=on_commit,
            client_init=None if resume else client_init, first_step=first_step,
        )

    def fit_transport(self, transport, **fit_params):
        """Fit on clients reached through a transport (their rows stay there).

        The estimator's own ``fit`` runs unchanged, with the clients'
        shapes as the transport reports them (``n_features_in_`` from the
        clients' first answer, client weights from their row counts);
        every round goes through ``transport``. Fit parameters that hold
        per-row data (``client_ids``, ``code_init``) cannot be used: those
        rows are on the clients.

        Parameters
        ----------
        transport : Transport
            A transport reporting its clients' ``n_features``, for example
            :class:`skfedmm.flower.FlowerTransport`.
        **fit_params : dict
            Other parameters of ``fit`` (for example ``target``).

        Returns
        -------
        self : object
            The fitted estimator, an ordinary one: ``transform`` and
            ``predict`` need no transport.
        """
        from .federation.transport import RemoteClients

        return self.fit(RemoteClients(transport), **fit_params)

    def _client_losses(self, clients, theta):
        """Each client's mean loss at ``theta`` on all its rows (the ``"loss"`` task).

        Runs wherever the clients are (in-process or through a transport);
        only the losses come back. Raises if a client does not answer: an
        exact evaluation needs every client.
        """
        engine = self._make_engine(self.problem_, max_iter=0, tol=0.0, convergence="objective")
        transport = engine._transport(clients)
        n = transport.n_clients
        with transport:
            results = transport.run("loss", range(n), self.problem_, theta, n > 1)
        losses = []
        for i, res in enumerate(results):
            if isinstance(res, ClientFailure):
                raise RuntimeError(
                    f"client {i} failed in the final evaluation ({res.error}: {res.message})"
                ) from res.exception
            losses.append(float(res))
        return np.array(losses)

    def _can_resume(self):
        return hasattr(self, "fedmm_state_")

    def _record_fit(self, state, n_clients):
        history = state.history
        self.history_ = history
        self.n_iter_ = state.round
        self.n_clients_ = n_clients
        self.bits_up_ = int(np.sum(history.bits_up))
        self.bits_down_ = int(np.sum(history.bits_down))
