"""The FedMM engine on a toy MM problem defined here (the plug-in contract)."""

import copy

import numpy as np
import pytest
from joblib import parallel_config

from skfedmm import QSGD, FedMM, PolynomialDecay, RandK
from skfedmm.engine import aggregate, auto_step_size, client_weights

from ._helpers import CauchyLocation, Halve, make_clients


def batch_mm(problem, X, theta0, n_steps):
    """Plain centralized MM on pooled rows: theta <- T(sbar(theta))."""
    theta = theta0
    losses = []
    for _ in range(n_steps):
        stat, loss = problem.local_statistic(X, theta)
        losses.append(loss)
        theta = problem.minimize(stat, theta)
    return theta, losses


def initial_theta(problem, clients, seed):
    state = FedMM(problem, max_iter=0, random_state=seed).fit(clients)
    # theta after the initial round is T(sbar(theta0)); recover theta0 the
    # same way the engine draws it.
    return state


@pytest.mark.parametrize("cv_rate", [0.0, 0.3, 1.0, "auto"])
@pytest.mark.parametrize("n_clients", [1, 2, 5])
def test_batch_fedmm_is_batch_mm(cv_rate, n_clients):
    pooled = np.vstack(make_clients())
    # the same rows split into n_clients contiguous blocks
    clients = np.array_split(pooled, n_clients)
    problem = CauchyLocation()
    n_rounds = 6
    engine = FedMM(problem, max_iter=n_rounds, cv_rate=cv_rate, random_state=0)
    state = engine.fit(clients)
    # theta_0 as the engine drew it: its init stat is the pooled mean
    theta0 = FedMM(problem, max_iter=0, random_state=0)
    # rerun the initialization deterministically to get theta0
    seeds = theta0._streams().spawn(len(clients) + 2)
    init_rng = np.random.default_rng(seeds[1])
    weights = client_weights([len(c) for c in clients])
    init_stat = {"mean": aggregate([c.mean(axis=0) for c in clients], weights)}
    t0 = problem.init_parameter(init_stat, init_rng)
    expected, losses = batch_mm(problem, pooled, t0, n_rounds + 1)
    np.testing.assert_allclose(state.theta, expected, rtol=1e-12, atol=1e-12)
    # the recorded objectives are the batch-MM losses at theta_0..theta_T
    np.testing.assert_allclose(state.history["objective"], losses, rtol=1e-12)


def test_batch_fedmm_server_statistic_is_sbar():
    """S_hat_{t+1} = sbar(theta_t) each round, whatever alpha."""
    clients = make_clients()
    problem = CauchyLocation()
    records = []
    engine = FedMM(problem, max_iter=4, cv_rate=0.7, random_state=1,
                   callback=lambda info: records.append(info["theta"].copy()))
    state = FedMM(problem, max_iter=0, cv_rate=0.7, random_state=1).fit(clients)
    for _ in range(4):
        theta_t = state.theta.copy()
        loss, sbar = engine.evaluate(clients, theta_t)
        state = FedMM(problem, max_iter=1, cv_rate=0.7, random_state=1).fit(clients, state=state)
        flat = state.layout.flatten(sbar, np.float64)
        np.testing.assert_allclose(state.s_hat, flat, rtol=1e-12)
    np.testing.assert_allclose(engine.fit(clients).theta, state.theta, rtol=1e-12)


def test_split_invariance_of_batch_iterates():
    pooled = np.vstack(make_clients())
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(pooled))
    problem = CauchyLocation()
    thetas = []
    for split in ([len(pooled)], [10, 50, 100], [1, 2, 3, 4]):
        bounds = np.cumsum(split)[:-1] if len(split) > 1 else []
        clients = np.split(pooled[perm], bounds) if len(split) > 1 else [pooled]
        thetas.append(FedMM(problem, max_iter=5, random_state=0).fit(clients).theta)
    for theta in thetas[1:]:
        np.testing.assert_allclose(theta, thetas[0], rtol=1e-12, atol=1e-13)


def test_objective_never_increases_in_batch_mode():
    state = FedMM(CauchyLocation(), max_iter=15, random_state=0).fit(make_clients())
    obj = state.history["objective"]
    assert np.all(np.diff(obj) <= 1e-12), obj


def test_cv_rate_zero_keeps_control_variates_at_zero():
    clients = make_clients()
    state = FedMM(
        CauchyLocation(), max_iter=8, cv_rate=0.0, participation=0.5,
        compression=QSGD(s=2), random_state=0,
    ).fit(clients)
    assert np.all(state.cv == 0)
    for client in state.clients:
        assert np.all(client.cv == 0)


