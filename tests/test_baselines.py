"""The gradient baselines (FedAvg, FedProx, SCAFFOLD) in the FedMM engine.

- the problems' gradients against finite differences (dictionary, OT);
- with one local step, full participation and exact messages, all three are
  projected gradient descent on the pooled objective (an exact invariant);
- FedProx with mu=0 is FedAvg; SCAFFOLD's server control variate is the
  weighted sum of the clients' at every round;
- problems and transports that cannot run them say so before any round;
- the engine's guarantees: n_jobs-independent results, failures, resume.
"""

import warnings

import numpy as np
import pytest

from skfedmm import (
    FedMM,
    FederatedDictionaryLearning,
    FederatedGaussianMixture,
    FederatedOTMap,
)
from skfedmm.baselines import local_gradient_steps, scaffold_control_change
from skfedmm.engine import ClientFailureWarning, client_weights
from skfedmm.problems import DictionaryLearningProblem, EntropicOTProblem

from ._helpers import CauchyLocation, make_clients
from .test_failures import Flaky


def dict_setup(seed=0, sizes=(30, 45, 60), d=6, k=4, precise=False):
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((k, d))
    clients = []
    for i, n in enumerate(sizes):
        # heterogeneous: each client mostly uses its own atoms
        codes = rng.standard_normal((n, k)) * (rng.random(k) < 0.7) * (1 + i)
        clients.append(codes @ atoms + 0.1 * rng.standard_normal((n, d)))
    coder = dict(coder_tol=1e-12, coder_max_iter=10_000) if precise else {}
    problem = DictionaryLearningProblem(k, 0.1, d, **coder)
    return clients, problem


def ot_setup(seed=0, sizes=(30, 45, 60), d=3, m=15):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((sum(sizes), d))
    X = X[np.argsort(X[:, 0])]  # sorted clients: heterogeneous
    clients = np.split(X, np.cumsum(sizes)[:-1])
    problem = EntropicOTProblem(rng.standard_normal((m, d)) + 0.5, epsilon=0.3)
    return clients, problem


SETUPS = {"dictionary": lambda: dict_setup(precise=True), "ot": ot_setup}


# ------------------------------------------------------------ gradients
@pytest.mark.parametrize("kind", ["dictionary", "ot"])
def test_gradient_matches_finite_differences(kind):
    clients, problem = SETUPS[kind]()
    X = np.vstack(clients)
    problem = problem.prepare(problem.init_statistic(X))
    rng = np.random.default_rng(1)
    theta = problem.init_parameter(problem.init_statistic(X), rng)
    if kind == "dictionary":
        theta = problem.project_parameter(theta + 0.3 * rng.standard_normal(theta.shape))
    else:
        theta = theta + rng.standard_normal(theta.shape)
    grad, loss = problem.gradient(X, theta)
    assert grad.shape == theta.shape
    assert loss == pytest.approx(problem.loss(X, theta), rel=1e-12)
    h = 1e-6
    for _ in range(4):
        direction = rng.standard_normal(theta.shape)
        fd = (problem.loss(X, theta + h * direction) - problem.loss(X, theta - h * direction)) / (2 * h)
        assert np.vdot(grad, direction) == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_local_gradient_steps_projects_all_but_the_last_iterate():
    x0 = np.array([3.0, 0.0])
    calls = []

    def gradient(y):
        calls.append(y.copy())
        return y.copy(), float(y @ y)  # f = |y|^2 / 2

    def project(y):
        return y / max(np.linalg.norm(y), 1.0)

    y, loss = local_gradient_steps(gradient, project, x0, steps=2, learning_rate=0.5)
    assert loss == 9.0
    np.testing.assert_array_equal(calls[0], x0)
    np.testing.assert_allclose(calls[1], [1.0, 0.0])  # 1.5 projected to the ball
    np.testing.assert_allclose(y, [0.5, 0.0])  # last step not projected
    # SCAFFOLD's change: the mean gradient along the path, minus c
    c = np.array([0.1, 0.2])
    np.testing.assert_allclose(
        scaffold_control_change(x0, y, c, steps=2, learning_rate=0.5), (x0 - y) / 1.0 - c
    )


