"""Client failures: absent for the round, recorded, warned once, never lost."""

import copy
import hashlib
import warnings

import numpy as np
import pytest

from skfedmm import FederatedDictionaryLearning, FedMM
from skfedmm.datasets import make_sparse_coded_clients
from skfedmm.engine import ClientFailureWarning
from skfedmm.problems import DictionaryLearningProblem, MMProblem

from ._helpers import CauchyLocation, make_clients


class Flaky(MMProblem):
    """Wraps a problem; ``local_statistic`` raises when ``fails(client, call)``.

    The client is recognized by a fingerprint of its rows (the wrapper sits
    around the clients' computation, the engine does not know about it);
    ``call`` counts that client's statistic computations (sequential runs).
    """

    def __init__(self, problem, clients, fails):
        self.problem = problem
        self.fingerprints = [self._fingerprint(X) for X in clients]
        self.fails = fails
        self.calls = {}

    @staticmethod
    def _fingerprint(X):
        return hashlib.sha1(np.ascontiguousarray(X[:2]).tobytes()).hexdigest()

    def init_statistic(self, X):
        return self.problem.init_statistic(X)

    def init_parameter(self, init_stat, rng):
        return self.problem.init_parameter(init_stat, rng)

    def local_statistic(self, X, theta):
        client = self.fingerprints.index(self._fingerprint(X))
        call = self.calls.get(client, 0)
        self.calls[client] = call + 1
        if self.fails(client, call, theta):
            raise ConnectionError(f"client {client} dropped")
        return self.problem.local_statistic(X, theta)

    def minimize(self, stat, theta_prev, rng=None):
        return self.problem.minimize(stat, theta_prev, rng)

    def project(self, stat):
        return self.problem.project(stat)

    def loss(self, X, theta):
        return self.problem.loss(X, theta)


def random_failures(prob, seed=0):
    def fails(client, call, theta):
        if call == 0:
            return False  # the initial full round succeeds
        digest = hashlib.sha1(f"{seed}-{client}-{call}".encode()).digest()
        return digest[0] / 256 < prob

    return fails


def test_random_failures_converge_to_the_same_objective():
    clients = make_clients(n_clients=6)
    ref = FedMM(CauchyLocation(), max_iter=80, random_state=0).fit(clients)
    flaky = Flaky(CauchyLocation(), clients, random_failures(0.25))
    with pytest.warns(ClientFailureWarning):
        state = FedMM(flaky, max_iter=200, random_state=0).fit(clients)
    n_failed = sum(len(f) for f in state.history.failed)
    assert n_failed > 50
    loss_ref, _ = FedMM(CauchyLocation()).evaluate(clients, ref.theta)
    loss, _ = FedMM(CauchyLocation()).evaluate(clients, state.theta)
    assert abs(loss - loss_ref) <= 1e-6 * abs(loss_ref)  # stated tolerance
    np.testing.assert_allclose(state.theta, ref.theta, atol=1e-5)


def test_fixed_failures_dictionary_learning():
    clients, _ = make_sparse_coded_clients(n_clients=5, n_samples=60, n_features=12,
                                           n_components=10, atoms_per_client=4, random_state=0)
    X = np.vstack(clients)
    problem = DictionaryLearningProblem(10, 0.1, 12)
    ref = FedMM(problem, max_iter=40, random_state=0).fit(clients)
    # client 1 is down for its statistic calls 3 to 8, client 4 for 10 to 12
    down = {1: range(3, 9), 4: range(10, 13)}
    flaky = Flaky(problem, clients, lambda c, call, theta: call in down.get(c, ()))
    with pytest.warns(ClientFailureWarning):
        state = FedMM(flaky, max_iter=40, random_state=0).fit(clients)
    failed = [(t, i, e) for t, f in enumerate(state.history.failed) for i, e in f]
    assert len(failed) == 6 + 3 and all(e == "ConnectionError" for _, _, e in failed)
    assert state.history["n_active"][4] == 4
    loss_ref = np.mean([problem.loss(X, ref.theta)])
    loss = np.mean([problem.loss(X, state.theta)])
    # nonconvex: another path may end in a nearby stationary point; 1% stated
    assert abs(loss - loss_ref) <= 1e-2 * loss_ref