def test_control_variates_track_the_aggregate():
    """V = sum_i w_i V_i holds after any number of noisy rounds."""
    clients = make_clients()
    state = FedMM(
        CauchyLocation(), max_iter=10, participation=0.6, compression=RandK(k=2),
        random_state=0,
    ).fit(clients)
    total = aggregate([c.cv for c in state.clients], state.weights)
    np.testing.assert_allclose(state.cv, total, atol=1e-12)
    assert np.any(state.cv != 0)


@pytest.mark.parametrize("compression", [None, QSGD(s=2), RandK(k=1)])
@pytest.mark.parametrize("scheme", ["bernoulli", "fixed"])
def test_mean_field_estimate_is_unbiased(compression, scheme):
    """E[H_t | past] = sbar(theta_t) - S_hat_t, by Monte Carlo over rounds."""
    clients = make_clients(n_clients=4, n=20)

    class Unprojected(CauchyLocation):
        # H is unbiased before the projection; measure it there.
        def project(self, stat):
            return stat

    problem = Unprojected()
    gamma = 0.5
    kwargs = dict(participation=0.5, participation_scheme=scheme, compression=compression,
                  step_size=gamma)
    state = FedMM(problem, max_iter=3, random_state=0, **kwargs).fit(clients)
    _, sbar = FedMM(problem).evaluate(clients, state.theta)
    target = state.layout.flatten(sbar, np.float64) - state.s_hat
    one_round = FedMM(problem, max_iter=1, **kwargs)
    draws = []
    for trial in range(3000):
        trial_state = copy.deepcopy(state)
        seeds = np.random.SeedSequence([7, trial]).spawn(len(clients) + 1)
        trial_state.server_rng = np.random.default_rng(seeds[0])
        for c, s in zip(trial_state.clients, seeds[1:]):
            c.rng = np.random.default_rng(s)
        s_before = trial_state.s_hat.copy()
        trial_state = one_round.fit(clients, state=trial_state)
        draws.append((trial_state.s_hat - s_before) / gamma)  # = H
    draws = np.array(draws)
    mean = draws.mean(axis=0)
    stderr = draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - target) <= 5 * stderr + 1e-12), (mean, target, stderr)


def test_fixed_participation_draws_exactly_m_clients():
    state = FedMM(CauchyLocation(), max_iter=10, participation=0.35,
                  participation_scheme="fixed", random_state=0).fit(make_clients(n_clients=6))
    assert np.all(state.history["n_active"][1:] == 3)  # ceil(0.35 * 6)


def test_bits_accounting_identity():
    clients = make_clients(n_clients=3)
    state = FedMM(CauchyLocation(), max_iter=4, random_state=0).fit(clients)
    d = 3 + 1  # wx and w
    h = state.history
    # init: 3-float mean per client, then the uncompressed full statistic + loss
    assert h["bits_up"][0] == 3 * (3 * 64) + 3 * (d * 64 + 64)
    assert np.all(h["bits_up"][1:] == 3 * (d * 64 + 64))
    # down: theta (3 floats) and S_hat (d floats) to every active client
    assert np.all(h["bits_down"][1:] == 3 * (3 + d) * 64)


def test_bits_accounting_compressed():
    clients = make_clients(n_clients=3)
    state = FedMM(CauchyLocation(), max_iter=4, compression=RandK(k=2),
                  random_state=0).fit(clients)
    per_msg = 2 * (64 + 2)  # 2 values + 2 indices of ceil(log2 4) bits
    assert np.all(state.history["bits_up"][1:] == 3 * (per_msg + 64))


def test_parameter_aggregation_one_client_is_batch_mm():
    X = np.vstack(make_clients())
    problem = CauchyLocation()
    surrogate = FedMM(problem, max_iter=5, random_state=0).fit([X])
    parameter = FedMM(problem, aggregation="parameter", max_iter=6, random_state=0).fit([X])
    # surrogate: theta_0 -> init round -> 5 rounds = 6 MM steps; parameter: 6 rounds
    np.testing.assert_allclose(parameter.theta, surrogate.theta, rtol=1e-12)


def test_parameter_aggregation_is_biased_on_heterogeneous_clients():
    """Averaging the clients' local MM solutions is not the MM fixed point."""
    clients = make_clients(n_clients=4)
    problem = CauchyLocation()
    surrogate = FedMM(problem, max_iter=60, random_state=0).fit(clients)
    parameter = FedMM(problem, aggregation="parameter", local_steps=20, max_iter=60,
                      random_state=0).fit(clients)
    loss_s, _ = FedMM(problem).evaluate(clients, surrogate.theta)
    loss_p, _ = FedMM(problem).evaluate(clients, parameter.theta)
    assert loss_s < loss_p