# ------------------------------------------- exact invariant: pooled PGD
def pooled_projected_gd(clients, engine, rounds):
    """Projected gradient descent on sum_i w_i f_i from the engine's theta_0."""
    init = FedMM(engine.problem, aggregation=engine.aggregation, max_iter=0,
                 random_state=engine.random_state).fit(clients)
    problem, theta = init.problem, init.theta
    lr = engine._learning_rate(problem, init.init_stat)
    w = client_weights([len(X) for X in clients])
    thetas = []
    for _ in range(rounds):
        grad = sum(wi * problem.gradient(X, theta)[0] for wi, X in zip(w, clients))
        theta = problem.project_parameter(theta - lr * grad)
        thetas.append(theta)
    return thetas


@pytest.mark.parametrize("kind", ["dictionary", "ot"])
@pytest.mark.parametrize("aggregation", ["fedavg", "fedprox", "scaffold"])
def test_one_local_step_is_pooled_projected_gradient_descent(kind, aggregation):
    clients, problem = SETUPS[kind]()
    thetas = []
    engine = FedMM(problem, aggregation=aggregation, mu=3.0, random_state=0,
                   max_iter=6, callback=lambda info: thetas.append(info["theta"]))
    state = engine.fit(clients)
    expected = pooled_projected_gd(clients, engine, 6)
    assert len(thetas) == 7  # the initial round's (theta_0) and six rounds'
    thetas = thetas[1:]
    for got, want in zip(thetas, expected):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    # and it moved: the invariant is not vacuous
    assert not np.allclose(expected[0], expected[-1])
    # exact rounds: the objective is the pooled loss at theta_t, decreasing
    objective = np.asarray(state.history.full_objective)[1:]
    assert np.all(np.isfinite(objective))
    assert objective[-1] < objective[0]


def test_fedprox_with_mu_zero_is_fedavg_bitwise():
    clients, problem = dict_setup()
    common = dict(learning_rate=0.3, local_steps=3, participation=0.7, batch_size=20,
                  compression=("qsgd", {"s": 8}), max_iter=4, random_state=0)
    a = FedMM(problem, aggregation="fedavg", **common).fit(clients)
    b = FedMM(problem, aggregation="fedprox", mu=0.0, **common).fit(clients)
    c = FedMM(problem, aggregation="fedprox", mu=1.0, **common).fit(clients)
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_array_equal(a.history.objective, b.history.objective)
    assert not np.array_equal(a.theta, c.theta)  # mu acts


def test_fedprox_shrinks_the_local_drift():
    """With many local steps, a large mu keeps each client's iterate near theta_t."""
    clients, problem = dict_setup()
    common = dict(learning_rate=0.05, local_steps=20, max_iter=1, random_state=0)
    change = {
        mu: np.linalg.norm(FedMM(problem, aggregation="fedprox", mu=mu, **common).fit(clients)
                           .history.param_change[-1])
        for mu in (0.0, 10.0)
    }
    assert change[10.0] < 0.5 * change[0.0]


def test_scaffold_control_variates_stay_consistent():
    """c = sum_i w_i c_i at every round (partial participation, compression)."""
    clients, problem = dict_setup()
    states = []
    engine = FedMM(problem, aggregation="scaffold", learning_rate=0.3, local_steps=3,
                   participation=0.6, compression=("qsgd", {"s": 4}), max_iter=6,
                   random_state=0)
    engine.fit(clients, on_commit=states.append)
    moved = False
    for state in states:
        mirrored = sum(w * c.cv for w, c in zip(state.weights, state.clients))
        np.testing.assert_allclose(state.cv, mirrored, rtol=1e-10, atol=1e-12)
        moved |= bool(np.any(state.cv != 0))
    assert moved
    # SCAFFOLD's messages are twice as large, its downlink carries c as well
    fedavg = FedMM(problem, aggregation="fedavg", learning_rate=0.3, local_steps=3,
                   max_iter=2, random_state=0).fit(clients)
    scaffold = FedMM(problem, aggregation="scaffold", learning_rate=0.3, local_steps=3,
                     max_iter=2, random_state=0).fit(clients)
    assert scaffold.history.bits_up[1] - 64 * 3 == 2 * (fedavg.history.bits_up[1] - 64 * 3)
    assert scaffold.history.bits_down[1] == 2 * fedavg.history.bits_down[1]


