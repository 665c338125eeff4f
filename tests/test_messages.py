"""Every message is checked on arrival, against what the problem declares.

A malformed or out-of-range message is a failure of *that* client in that
round: recorded like any failure, counted against ``min_clients``, named in
the warning or error. A bad message changes the model exactly as if that
client had been absent.
"""

import warnings

import numpy as np
import pytest

from skfedmm import FedMM, FederatedDictionaryLearning, FederatedOTMap
from skfedmm._messages import InvalidMessageError, StatLayout
from skfedmm.engine import ClientFailureWarning
from skfedmm.problems import DictionaryLearningProblem
from skfedmm.problems.ot import EntropicOTProblem

from ._helpers import CauchyLocation, make_clients

BAD_ROWS = 40 + 7 * 2  # client 2 of make_clients(): the faulty one


class Sends(CauchyLocation):
    """Client 2 sends ``bad(stat)`` instead of its statistic (from round ``at``)."""

    def __init__(self, bad, at=0, c=1.0, dim=3):
        super().__init__(c=c, dim=dim)
        self.bad = bad
        self.at = at
        self.rounds = {}

    def local_statistic(self, X, theta):
        stat, loss = super().local_statistic(X, theta)
        if X.shape[0] == BAD_ROWS:
            seen = self.rounds[X.shape[0]] = self.rounds.get(X.shape[0], -1) + 1
            if seen >= self.at:
                return self.bad(stat), loss
        return stat, loss


class Absent(CauchyLocation):
    """Client 2 fails from round ``at`` (the reference: a bad message == absence)."""

    def __init__(self, at=0, c=1.0, dim=3):
        super().__init__(c=c, dim=dim)
        self.at = at
        self.rounds = {}

    def local_statistic(self, X, theta):
        if X.shape[0] == BAD_ROWS:
            seen = self.rounds[X.shape[0]] = self.rounds.get(X.shape[0], -1) + 1
            if seen >= self.at:
                raise RuntimeError("absent")
        return super().local_statistic(X, theta)


BAD_VALUES = {
    "negative w": lambda s: {**s, "w": np.array([-1.0])},
    "huge w": lambda s: {**s, "w": np.array([1e300])},
    "huge wx": lambda s: {**s, "wx": np.full(3, 1e300)},
    "nan": lambda s: {**s, "wx": np.full(3, np.nan)},
}

BAD_FORMS = {
    "wrong shape": lambda s: {**s, "wx": np.zeros(4)},
    "missing key": lambda s: {"wx": s["wx"]},
    "extra key": lambda s: {**s, "spy": np.zeros(2)},
    "not a dict": lambda s: [s["wx"], s["w"]],
    "complex": lambda s: {**s, "wx": s["wx"] + 1j},
    "strings": lambda s: {**s, "w": np.array(["1"])},
}


