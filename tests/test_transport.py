"""The round loop reaches clients only through a transport: a transport
written here (sequential, every payload and answer through pickle, as over a
wire) gives bitwise the model of the local transport."""

import pickle

import numpy as np
import pytest

from skfedmm import FedMM, FederatedDictionaryLearning
from skfedmm.federation import LocalTransport, Transport
from skfedmm.federation.client import CLIENT_TASKS
from skfedmm.federation.local import ClientFailure

from ._helpers import CauchyLocation, make_clients


class WireTransport(Transport):
    """Clients behind a wire: the payload and the answers are bytes."""

    def __init__(self, clients):
        self._clients = [np.array(X) for X in clients]
        self.calls = []

    @property
    def n_clients(self):
        return len(self._clients)

    @property
    def n_rows(self):
        return np.array([len(X) for X in self._clients])

    @property
    def dtype(self):
        return self._clients[0].dtype

    def run(self, task, indices, problem, *args, states=None, per_client=None):
        self.calls.append(task)
        wire = pickle.dumps((problem, args))
        answers = []
        for i in indices:
            problem_i, args_i = pickle.loads(wire)
            head = () if states is None else (pickle.loads(pickle.dumps(states[i])),)
            tail = () if per_client is None else (per_client[i],)
            try:
                out = CLIENT_TASKS[task](problem_i, self._clients[i], *head, *args_i, *tail)
            except Exception as exc:  # noqa: BLE001
                out = ClientFailure(type(exc).__name__, str(exc), exc)
            answers.append(pickle.loads(pickle.dumps(out)))
        return answers


@pytest.mark.parametrize("aggregation", ["surrogate", "parameter"])
def test_a_user_transport_gives_the_local_model(aggregation):
    clients = make_clients(n_clients=5)
    params = dict(max_iter=6, participation=0.6, compression="qsgd", aggregation=aggregation,
                  random_state=0, eval_every=2)
    local = FedMM(CauchyLocation(), **params).fit(clients)
    wire = WireTransport(clients)
    remote = FedMM(CauchyLocation(), **params).fit(wire)
    np.testing.assert_array_equal(remote.theta, local.theta)
    np.testing.assert_array_equal(remote.history["objective"], local.history["objective"])
    assert wire.calls[0] == "init" and aggregation in wire.calls and "loss" in wire.calls


def test_local_transport_runs_only_when_entered():
    transport = LocalTransport(make_clients(n_clients=2))
    with pytest.raises(RuntimeError, match="Enter the transport"):
        transport.run("loss", [0], CauchyLocation(), np.zeros(3), False)
    with transport:
        (loss,) = transport.run("loss", [1], CauchyLocation(), np.zeros(3), False)
    assert np.isfinite(loss)


def test_client_failure_through_a_transport_is_recorded():
    class Flaky(WireTransport):
        def run(self, task, indices, problem, *args, **kwargs):
            answers = super().run(task, indices, problem, *args, **kwargs)
            if task == "surrogate":
                answers = [ClientFailure("ConnectionError", "node 3 is gone")
                           if i == 3 else a for i, a in zip(indices, answers)]
            return answers

    with pytest.warns(UserWarning, match="client 3 failed"):
        state = FedMM(CauchyLocation(), max_iter=3, random_state=0).fit(Flaky(make_clients()))
    assert all((3, "ConnectionError") in row for row in state.history.failed[1:])


def test_estimators_accept_any_split_through_the_local_transport():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 5))
    est = FederatedDictionaryLearning(n_components=3, max_iter=3, random_state=0)
    a = est.fit([X[:20], X[20:]]).components_
    b = FederatedDictionaryLearning(n_components=3, max_iter=3, random_state=0).fit(
        X, client_ids=np.repeat([0, 1], [20, 40])).components_
    np.testing.assert_allclose(a, b, atol=1e-12)
