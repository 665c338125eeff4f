"""A round is applied whole or not at all: an exception anywhere in a round
leaves the last committed state, and resuming from it gives bitwise the
model of an uninterrupted run."""

import copy

import numpy as np
import pytest

from skfedmm import FedMM, FederatedDictionaryLearning
from skfedmm.problems import DictionaryLearningProblem

from ._helpers import CauchyLocation, make_clients


class Boom(Exception):
    pass


class Faulty(CauchyLocation):
    """The toy problem, raising once in ``where`` at server round ``at``."""

    def __init__(self, where, at, c=1.0, dim=3):
        super().__init__(c=c, dim=dim)
        self.where = where
        self.at = at
        self.calls = {"minimize": 0, "project": 0, "local_statistic": 0}

    def _maybe_raise(self, name, limit):
        self.calls[name] += 1
        if self.where == name and self.calls[name] == limit:
            raise Boom(name)

    def minimize(self, stat, theta_prev, rng=None):
        # call 1 is the initial round's M-step, call k + 1 is round k's
        self._maybe_raise("minimize", self.at + 1)
        return super().minimize(stat, theta_prev, rng)

    def project(self, stat):
        self._maybe_raise("project", self.at + 1)
        return super().project(stat)


ENGINE = dict(participation=0.6, compression="qsgd", random_state=3)


def _equal_states(a, b):
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_array_equal(a.s_hat, b.s_hat)
    np.testing.assert_array_equal(a.cv, b.cv)
    for ca, cb in zip(a.clients, b.clients):
        np.testing.assert_array_equal(ca.cv, cb.cv)
        assert ca.rng.bit_generator.state == cb.rng.bit_generator.state
    assert a.server_rng.bit_generator.state == b.server_rng.bit_generator.state
    assert a.mstep_rng.bit_generator.state == b.mstep_rng.bit_generator.state
    assert a.round == b.round
    np.testing.assert_array_equal(a.history["objective"], b.history["objective"])


@pytest.mark.parametrize("where", ["minimize", "project"])
@pytest.mark.parametrize("at", [1, 4, 8])
def test_server_exception_leaves_the_last_committed_state(where, at):
    clients = make_clients(n_clients=6)
    reference = FedMM(CauchyLocation(), max_iter=10, **ENGINE).fit(clients)
    committed = []
    engine = FedMM(Faulty(where, at), max_iter=10, **ENGINE)
    with pytest.raises(Boom):
        engine.fit(clients, on_commit=committed.append)
    last = committed[-1]
    assert last.round == at - 1
    assert len(last.history) == at
    resumed = FedMM(CauchyLocation(), **ENGINE).fit(clients, state=last, max_iter=10 - last.round)
    _equal_states(resumed, reference)


def test_failed_round_leaves_the_state_untouched():
    """A round that raises because too few clients answered changes nothing."""
    clients = make_clients(n_clients=4)
    state = FedMM(CauchyLocation(), max_iter=3, **ENGINE).fit(clients)
    snapshot = copy.deepcopy(state)

    class Down(CauchyLocation):
        def local_statistic(self, X, theta):
            raise Boom("client down")

    with pytest.raises(Boom):
        FedMM(Down(), min_clients=4, **ENGINE).fit(clients, state=state, max_iter=2)
    _equal_states(state, snapshot)
    reference = FedMM(CauchyLocation(), max_iter=5, **ENGINE).fit(clients)
    _equal_states(FedMM(CauchyLocation(), **ENGINE).fit(clients, state=state, max_iter=2), reference)


def test_callback_exception_after_a_committed_round():
    clients = make_clients(n_clients=5)
    reference = FedMM(CauchyLocation(), max_iter=9, **ENGINE).fit(clients)
    committed = []

    def callback(info):
        if info["round"] == 5:
            raise Boom("callback")

    with pytest.raises(Boom):
        FedMM(CauchyLocation(), max_iter=9, callback=callback, **ENGINE).fit(
            clients, on_commit=committed.append
        )
    assert committed[-1].round == 5
    resumed = FedMM(CauchyLocation(), **ENGINE).fit(clients, state=committed[-1], max_iter=4)
    _equal_states(resumed, reference)


def test_interrupted_warm_fit_resumes_bitwise(monkeypatch):
    """The estimator's public attributes describe the state a resumed fit
    continues from, and resuming gives bitwise the uninterrupted model."""
    rng = np.random.default_rng(0)
    clients = [rng.standard_normal((25, 6)) + i for i in range(5)]
    params = dict(n_components=4, alpha=0.1, tol=0.0, participation=0.6, compression="qsgd",
                  random_state=0)
    reference = FederatedDictionaryLearning(max_iter=10, **params).fit(clients)

    est = FederatedDictionaryLearning(max_iter=5, warm_start=True, **params).fit(clients)
    real = DictionaryLearningProblem.minimize
    calls = []

    def interrupted(self, stat, theta_prev, rng=None):
        calls.append(1)
        if len(calls) == 3:  # the M-step of round 8
            raise KeyboardInterrupt
        return real(self, stat, theta_prev, rng)

    monkeypatch.setattr(DictionaryLearningProblem, "minimize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        est.fit(clients)
    monkeypatch.setattr(DictionaryLearningProblem, "minimize", real)
    assert est.n_iter_ == est.fedmm_state_.round == 7
    assert len(est.error_) == 8
    assert est.components_ is est.fedmm_state_.theta
    est.set_params(max_iter=3).fit(clients)
    np.testing.assert_array_equal(est.components_, reference.components_)
    np.testing.assert_array_equal(est.error_, reference.error_)