def _fit(problem, **kwargs):
    params = dict(max_iter=6, random_state=0, participation=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = FedMM(problem, **{**params, **kwargs}).fit(make_clients())
    return state, [w for w in caught if issubclass(w.category, ClientFailureWarning)]


@pytest.mark.parametrize("name", list(BAD_VALUES) + list(BAD_FORMS))
@pytest.mark.parametrize("at", [0, 3])
def test_bad_message_is_a_failure_of_that_client(name, at):
    bad = {**BAD_VALUES, **BAD_FORMS}[name]
    state, caught = _fit(Sends(bad, at=at))
    failed = [f for row in state.history.failed for f in row]
    assert failed and all(i == 2 for i, _ in failed), failed
    assert len(caught) == 1 and "client 2" in str(caught[0].message)
    # exactly as if client 2 had been absent from that round on
    reference, _ = _fit(Absent(at=at))
    np.testing.assert_array_equal(state.theta, reference.theta)
    assert [f[0] for row in reference.history.failed for f in row] == [i for i, _ in failed]


def test_bad_message_counts_against_min_clients():
    with pytest.raises(InvalidMessageError, match="client 2 sent an invalid message at round 2"):
        _fit(Sends(BAD_VALUES["negative w"], at=2), min_clients=5)


def test_first_client_cannot_impose_its_layout():
    """In the initial round the faulty client is the first: honest ones are not blamed."""

    class FirstSendsWrong(CauchyLocation):
        def local_statistic(self, X, theta):
            stat, loss = super().local_statistic(X, theta)
            if X.shape[0] == 40:  # client 0
                stat = {"wx": np.zeros(5), "w": stat["w"]}
            return stat, loss

    state, caught = _fit(FirstSendsWrong())
    assert [f[0] for row in state.history.failed for f in row] == [0] * 7
    assert state.layout == StatLayout({"wx": (3,), "w": (1,)})


def test_bad_initialization_statistic():
    class BadInit(CauchyLocation):
        def init_statistic(self, X):
            if X.shape[0] == 40:
                return {"mean": X.mean(axis=0), "extra": np.ones(1)}
            return super().init_statistic(X)

    state, caught = _fit(BadInit(), max_iter=1)
    assert state.history.failed[0][0] == (0, "InvalidMessageError")
    assert "client 0" in str(caught[0].message)


def test_dictionary_statistic_range():
    problem = DictionaryLearningProblem(3, 0.1, 4)
    D = np.eye(3, 4)
    X = np.random.default_rng(0).standard_normal((20, 4))
    stat, _ = problem.local_statistic(X, D)
    assert problem.check_statistic(stat, D) is None
    A = stat["A"].copy()
    A[0, 0] = -1
    assert "negative" in problem.check_statistic({**stat, "A": A}, D)
    A = stat["A"].copy()
    A[0, 1] = A[1, 0] = 1e6
    assert "second moment" in problem.check_statistic({**stat, "A": A}, D)


def test_ot_client_reporting_negative_mass_is_rejected():
    rng = np.random.default_rng(0)
    clients = [rng.standard_normal((50, 2)) + i for i in range(3)]
    target = rng.standard_normal((30, 2))
    real = EntropicOTProblem.local_statistic

    def lying(self, X, theta):
        stat, loss = real(self, X, theta)
        if X.shape[0] == 50 and np.allclose(X.mean(axis=0), clients[1].mean(axis=0)):
            mass = stat["mass"].copy()
            mass[0] -= 1.0
            mass[1] += 1.0
            return {"mass": mass}, loss
        return stat, loss

    EntropicOTProblem.local_statistic = lying
    try:
        with pytest.warns(ClientFailureWarning, match="client 1"):
            est = FederatedOTMap(max_iter=5, tol=0, random_state=0).fit(
                clients, **_target_kwarg(target))
    finally:
        EntropicOTProblem.local_statistic = real
    failed = {i for row in est.history_.failed for i, _ in row}
    assert failed == {1}
    assert est.n_iter_ == 5
    assert np.all(np.isfinite(est.potential_))


def _target_kwarg(target):
    return {"target": target}


def test_estimator_with_a_bad_client_names_it():
    rng = np.random.default_rng(0)
    clients = [rng.standard_normal((20, 4)) for _ in range(3)]
    # (the coder behind local_statistic and the warm-started cached_statistic)
    real = DictionaryLearningProblem._coded_statistic

    def lying(self, X, theta, *args, **kwargs):
        stat, loss, codes = real(self, X, theta, *args, **kwargs)
        if np.array_equal(X, clients[2]):
            stat = {**stat, "A": -stat["A"]}
        return stat, loss, codes

    DictionaryLearningProblem._coded_statistic = lying
    try:
        with pytest.raises(InvalidMessageError, match="client 2"):
            FederatedDictionaryLearning(n_components=3, max_iter=2, min_clients=3,
                                        random_state=0).fit(clients)
    finally:
        DictionaryLearningProblem._coded_statistic = real