def test_all_but_one_failing_uses_exactly_the_answering_statistic():
    clients = make_clients(n_clients=4)
    problem = CauchyLocation()
    # round 3: only client 2 answers
    fails = lambda c, call, theta: call == 3 and c != 2  # noqa: E731
    flaky = Flaky(problem, clients, fails)
    engine = FedMM(flaky, max_iter=2, cv_rate=0.5, random_state=0)
    state = engine.fit(clients)
    before = copy.deepcopy(state)
    with pytest.warns(ClientFailureWarning, match="client 0 failed at round 3"):
        state = engine.fit(clients, state=before if False else state, max_iter=1)
    assert state.history.failed[-1] == [(0, "ConnectionError"), (1, "ConnectionError"),
                                        (3, "ConnectionError")]
    # expected update from client 2's message alone, reweighted to the
    # sampled weight: S' = S + (V + (W_active / w_2) * w_2 * c_2), gamma = 1
    stat, _ = problem.local_statistic(clients[2], before.theta)
    s2 = before.layout.flatten(stat, np.float64)
    c2 = s2 - before.s_hat - before.clients[2].cv
    expected = before.s_hat + before.cv + 1.0 * c2
    np.testing.assert_allclose(state.s_hat, expected, rtol=1e-12)
    # only the answering client's control variate moved
    for i in (0, 1, 3):
        np.testing.assert_array_equal(state.clients[i].cv, before.clients[i].cv)
    np.testing.assert_allclose(state.clients[2].cv, before.clients[2].cv + 0.5 * c2)
    np.testing.assert_allclose(state.cv, before.cv + 0.5 * state.weights[2] * c2)


def test_warned_once_per_fit():
    clients = make_clients(n_clients=5)
    flaky = Flaky(CauchyLocation(), clients, random_failures(0.5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FedMM(flaky, max_iter=30, random_state=0).fit(clients)
    assert sum(issubclass(w.category, ClientFailureWarning) for w in caught) == 1


def test_too_few_answers_raise():
    clients = make_clients(n_clients=4)
    everyone_down = Flaky(CauchyLocation(), clients, lambda c, call, theta: call == 2)
    with pytest.warns(ClientFailureWarning):
        with pytest.raises(ConnectionError, match="round 2: 0 of 4 clients answered"):
            FedMM(everyone_down, max_iter=5, random_state=0).fit(clients)
    two_down = Flaky(CauchyLocation(), clients, lambda c, call, theta: call == 2 and c < 2)
    with pytest.warns(ClientFailureWarning):
        with pytest.raises(ConnectionError, match="min_clients=3"):
            FedMM(two_down, max_iter=5, min_clients=3, random_state=0).fit(clients)
    # with min_clients=2 the same round goes through
    with pytest.warns(ClientFailureWarning):
        FedMM(Flaky(CauchyLocation(), clients, lambda c, call, theta: call == 2 and c < 2),
              max_iter=5, min_clients=2, random_state=0).fit(clients)


def test_failures_in_the_initial_round():
    clients = make_clients(n_clients=4)
    flaky = Flaky(CauchyLocation(), clients, lambda c, call, theta: call == 0 and c == 1)
    with pytest.warns(ClientFailureWarning, match="round 0"):
        state = FedMM(flaky, max_iter=60, random_state=0).fit(clients)
    assert state.history.failed[0] == [(1, "ConnectionError")]
    ref = FedMM(CauchyLocation(), max_iter=60, random_state=0).fit(clients)
    np.testing.assert_allclose(state.theta, ref.theta, atol=1e-6)


def test_estimator_records_failures():
    clients, _ = make_sparse_coded_clients(n_clients=3, n_samples=40, n_features=8,
                                           n_components=6, atoms_per_client=3, random_state=0)
    est = FederatedDictionaryLearning(n_components=6, alpha=0.1, max_iter=3, random_state=0)
    est.fit(clients)
    assert all(f == [] for f in est.history_.failed)
    with pytest.raises(ValueError, match="min_clients"):
        FederatedDictionaryLearning(min_clients=0, max_iter=2).fit(clients)


class Slow(Flaky):
    """Sleeps (instead of raising) when ``fails(client, call)``."""

    seconds = 2.0

    def local_statistic(self, X, theta):
        import time

        client = self.fingerprints.index(self._fingerprint(X))
        call = self.calls.get(client, 0)
        self.calls[client] = call + 1
        if self.fails(client, call, theta):
            time.sleep(self.seconds)
        return self.problem.local_statistic(X, theta)


def test_slow_client_times_out_and_is_absent():
    import time

    clients = make_clients(n_clients=4)
    slow = Slow(CauchyLocation(), clients, lambda c, call, theta: c == 1 and call == 2)
    slow.seconds = 1.0
    with pytest.warns(ClientFailureWarning, match="TimeoutError"):
        state = FedMM(slow, max_iter=60, client_timeout=0.5, random_state=0,
                      callback=lambda info: time.sleep(0.05)).fit(clients)
    assert state.history.failed[2] == [(1, "TimeoutError")]
    # client 1 is not asked again while its abandoned computation (1 s) runs,
    # then it answers again
    late = [t for t, f in enumerate(state.history.failed) if f]
    assert late == list(range(2, 2 + len(late)))
    assert all(f == [(1, "TimeoutError")] for f in state.history.failed if f)
    assert late[-1] < 30
    ref = FedMM(CauchyLocation(), max_iter=60, random_state=0).fit(clients)
    np.testing.assert_allclose(state.theta, ref.theta, atol=1e-6)
    with pytest.raises(ValueError, match="client_timeout"):
        FedMM(CauchyLocation(), client_timeout=0).fit(clients)