# ----------------------------------------------------- clear refusals
@pytest.mark.parametrize("aggregation", ["fedavg", "fedprox", "scaffold"])
def test_problem_without_gradient_is_refused(aggregation):
    with pytest.raises(ValueError, match="does not provide the gradient"):
        FedMM(CauchyLocation(), aggregation=aggregation).fit(make_clients())
    X = np.random.default_rng(0).standard_normal((40, 2))
    with pytest.raises(ValueError, match="does not provide the gradient"):
        FederatedGaussianMixture(n_components=2, aggregation=aggregation).fit(X)


def test_auto_learning_rate_needs_a_problem_default():
    class WithGradient(CauchyLocation):
        def gradient(self, X, theta):
            diff = theta - X
            sq = np.sum(diff**2, axis=1)
            grad = np.mean(2 * diff / (self.c + sq)[:, None], axis=0)
            return grad, float(np.mean(np.log1p(sq / self.c)))

    with pytest.raises(ValueError, match="proposes no learning rate"):
        FedMM(WithGradient(), aggregation="fedavg").fit(make_clients())
    state = FedMM(WithGradient(), aggregation="fedavg", learning_rate=0.5, max_iter=30,
                  random_state=0).fit(make_clients())
    objective = np.asarray(state.history.full_objective)[1:]
    assert objective[-1] < objective[0]


def test_gradient_baselines_are_refused_on_flower():
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    from skfedmm.flower import FlowerTransport

    from .test_flower import MemoryGrid, _nodes

    nodes = _nodes()
    saved = {k: getattr(TaskIdentity, f"_{k}", None) for k in ("run_id", "node_id", "task_id")}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        for aggregation in ("fedavg", "fedprox", "scaffold"):
            transport = FlowerTransport(MemoryGrid(nodes))
            with pytest.raises(ValueError, match="FlowerTransport does not run"):
                FederatedDictionaryLearning(
                    n_components=3, aggregation=aggregation, max_iter=2
                ).fit_transport(transport)
            assert transport.calls == []  # refused before any task
        # parameter averaging still runs there
        FederatedDictionaryLearning(n_components=3, aggregation="parameter", max_iter=1).fit_transport(
            FlowerTransport(MemoryGrid(nodes)))
    finally:
        for k, v in saved.items():
            setattr(TaskIdentity, f"_{k}", v)


# ------------------------------------------------ engine guarantees
@pytest.mark.parametrize("aggregation", ["fedavg", "fedprox", "scaffold"])
def test_results_do_not_depend_on_n_jobs(aggregation):
    clients, problem = ot_setup()
    common = dict(aggregation=aggregation, local_steps=3, participation=0.7, batch_size=25,
                  compression=("qsgd", {"s": 4}), max_iter=4, random_state=0)
    one = FedMM(problem, n_jobs=1, **common).fit(clients)
    two = FedMM(problem, n_jobs=2, **common).fit(clients)
    np.testing.assert_array_equal(one.theta, two.theta)
    np.testing.assert_array_equal(one.history.objective, two.history.objective)
    if aggregation == "scaffold":
        np.testing.assert_array_equal(one.cv, two.cv)