def test_results_do_not_depend_on_n_jobs_or_backend():
    clients = make_clients()
    kwargs = dict(max_iter=6, participation=0.6, compression=QSGD(s=4), batch_size=15,
                  random_state=42)
    ref = FedMM(CauchyLocation(), n_jobs=1, **kwargs).fit(clients)
    for backend in ("loky", "threading"):
        with parallel_config(backend=backend):
            other = FedMM(CauchyLocation(), n_jobs=2, **kwargs).fit(clients)
        assert np.array_equal(ref.theta, other.theta)
        assert np.array_equal(ref.s_hat, other.s_hat)


def test_step_size_schedules():
    clients = make_clients()
    schedule = PolynomialDecay(gamma0=0.8, power=0.75)
    state = FedMM(CauchyLocation(), max_iter=5, step_size=schedule, random_state=0).fit(clients)
    np.testing.assert_allclose(state.history["step_size"][1:], [schedule(t) for t in range(5)])
    state = FedMM(CauchyLocation(), max_iter=3, step_size=lambda t: 0.25, random_state=0).fit(clients)
    np.testing.assert_allclose(state.history["step_size"][1:], 0.25)
    noisy = FedMM(CauchyLocation(), max_iter=3, participation=0.5, compression=QSGD(s=2),
                  random_state=0).fit(clients)
    exact = FedMM(CauchyLocation(), max_iter=3, random_state=0).fit(clients)
    # "auto" in noisy rounds: measured on the messages, never below the
    # worst-case step 1 / (1 + omega + (1 - q) / (4 q)); 4 entries
    omega = QSGD(s=2).omega(4)
    floor = 1 / (1 + omega + 0.5 / 2)
    assert np.all(noisy.history["step_size"][1:] >= floor - 1e-15)
    assert np.all(noisy.history["step_size"][1:] <= 1.0)
    assert np.all(exact.history["step_size"][1:] == 1.0)
    assert auto_step_size(0.0, 1.0) == 1.0 and 0 < auto_step_size(50.0, 0.01) < 0.02


def test_noisy_fedmm_converges_to_the_batch_solution():
    clients = make_clients()
    problem = CauchyLocation()
    exact = FedMM(problem, max_iter=100, random_state=0).fit(clients)
    noisy = FedMM(problem, max_iter=300, participation=0.5, compression=QSGD(s=4),
                  random_state=0).fit(clients)
    np.testing.assert_allclose(noisy.theta, exact.theta, atol=1e-3)


def test_callback_can_stop_and_tolerance_stops():
    clients = make_clients()
    seen = []
    state = FedMM(CauchyLocation(), max_iter=50,
                  callback=lambda info: seen.append(info["round"]) or info["round"] >= 3,
                  random_state=0).fit(clients)
    assert state.round == 3 and seen == [0, 1, 2, 3]  # the initial round included
    state = FedMM(CauchyLocation(), max_iter=500, tol=1e-10, random_state=0).fit(clients)
    assert state.round < 500


def test_user_compressor_plugs_in():
    state = FedMM(CauchyLocation(), max_iter=200, compression=Halve(), random_state=0).fit(
        make_clients()
    )
    exact = FedMM(CauchyLocation(), max_iter=60, random_state=0).fit(make_clients())
    np.testing.assert_allclose(state.theta, exact.theta, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(participation=0.0), "participation"),
        (dict(participation=1.5), "participation"),
        (dict(participation_scheme="some"), "participation_scheme"),
        (dict(aggregation="median"), "aggregation"),
        (dict(compression="zip"), "compression"),
        (dict(cv_rate=2.0), "cv_rate"),
        (dict(step_size=0.0), "step_size"),
        (dict(step_size="fast"), "step_size"),
        (dict(batch_size=0), "batch_size"),
        (dict(local_steps=0), "local_steps"),
        (dict(client_weights=[1.0, -1.0, 1.0, 1.0, 1.0]), "client_weights"),
        (dict(client_weights=[1.0]), "client_weights"),
    ],
)
def test_invalid_engine_parameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FedMM(CauchyLocation(), max_iter=1, **kwargs).fit(make_clients())


def test_ablations_see_the_same_participants():
    """Participation has its own stream: with and without control variates
    (or another compressor) the same clients take part in every round."""
    clients = make_clients(n_clients=8)
    seen = {}
    for name, kwargs in {"cv": {}, "no cv": dict(cv_rate=0.0),
                         "qsgd": dict(compression=QSGD(s=2))}.items():
        state = FedMM(CauchyLocation(), max_iter=15, participation=0.4, random_state=3,
                      **kwargs).fit(clients)
        seen[name] = state.history["n_active"]
    np.testing.assert_array_equal(seen["cv"], seen["no cv"])
    np.testing.assert_array_equal(seen["cv"], seen["qsgd"])
    assert len(set(seen["cv"][1:])) > 1