@pytest.mark.parametrize("aggregation", ["fedavg", "scaffold"])
def test_resumed_run_is_bitwise_one_run(aggregation):
    clients, problem = dict_setup()
    params = dict(aggregation=aggregation, learning_rate=0.3, local_steps=2, participation=0.7,
                  compression=("qsgd", {"s": 4}), random_state=0)
    whole = FedMM(problem, max_iter=6, **params).fit(clients)
    half = FedMM(problem, max_iter=3, **params).fit(clients)
    resumed = FedMM(problem, max_iter=3, **params).fit(clients, state=half)
    np.testing.assert_array_equal(resumed.theta, whole.theta)
    np.testing.assert_array_equal(resumed.history.objective, whole.history.objective)
    if aggregation == "scaffold":
        np.testing.assert_array_equal(resumed.cv, whole.cv)
    # the aggregation cannot change between baselines either
    other = "fedprox" if aggregation == "fedavg" else "fedavg"
    with pytest.raises(ValueError, match="aggregation cannot change"):
        FedMM(problem, **{**params, "aggregation": other}).fit(clients, state=half)
    with pytest.raises(ValueError, match="aggregation cannot change"):
        FedMM(problem, **{**params, "aggregation": "surrogate"}).fit(clients, state=half)
    # a state that does not record its aggregation (saved before it was recorded)
    if aggregation == "fedavg":
        from dataclasses import replace

        with pytest.raises(ValueError, match="aggregation cannot change"):
            FedMM(problem, **{**params, "aggregation": "scaffold"}).fit(
                clients, state=replace(half, aggregation=None))


def test_estimator_warm_start_continues_a_baseline():
    clients, _ = dict_setup()
    params = dict(n_components=4, alpha=0.1, aggregation="scaffold", learning_rate=0.3,
                  tol=0, random_state=0)
    whole = FederatedDictionaryLearning(max_iter=6, **params).fit(clients)
    est = FederatedDictionaryLearning(max_iter=3, warm_start=True, **params).fit(clients)
    est.fit(clients)
    np.testing.assert_array_equal(est.components_, whole.components_)
    est.set_params(aggregation="fedavg")
    with pytest.raises(ValueError, match="aggregation changed"):
        est.fit(clients)


class FlakyGradient(Flaky):
    """:class:`Flaky` whose failures strike the gradient computation."""

    def gradient(self, X, theta):
        client = self.fingerprints.index(self._fingerprint(X))
        call = self.calls.get(client, 0)
        self.calls[client] = call + 1
        if self.fails(client, call, theta):
            raise ConnectionError(f"client {client} dropped")
        return self.problem.gradient(X, theta)

    def project_parameter(self, theta):
        return self.problem.project_parameter(theta)

    def default_learning_rate(self, init_stat):
        return self.problem.default_learning_rate(init_stat)


@pytest.mark.parametrize("aggregation", ["fedavg", "scaffold"])
def test_a_failing_client_is_absent_and_its_state_unchanged(aggregation):
    clients, problem = ot_setup()
    flaky = FlakyGradient(problem.prepare(problem.init_statistic(np.vstack(clients))), clients,
                          lambda client, call, theta: client == 1 and call >= 2)
    problem = flaky.problem
    # the wrapper is prepared already: prepare() of the wrapped problem is the identity
    states = []
    with pytest.warns(ClientFailureWarning, match="client 1 failed"):
        FedMM(flaky, aggregation=aggregation, local_steps=1, max_iter=4,
              random_state=0).fit(clients, on_commit=states.append)
    failed = [row for state in states[-1:] for row in state.history.failed]
    assert [i for row in failed for i, _ in row] == [1, 1]  # rounds 3 and 4
    # the failed client's stream and control variate did not move
    assert states[-1].clients[1].rng.bit_generator.state == states[2].clients[1].rng.bit_generator.state
    if aggregation == "scaffold":
        np.testing.assert_array_equal(states[-1].clients[1].cv, states[2].clients[1].cv)
        mirrored = sum(w * c.cv for w, c in zip(states[-1].weights, states[-1].clients))
        np.testing.assert_allclose(states[-1].cv, mirrored, rtol=1e-10, atol=1e-14)
    # a round without client 1 is the answering clients' reweighted update
    for state in states[3:]:
        assert state.history.n_active[-1] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClientFailureWarning)
        with pytest.raises(ConnectionError, match="client 1 dropped"):
            FedMM(flaky, aggregation=aggregation, max_iter=4, min_clients=3,
                  random_state=0).fit(clients)
