"""Tests of FederatedOTMap and EntropicOTProblem."""

import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.linalg import sqrtm
from scipy.special import logsumexp
from sklearn import config_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import parametrize_with_checks

from skfedmm import FederatedOTMap, TargetSample
from skfedmm.problems import EntropicOTProblem
from skfedmm.problems.ot import _chunk_rows


# ----------------------------------------------------------------- helpers
def sinkhorn_semidiscrete(X, Y, eps, n_iter, b=None):
    """Plain semi-discrete Sinkhorn on pooled rows (uniform source weights)."""
    m = Y.shape[0]
    b = np.full(m, 1.0 / m) if b is None else b
    C = 0.5 * ((X[:, None, :] - Y[None, :, :]) ** 2).sum(-1)
    g = np.zeros(m)
    for _ in range(n_iter + 1):  # the initial full round is one more step
        Z = (g - C) / eps + np.log(b)
        chi = np.exp(Z - logsumexp(Z, axis=1, keepdims=True))
        g = g + eps * np.log(b / chi.mean(axis=0))
        g -= g.mean()
    return g


def gaussian_problem(d=2, n_clients=10, n=150, m=150, seed=0):
    """Sorted (heterogeneous) Gaussian source split, Gaussian target, Monge map."""
    rng = np.random.default_rng(seed)
    A1 = rng.standard_normal((d, d))
    A2 = rng.standard_normal((d, d))
    S1 = A1 @ A1.T / d + 0.5 * np.eye(d)
    S2 = A2 @ A2.T / d + 0.5 * np.eye(d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    X = m1 + rng.standard_normal((n_clients * n, d)) @ np.linalg.cholesky(S1).T
    Y = m2 + rng.standard_normal((m, d)) @ np.linalg.cholesky(S2).T
    X_test = m1 + rng.standard_normal((1000, d)) @ np.linalg.cholesky(S1).T
    r1 = np.real(sqrtm(S1))
    ir1 = np.linalg.inv(r1)
    A = ir1 @ np.real(sqrtm(r1 @ S2 @ r1)) @ ir1
    X_sorted = X[np.argsort(X[:, 0])]
    clients = np.array_split(X_sorted, n_clients)
    return clients, X, Y, X_test, lambda Z: m2 + (Z - m1) @ A.T


def map_error(est, X_test, monge):
    return float(np.mean(np.sum((est.transform(X_test) - monge(X_test)) ** 2, axis=1)))


# ------------------------------------------------------ scikit-learn checks
@parametrize_with_checks([FederatedOTMap(max_iter=3, tol=0.0, n_reference=20, random_state=0)])
def test_sklearn_compatible(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


# ------------------------------------------------------------- exactness
def fit_split(est, X, Y, split, rng):
    """Fit on X split as one client, three clients, or by random client ids."""
    if split == "one":
        return est.fit(X, target=Y)
    if split == "three":
        return est.fit([X[:30], X[30:200], X[200:]], target=Y)
    return est.fit(X, target=Y, client_ids=rng.integers(0, 5, size=X.shape[0]))


@pytest.mark.parametrize("split", ["one", "three", "ids"])
def test_batch_fedmm_is_semidiscrete_sinkhorn(split):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((240, 3))
    Y = rng.standard_normal((40, 3)) * 0.8 + 0.5
    n_iter = 15
    est = FederatedOTMap(0.2, normalize_cost=None, max_iter=n_iter, tol=0.0, random_state=0)
    fit_split(est, X, Y, split, rng)
    g = sinkhorn_semidiscrete(X, Y, 0.2, n_iter)
    assert est.n_iter_ == n_iter
    assert_allclose(est.potential_, g, rtol=0, atol=1e-10)
    # the history's mean field is the exact marginal error of each round
    mf = est.history_["mean_field"][1:]
    assert np.all(np.diff(mf) < 0)


def test_problem_loss_is_semi_dual_and_mass_sums_to_one():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 2))
    Y = rng.standard_normal((7, 2))
    b = rng.random(7) + 0.1
    prob = EntropicOTProblem(Y, b, epsilon=0.3, normalize_cost=None)
    g = rng.standard_normal(7)
    stat, loss = prob.local_statistic(X, g)
    bn = b / b.sum()
    C = 0.5 * ((X[:, None] - Y[None]) ** 2).sum(-1)
    Z = (g - C) / 0.3 + np.log(bn)
    expected = -bn @ g + 0.3 * np.mean(logsumexp(Z, axis=1))
    assert_allclose(loss, expected, rtol=1e-12)
    chi = np.exp(Z - logsumexp(Z, axis=1, keepdims=True))
    assert_allclose(stat["mass"], chi.mean(0), rtol=1e-12)
    assert_allclose(stat["mass"].sum(), 1.0)
    assert_allclose(prob.loss(X, g), loss)


def test_chunking_respects_budget_and_leaves_results_unchanged():
    # 1 MiB budget, 1000 float64 targets per row: 131 rows per block
    assert _chunk_rows(10_000, 8 * 1000, 1.0) == 131
    assert _chunk_rows(5, 8 * 1000, 1.0) == 5
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 3))
    Y = rng.standard_normal((300, 3))
    ref = FederatedOTMap(0.1, max_iter=10, tol=0.0).fit(X, target=Y)
    with config_context(working_memory=0.01):  # blocks of 4 rows x 300
        small = FederatedOTMap(0.1, max_iter=10, tol=0.0).fit(X, target=Y)
        assert_allclose(small.transform(X), ref.transform(X), rtol=1e-10, atol=1e-12)
    assert_allclose(small.potential_, ref.potential_, rtol=1e-10, atol=1e-12)


# -------------------------------------------------- statistical behaviour
def test_gaussian_monge_map_federated_vs_pooled_vs_parameter_vs_pot():
    ot = pytest.importorskip("ot")
    clients, X, Y, X_test, monge = gaussian_problem()
    params = dict(epsilon=0.1, max_iter=500, tol=1e-6, random_state=0)
    fed = FederatedOTMap(**params).fit(clients, target=Y)
    pooled = FederatedOTMap(**params).fit(np.vstack(clients), target=Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        param = FederatedOTMap(**{**params, "max_iter": 100}, aggregation="parameter").fit(
            clients, target=Y
        )
    assert fed.marginal_error_ <= 1e-6
    err_fed = map_error(fed, X_test, monge)
    err_pooled = map_error(pooled, X_test, monge)
    err_param = map_error(param, X_test, monge)
    # POT on the pooled rows at the matching regularization (POT's cost has no 1/2)
    pot = ot.da.SinkhornTransport(reg_e=2 * fed.epsilon_, max_iter=2000, tol=1e-9)
    pot.fit(Xs=X, Xt=Y)
    err_pot = float(np.mean(np.sum((pot.transform(Xs=X_test) - monge(X_test)) ** 2, axis=1)))
    print(f"map MSE: federated {err_fed:.4f}, pooled {err_pooled:.4f}, "
          f"parameter averaging {err_param:.4f}, POT {err_pot:.4f}")
    assert err_fed <= 1.1 * err_pooled
    assert err_fed <= 1.1 * err_pot
    assert err_param >= 2 * err_fed


def test_one_dimensional_map_is_monotone():
    rng = np.random.default_rng(0)
    clients = [rng.exponential(size=(100, 1)) + i for i in range(4)]
    y = rng.standard_normal(80)  # 1-D y: points on the line
    est = FederatedOTMap(0.01, random_state=0).fit(clients, target=y)
    grid = np.linspace(-2, 8, 500)[:, None]
    mapped = est.transform(grid).ravel()
    # nondecreasing up to float rounding where the map saturates at the ends
    assert np.all(np.diff(mapped) >= -1e-12)
    assert mapped[-1] - mapped[0] > 3
    assert est.target_.shape == (80, 1)


def test_small_epsilon_float32_stays_finite_and_improves():
    clients, _, Y, _, _ = gaussian_problem(n=100, m=100, seed=3)
    clients32 = [c.astype(np.float32) for c in clients]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = FederatedOTMap(
            3e-3, epsilon_scaling=None, max_iter=60, random_state=0
        ).fit(clients32, target=Y)
    assert est.potential_.dtype == np.float32
    assert np.all(np.isfinite(est.potential_))
    out = est.transform(clients32[0])
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    mf = est.history_["mean_field"][1:]
    assert np.all(np.isfinite(mf))
    assert np.mean(mf[-10:]) < 0.9 * np.mean(mf[:10])


@pytest.mark.parametrize(
    "noise",
    # "fixed": Bernoulli participation can draw rounds where no client takes
    # part, in which the engine's mean field is V (0 without control
    # variates) and its mean_field stop fires spuriously.
    [
        dict(compression=("qsgd", {"s": 16}), participation=0.5, participation_scheme="fixed"),
        dict(participation=0.3, participation_scheme="fixed"),
    ],
    ids=["qsgd+partial", "partial"],
)
def test_control_variates_reach_tol_and_cv_rate_zero_stalls(noise):
    clients, _, Y, _, _ = gaussian_problem(n=150, m=100, seed=1)
    tol = 1e-3
    est = FederatedOTMap(0.3, max_iter=400, tol=tol, random_state=0, **noise).fit(
        clients, target=Y
    )
    assert est.marginal_error_ <= tol and est.n_iter_ < 400
    with pytest.warns(ConvergenceWarning, match="did not reach tol"):
        ablation = FederatedOTMap(
            0.3, max_iter=200, tol=tol, random_state=0, cv_rate=0.0, **noise
        ).fit(clients, target=Y)
    assert np.min(ablation.history_["mean_field"][-50:]) > 10 * tol


def test_parallel_clients_bitwise_identical():
    clients, _, Y, _, _ = gaussian_problem(n=100, m=60, seed=2)
    kw = dict(epsilon=0.05, max_iter=15, tol=0.0, random_state=3, compression="qsgd",
              participation=0.6)
    a = FederatedOTMap(n_jobs=1, **kw).fit(clients, target=Y)
    b = FederatedOTMap(n_jobs=2, **kw).fit(clients, target=Y)
    assert_array_equal(a.potential_, b.potential_)
    assert_array_equal(a.history_["mean_field"], b.history_["mean_field"])


def test_warm_start_continues_bitwise():
    clients, _, Y, _, _ = gaussian_problem(n=80, m=50, seed=4)
    kw = dict(epsilon=0.05, tol=0.0, random_state=0, participation=0.5)
    full = FederatedOTMap(max_iter=10, **kw).fit(clients, target=Y)
    part = FederatedOTMap(max_iter=5, warm_start=True, **kw).fit(clients, target=Y)
    part.fit(clients, target=Y)
    assert part.n_iter_ == 10
    assert_array_equal(part.potential_, full.potential_)


# ----------------------------------------------------- invariances (metamorphic)
@pytest.mark.parametrize("shift", [5.0, -20.0, 1e3])
def test_translating_the_target_translates_the_map(shift):
    clients, _, Y, X_test, _ = gaussian_problem(n=60, m=50, seed=5)
    c = shift * np.array([1.0, -0.5])
    est = FederatedOTMap(random_state=0).fit(clients, target=Y)
    moved = FederatedOTMap(random_state=0).fit(clients, target=Y + c)
    assert moved.n_iter_ == est.n_iter_
    assert_allclose(moved.cost_scale_, est.cost_scale_, rtol=1e-10)
    assert_allclose(moved.transform(X_test), est.transform(X_test) + c, rtol=1e-8, atol=1e-8 * abs(shift))


@pytest.mark.parametrize("shift", [5.0, -20.0, 1e3])
def test_translating_the_source_leaves_the_map_unchanged(shift):
    clients, _, Y, X_test, _ = gaussian_problem(n=60, m=50, seed=5)
    a = shift * np.array([0.3, 1.0])
    est = FederatedOTMap(random_state=0).fit(clients, target=Y)
    moved = FederatedOTMap(random_state=0).fit([c + a for c in clients], target=Y)
    assert moved.n_iter_ == est.n_iter_
    assert_allclose(moved.cost_scale_, est.cost_scale_, rtol=1e-10)
    assert_allclose(moved.transform(X_test + a), est.transform(X_test), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("scale", [1e-3, 100.0])
def test_scaling_both_samples_scales_the_map(scale):
    clients, _, Y, X_test, _ = gaussian_problem(n=60, m=50, seed=5)
    est = FederatedOTMap(random_state=0).fit(clients, target=Y)
    big = FederatedOTMap(random_state=0).fit([scale * c for c in clients], target=scale * Y)
    assert_allclose(big.cost_scale_, scale**2 * est.cost_scale_, rtol=1e-10)
    assert_allclose(big.potential_, scale**2 * est.potential_, rtol=1e-8, atol=1e-10 * scale**2)
    assert_allclose(big.transform(scale * X_test), scale * est.transform(X_test), rtol=1e-8,
                    atol=1e-10 * scale)


def test_spread_is_the_pooled_per_coordinate_variance_whatever_the_split():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 3)) * [1.0, 2.0, 0.5] + 7
    Y = rng.standard_normal((40, 3)) * 3 - 2
    b = rng.random(40) + 0.5
    target_var = np.average(((Y - np.average(Y, axis=0, weights=b)) ** 2).sum(1), weights=b)
    expected = 0.5 * (X.var(axis=0).sum() + target_var) / 3
    for split in (X, [X[:10], X[10:200], X[200:]]):
        est = FederatedOTMap(target_weights=b, max_iter=1, tol=0).fit(split, target=Y)
        assert_allclose(est.cost_scale_, expected, rtol=1e-12)
        assert_allclose(est.epsilon_, 0.05 * expected, rtol=1e-12)


def test_reference_map_covariance_within_ten_percent_of_identity():
    """The normalizing map at the defaults: covariance ~ rho^2 I, rho^2 ~ 0.95."""
    rng = np.random.default_rng(0)
    for d in (2, 5):
        clients = [rng.standard_normal((600, d)) * 2 + 0.5 * i - 3 for i in range(3)]
        est = FederatedOTMap(random_state=0).fit(clients)
        # the reference sample is standardized exactly
        assert_allclose(est.target_.mean(axis=0), 0, atol=1e-12)
        assert_allclose(np.cov(est.target_.T, bias=True), np.eye(d), atol=1e-12)
        Z = est.transform(np.vstack(clients))
        eig = np.linalg.eigvalsh(np.cov(Z.T))
        assert np.all((eig > 0.9) & (eig < 1.1)), eig
        # the documented entropic bias between Gaussians of equal spread
        rho = np.sqrt(1 + 0.05**2 / 4) - 0.05 / 2
        assert_allclose(eig.mean(), rho**2, atol=0.03)


def test_normalizing_map_with_reference_target():
    rng = np.random.default_rng(0)
    clients = [rng.gamma(2.0, size=(300, 2)) * [1, 3] + 4 * i for i in range(3)]
    a = FederatedOTMap(0.02, n_reference=300, random_state=7).fit(clients)
    b = FederatedOTMap(0.02, n_reference=300, random_state=7, max_iter=1, tol=0.0).fit(clients)
    assert_array_equal(a.target_, b.target_)  # seeded reference sample
    assert a.target_.shape == (300, 2)
    Z = a.fit_transform(clients)
    assert Z.shape == (900, 2)
    assert_allclose(Z.mean(axis=0), 0, atol=0.05)
    # the correlated, skewed source comes out close to the standard normal sample
    assert np.corrcoef(np.vstack(clients).T)[0, 1] > 0.3
    assert_allclose(np.cov(Z.T), np.eye(2), atol=0.1)
    assert abs(np.corrcoef(Z.T)[0, 1]) < 0.1


def test_reference_with_few_points_is_centred():
    X = np.random.default_rng(0).standard_normal((30, 4))
    est = FederatedOTMap(n_reference=3, max_iter=2, tol=0, random_state=0).fit(X)
    assert_allclose(est.target_.mean(axis=0), 0, atol=1e-12)


def test_target_weights_are_used():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 1))
    y = np.array([-1.0, 1.0])
    est = FederatedOTMap(0.05, target_weights=[3, 1], tol=1e-8, max_iter=500).fit(X, target=y)
    assert_allclose(est.target_weights_, [0.75, 0.25])
    chi = est.soft_assignments(X)
    assert_allclose(chi.mean(axis=0), [0.75, 0.25], atol=1e-6)


def test_parameter_aggregation_reports_exact_marginal_error():
    clients, _, Y, _, _ = gaussian_problem(n=50, m=30, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = FederatedOTMap(0.1, max_iter=5, aggregation="parameter").fit(clients, target=Y)
    prob = EntropicOTProblem(Y, epsilon=est.epsilon_, normalize_cost=None)
    masses = sum(len(c) * prob.local_statistic(c, est.potential_)[0]["mass"] for c in clients)
    expected = np.abs(masses / sum(map(len, clients)) - est.target_weights_).sum()
    assert_allclose(est.marginal_error_, expected, rtol=1e-8)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "params, y, err, match",
    [
        (dict(epsilon=0.0), None, ValueError, "The 'epsilon' parameter of FederatedOTMap must be"),
        (dict(epsilon=-1.0), None, ValueError, "The 'epsilon' parameter of FederatedOTMap must be"),
        (dict(epsilon="small"), None, TypeError, "The 'epsilon' parameter of FederatedOTMap must be"),
        (dict(normalize_cost="mean"), None, ValueError, "The 'normalize_cost' parameter"),
        (dict(n_reference=0), None, ValueError, "The 'n_reference' parameter of FederatedOTMap"),
        (dict(), np.ones((5, 2)), ValueError,
         "target .the target sample. has 2 feature.s. but the source X has 3"),
        (dict(), np.ones(5), ValueError, "has 1 feature.s. but the source X has 3"),
        (dict(), np.array([[0, 1, np.nan]]), ValueError, "target .the target sample.*NaN"),
        (dict(), np.ones((2, 2, 3)), ValueError, "target .the target sample."),
        (dict(target_weights=[1, 2]), None, ValueError, "target_weights has shape .2,.; expected .1000,."),
        (dict(target_weights=[1, 2]), np.ones((3, 3)), ValueError, "target_weights has shape"),
        (dict(target_weights=[1, 0, 1]), np.ones((3, 3)), ValueError, "strictly positive"),
        (dict(target_weights=[1, np.inf, 1]), np.ones((3, 3)), ValueError, "target_weights"),
    ],
)
def test_bad_parameters_and_targets(params, y, err, match):
    X = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(err, match=match):
        FederatedOTMap(max_iter=2, **params).fit(X, target=y)
    if y is not None:  # the same through the wrapper
        with pytest.raises(err, match=match):
            FederatedOTMap(max_iter=2, **params).fit(X, target=TargetSample(y))


def test_bad_client_is_named():
    rng = np.random.default_rng(0)
    bad = rng.standard_normal((10, 2))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="client 1"):
        FederatedOTMap(max_iter=2).fit([rng.standard_normal((10, 2)), bad])
    with pytest.raises(ValueError, match="client 1"):
        FederatedOTMap(max_iter=2).fit([rng.standard_normal((10, 2)), rng.standard_normal((10, 3))])


def test_transform_checks_features_and_fit():
    from sklearn.exceptions import NotFittedError

    X = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(NotFittedError):
        FederatedOTMap().transform(X)
    est = FederatedOTMap(max_iter=3, tol=0.0, n_reference=10).fit(X)
    with pytest.raises(ValueError, match="features"):
        est.transform(X[:, :2])
    assert_array_equal(est.predict(X), est.transform(X))


# ------------------------------------------------------------------- POT
def test_transform_equals_pot_continuous_map_with_twice_epsilon():
    """The documented parity: POT's continuous out-of-sample map, reg_e = 2 * epsilon_."""
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 2)) * [1.0, 0.5]
    Y = rng.standard_normal((80, 2)) @ [[1.0, 0.3], [0.0, 0.8]] + [2.0, -1.0]
    X_new = rng.standard_normal((200, 2)) * 1.2
    est = FederatedOTMap(0.2, tol=1e-12, max_iter=5000).fit(
        [X[:100], X[100:]], target=Y
    )
    pot = ot.da.SinkhornTransport(reg_e=2 * est.epsilon_, max_iter=5000, tol=1e-13)
    pot.fit(Xs=X, Xt=Y)
    assert pot.out_of_sample_map == "continuous"
    assert_allclose(est.transform(X_new), pot.transform(Xs=X_new), rtol=1e-7, atol=1e-7)
    # on the training rows POT uses its coupling: the same soft assignments
    assert_allclose(est.transform(X), pot.transform(Xs=X), rtol=1e-7, atol=1e-7)


# ------------------------------------------- y, pipelines and metadata routing
def test_y_is_ignored():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 3))
    labels = rng.integers(0, 2, size=60)
    a = FederatedOTMap(max_iter=5, tol=0, n_reference=30, random_state=0).fit(X)
    b = FederatedOTMap(max_iter=5, tol=0, n_reference=30, random_state=0).fit(X, labels)
    assert_array_equal(a.potential_, b.potential_)
    assert_array_equal(a.target_, b.target_)
    Z = FederatedOTMap(max_iter=5, tol=0, n_reference=30, random_state=0).fit_transform(X, labels)
    assert_array_equal(Z, a.transform(X))


def test_pipeline_before_a_classifier():
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    X, labels = make_classification(n_samples=300, n_features=3, n_informative=3,
                                    n_redundant=0, random_state=0)
    pipe = Pipeline([("ot", FederatedOTMap(n_reference=200, random_state=0)),
                     ("clf", LogisticRegression())])
    pipe.fit(X, labels)
    raw = LogisticRegression().fit(X, labels).score(X, labels)
    assert pipe.score(X, labels) > raw - 0.1
    # the target goes to the map as a step parameter (no routing needed)
    Y = np.random.default_rng(1).standard_normal((150, 3)) + 5
    pipe.fit(X, labels, ot__target=Y)
    assert_array_equal(pipe.named_steps["ot"].target_, Y)
    assert pipe.score(X, labels) > raw - 0.1


def _routed_cv(target, n_rows=120):
    """cross_validate of a pipeline with the target routed to the map."""
    from sklearn import config_context
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_validate
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(0)
    X = rng.standard_normal((n_rows, 2))
    labels = (X[:, 0] > 0).astype(int)
    with config_context(enable_metadata_routing=True):
        ot_map = FederatedOTMap(max_iter=5, tol=0, random_state=0).set_fit_request(target=True)
        pipe = make_pipeline(ot_map, LogisticRegression())
        res = cross_validate(pipe, X, labels, cv=3, params={"target": target},
                             return_estimator=True)
    return [est[0].target_ for est in res["estimator"]]


def test_routed_target_of_another_size_reaches_every_fold_whole():
    Y = np.random.default_rng(1).standard_normal((50, 2))
    for fitted in _routed_cv(Y):
        assert_array_equal(fitted, Y)


def test_routed_target_with_as_many_rows_as_X_is_split_unless_wrapped():
    Y = np.random.default_rng(1).standard_normal((120, 2))
    # the documented trap: scikit-learn takes it for sample-aligned and cuts it
    assert [t.shape[0] for t in _routed_cv(Y)] == [80, 80, 80]
    # the wrapper has no length: every fold maps onto the whole target
    for fitted in _routed_cv(TargetSample(Y)):
        assert_array_equal(fitted, Y)


def test_grid_search_routes_the_target():
    from sklearn import config_context
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline

    rng = np.random.default_rng(0)
    X = rng.standard_normal((90, 2))
    labels = (X[:, 1] > 0).astype(int)
    Y = rng.standard_normal((90, 2)) * 2 + 1
    with config_context(enable_metadata_routing=True):
        pipe = Pipeline([
            ("ot", FederatedOTMap(max_iter=5, tol=0, random_state=0).set_fit_request(target=True)),
            ("clf", LogisticRegression()),
        ])
        search = GridSearchCV(pipe, {"ot__epsilon": [0.05, 0.5]}, cv=3)
        search.fit(X, labels, target=TargetSample(Y))
    assert_array_equal(search.best_estimator_.named_steps["ot"].target_, Y)


# ------------------------------------------------- continued training (resume)
def _resume_clients():
    clients, _, Y, _, _ = gaussian_problem(n=60, m=40, seed=7)
    return clients, Y


def test_epsilon_change_takes_effect_next_round_as_sinkhorn_with_a_schedule():
    clients, Y = _resume_clients()
    X = np.vstack(clients)
    kw = dict(normalize_cost=None, tol=0.0, random_state=0)
    est = FederatedOTMap(0.5, max_iter=4, warm_start=True, **kw).fit(clients, target=Y)
    est.set_params(epsilon=0.2, max_iter=6).fit(clients)
    assert est.n_iter_ == 10 and est.epsilon_ == 0.2
    # plain Sinkhorn: 5 steps at 0.5 (initial round + 4), then 6 at 0.2
    b = np.full(len(Y), 1.0 / len(Y))
    C = 0.5 * ((X[:, None, :] - Y[None, :, :]) ** 2).sum(-1)
    g = np.zeros(len(Y))
    for eps in [0.5] * 5 + [0.2] * 6:
        Z = (g - C) / eps + np.log(b)
        chi = np.exp(Z - logsumexp(Z, axis=1, keepdims=True))
        g = g + eps * np.log(b / chi.mean(axis=0))
        g -= g.mean()
    assert_allclose(est.potential_, g, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["warm_start", "partial_fit"])
def test_epsilon_change_with_noisy_rounds_converges_to_the_new_problem(method):
    clients, Y = _resume_clients()
    noisy = dict(participation=0.5, participation_scheme="fixed", compression=("qsgd", {"s": 16}),
                 random_state=0)
    est = FederatedOTMap(1.0, max_iter=30, tol=0, warm_start=True, **noisy)
    if method == "warm_start":
        est.fit(clients, target=Y)
        est.set_params(epsilon=0.3, max_iter=400, tol=1e-4).fit(clients)
    else:
        for _ in range(30):
            est.partial_fit(clients, target=Y)
        est.set_params(epsilon=0.3)
        for _ in range(400):
            est.partial_fit(clients)
    fresh = FederatedOTMap(0.3, tol=1e-10, max_iter=3000).fit(clients, target=Y)
    assert_allclose(est.epsilon_, fresh.epsilon_, rtol=1e-12)
    assert np.max(np.abs(est.potential_ - fresh.potential_)) < 0.05 * np.ptp(fresh.potential_)


def test_normalize_cost_can_drop_but_not_appear_when_resuming():
    clients, Y = _resume_clients()
    est = FederatedOTMap(0.3, max_iter=3, tol=0, warm_start=True).fit(clients, target=Y)
    spread = est.cost_scale_
    est.set_params(normalize_cost=None, epsilon=0.3 * spread).fit(clients)
    assert est.cost_scale_ == 1.0 and est.n_iter_ == 6
    assert_allclose(est.epsilon_, 0.3 * spread)
    est.set_params(normalize_cost="spread", epsilon=0.3).fit(clients)  # the moments were kept
    assert_allclose(est.cost_scale_, spread) and est.n_iter_ == 9
    plain = FederatedOTMap(0.3, normalize_cost=None, max_iter=3, tol=0, warm_start=True)
    plain.fit(clients, target=Y)
    with pytest.raises(ValueError, match="normalize_cost changed from None to 'spread'"):
        plain.set_params(normalize_cost="spread").fit(clients)
    assert plain.n_iter_ == 3  # nothing ran


def test_target_cannot_change_when_resuming():
    clients, Y = _resume_clients()
    est = FederatedOTMap(0.3, max_iter=3, tol=0, warm_start=True).fit(clients, target=Y)
    est.fit(clients, target=Y.copy())  # the same target is fine
    est.fit(clients, target=TargetSample(Y))
    assert est.n_iter_ == 9
    with pytest.raises(ValueError, match="target differs from the target of the fit being"):
        est.fit(clients, target=Y + 1)
    with pytest.raises(ValueError, match="target differs"):
        est.partial_fit(clients, target=Y[:10])
    assert est.n_iter_ == 9


def test_target_weights_cannot_change_when_resuming():
    clients, Y = _resume_clients()
    est = FederatedOTMap(0.3, max_iter=3, tol=0, warm_start=True).fit(clients, target=Y)
    est.set_params(target_weights=np.arange(1, len(Y) + 1))
    with pytest.raises(ValueError, match="(?s)target_weights changed from None to .* weights"):
        est.fit(clients)


def test_n_reference_cannot_change_when_resuming_onto_the_reference():
    clients, Y = _resume_clients()
    est = FederatedOTMap(0.3, n_reference=30, max_iter=3, tol=0, warm_start=True).fit(clients)
    with pytest.raises(ValueError, match="n_reference changed from 30 to 40"):
        est.set_params(n_reference=40).fit(clients)
    # irrelevant with an explicit target
    other = FederatedOTMap(0.3, max_iter=3, tol=0, warm_start=True).fit(clients, target=Y)
    other.set_params(n_reference=40).fit(clients)
    assert other.n_iter_ == 6


def test_resumed_fit_validates_parameters_again():
    clients, Y = _resume_clients()
    est = FederatedOTMap(0.3, max_iter=3, tol=0, warm_start=True).fit(clients, target=Y)
    with pytest.raises(ValueError, match="The 'epsilon' parameter of FederatedOTMap"):
        est.set_params(epsilon=-1.0).fit(clients)


# ------------------------------------------------------- epsilon scaling
def sinkhorn_scaled(X, Y, eps, q, n_iter):
    """Pooled semi-discrete Sinkhorn with epsilon scaling, written out.

    ``normalize_cost=None``: the schedule starts at the target's spread (its
    mean variance per coordinate) and is multiplied by ``q`` each round,
    down to ``eps``.
    """
    m = Y.shape[0]
    b = np.full(m, 1.0 / m)
    C = 0.5 * ((X[:, None, :] - Y[None, :, :]) ** 2).sum(-1)
    g = np.zeros(m)
    factor = max(1.0, Y.var(axis=0).mean() / eps)
    factors = []
    for _ in range(n_iter + 1):  # the initial full round is one more step
        factors.append(factor)
        e = eps * factor
        Z = (g - C) / e + np.log(b)
        chi = np.exp(Z - logsumexp(Z, axis=1, keepdims=True))
        g = g + e * np.log(b / chi.mean(axis=0))
        g -= g.mean()
        factor = max(1.0, factor * q)
    return g, factors


@pytest.mark.parametrize("split", ["one", "three", "ids"])
def test_batch_fedmm_with_epsilon_scaling_is_pooled_sinkhorn_with_the_schedule(split):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((240, 3))
    Y = rng.standard_normal((40, 3)) * 0.8 + 0.5
    n_iter, eps, q = 25, 0.02, 0.7
    est = FederatedOTMap(
        eps, normalize_cost=None, epsilon_scaling=q, dual_step="sinkhorn", max_iter=n_iter, tol=0.0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the schedule ends within the rounds: no warning
        fit_split(est, X, Y, split, rng)
    g, factors = sinkhorn_scaled(X, Y, eps, q, n_iter)
    assert factors[0] > 10 and factors[-1] == 1.0  # the schedule did run, and ended
    assert est.n_iter_ == n_iter and est.epsilon_ == eps
    assert_allclose(est.potential_, g, rtol=0, atol=1e-10)
    # rounds at a larger epsilon are flagged: they never count as convergence
    restarted = est.history_["restarted"][1:]
    assert_array_equal(restarted, np.array(factors[1:]) != 1.0)


def test_epsilon_scaling_never_stops_before_the_requested_epsilon():
    clients, _, Y, _, _ = gaussian_problem(n=60, m=40, seed=2)
    # a loose tol is met at once at a large epsilon; the fit still goes on
    est = FederatedOTMap(0.01, epsilon_scaling=0.5, tol=0.5).fit(clients, target=Y)
    n_scaling = int(np.ceil(np.log(0.01) / np.log(0.5)))  # from epsilon 1 to 0.01
    assert est.n_iter_ >= n_scaling
    assert est.epsilon_ == pytest.approx(0.01 * est.cost_scale_)
    assert est.marginal_error_ <= 0.5
    with pytest.warns(ConvergenceWarning, match="still being scaled"):
        short = FederatedOTMap(0.01, epsilon_scaling=0.5, max_iter=3).fit(clients, target=Y)
    assert short.epsilon_ > 0.01 * short.cost_scale_


def test_epsilon_scaling_reaches_tol_in_fewer_rounds():
    clients, _, Y, _, _ = gaussian_problem(d=3, n_clients=4, n=100, m=100, seed=0)
    kw = dict(tol=1e-2, max_iter=2000)
    plain = FederatedOTMap(0.005, epsilon_scaling=None, dual_step="sinkhorn", **kw).fit(
        clients, target=Y
    )
    scaled = FederatedOTMap(0.005, dual_step="sinkhorn", **kw).fit(clients, target=Y)  # "auto": on
    assert plain.marginal_error_ <= 1e-2 and scaled.marginal_error_ <= 1e-2
    assert scaled.n_iter_ < 0.5 * plain.n_iter_
    # the same problem: the two maps agree to the tolerance
    X = np.vstack(clients)
    gap = np.sqrt(np.mean(np.sum((plain.transform(X) - scaled.transform(X)) ** 2, axis=1)))
    print(f"rounds to 1e-2: {plain.n_iter_} plain, {scaled.n_iter_} scaled; rms map gap {gap:.3g}")
    assert gap < 0.1 * np.sqrt(plain.cost_scale_)


def test_epsilon_scaling_keeps_control_variates_valid_under_noise():
    from skfedmm import FedMM
    from skfedmm.federation.client import _current_cv

    clients, _, Y, _, _ = gaussian_problem(n=80, m=40, seed=4)
    problem = EntropicOTProblem(Y, epsilon=0.02, epsilon_scaling=0.8)
    engine = FedMM(
        problem, max_iter=1, tol=0.0, participation=0.5, participation_scheme="fixed",
        compression=("qsgd", {"s": 16}), random_state=0,
    )
    state = engine.fit(clients)
    w = state.weights
    seen = set()
    for _ in range(60):
        state = engine.fit(clients, state=state, max_iter=1)
        seen.add(float(state.theta["epsilon_factor"][0]))
        cvs = [_current_cv(c.cv, c.log_scale, state.log_scale) for c in state.clients]
        # V = sum_i w_i V_i in the broadcast coordinates, whatever epsilon did
        assert_allclose(state.cv, sum(wi * c for wi, c in zip(w, cvs)), rtol=0, atol=1e-12)
    assert len(seen) > 10 and 1.0 in seen  # the schedule ran during the noisy rounds
    # and noisy FedMM converges to the requested problem
    est = FederatedOTMap(
        0.02, epsilon_scaling=0.8, participation=0.5, participation_scheme="fixed",
        compression=("qsgd", {"s": 16}), tol=1e-3, max_iter=1500, random_state=0,
    ).fit(clients, target=Y)
    exact = FederatedOTMap(0.02, epsilon_scaling=None, tol=1e-9, max_iter=5000).fit(
        clients, target=Y
    )
    assert est.marginal_error_ <= 1e-3
    assert np.max(np.abs(est.potential_ - exact.potential_)) < 0.05 * np.ptp(exact.potential_)


def test_epsilon_scaling_default_and_parameter():
    assert FederatedOTMap().epsilon_scaling == "auto"
    clients, _, Y, _, _ = gaussian_problem(n=40, m=20, seed=0)
    kw = dict(max_iter=2, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        small = FederatedOTMap(0.01, **kw).fit(clients, target=Y)
        large = FederatedOTMap(0.05, **kw).fit(clients, target=Y)  # the default epsilon
        off = FederatedOTMap(0.01, epsilon_scaling=None, **kw).fit(clients, target=Y)
        param = FederatedOTMap(0.01, aggregation="parameter", **kw).fit(clients, target=Y)
    assert isinstance(small.fedmm_state_.theta, dict)  # "auto" scales below 0.05
    for est in (large, off, param):
        assert isinstance(est.fedmm_state_.theta, np.ndarray)
        assert est.epsilon_ == pytest.approx(est.epsilon * est.cost_scale_)
    assert small.potential_.shape == (20,)
    with pytest.raises(ValueError, match="aggregation='surrogate'"):
        FederatedOTMap(0.01, epsilon_scaling=0.9, aggregation="parameter").fit(clients, target=Y)
    for bad in (0.0, 1.0, 1.5, "yes"):
        with pytest.raises(ValueError, match="epsilon_scaling"):
            FederatedOTMap(epsilon_scaling=bad).fit(clients, target=Y)
        with pytest.raises(ValueError, match="epsilon_scaling"):
            EntropicOTProblem(Y, epsilon_scaling=bad)


# ------------------------------------------------------------- Newton steps
def test_newton_statistic_is_the_exact_second_moment():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((230, 3))
    Y = rng.standard_normal((25, 3))
    problem = EntropicOTProblem(Y, epsilon=0.3, normalize_cost=None, newton=True, working_memory=0.001)
    g = rng.standard_normal(25)
    stat, loss = problem.local_statistic(X, g)  # (several chunks)
    chi = problem.soft_assignments(X, g)
    Q = problem._unpack_second(stat["second"])
    assert stat["second"].shape == (25 * 26 // 2,)
    assert_allclose(Q, chi.T @ chi / 230, rtol=1e-12, atol=1e-15)
    assert_allclose(Q.sum(axis=1), stat["mass"], rtol=1e-12)  # rows sum to the masses
    assert_allclose(stat["mass"], chi.mean(axis=0), rtol=1e-12)
    assert problem.check_statistic(stat, g) is None
    bad = {"mass": stat["mass"], "second": -stat["second"]}
    assert "negative second moment" in problem.check_statistic(bad, g)
    assert np.all(problem.project(bad)["second"] == 0)
    assert np.all(problem.rescale(stat, g, g)["second"] == 1)
    # the convergence measure is the marginal error only
    H = {"mass": stat["mass"] - problem.weights, "second": stat["second"]}
    assert problem.mean_field_norm(H) == pytest.approx(np.abs(H["mass"]).sum())
    plain = EntropicOTProblem(Y, epsilon=0.3, normalize_cost=None)
    assert_allclose(plain.local_statistic(X, g)[0]["mass"], stat["mass"], rtol=1e-13)


def pooled_newton(X, problem, n_iter):
    """The server's M-step on statistics of the pooled rows, written out (normalize_cost=None)."""
    Y, b = problem.target, problem.weights
    m = Y.shape[0]
    C = 0.5 * ((X[:, None, :] - Y[None, :, :]) ** 2).sum(-1)
    theta = {"potential": np.zeros(m), "epsilon_factor": np.array([problem.start_factor()])}
    factors = []
    for _ in range(n_iter + 1):  # the initial full round is one more step
        factors.append(float(theta["epsilon_factor"][0]))
        e = problem.epsilon * factors[-1]
        Z = (theta["potential"] - C) / e + np.log(b)
        chi = np.exp(Z - logsumexp(Z, axis=1, keepdims=True))
        stat = {"mass": chi.mean(axis=0), "second": (chi.T @ chi / X.shape[0])[np.triu_indices(m)]}
        theta = problem.minimize(stat, theta)
    return theta["potential"], factors


@pytest.mark.parametrize("split", ["one", "three", "ids"])
def test_batch_fedmm_with_newton_steps_is_the_pooled_solver(split):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((240, 3))
    Y = rng.standard_normal((40, 3)) * 0.8 + 0.5
    n_iter, eps = 25, 0.005
    est = FederatedOTMap(eps, normalize_cost=None, max_iter=n_iter, tol=0.0)  # "auto": Newton
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the schedule ends within the rounds: no warning
        fit_split(est, X, Y, split, rng)
    problem = est.problem_
    assert problem.newton and problem.scaling_tol == 0.03 and problem.epsilon_scaling == 0.2
    g, factors = pooled_newton(X, problem, n_iter)
    assert factors[0] > 50 and factors[-1] == 1.0  # the adaptive schedule ran, and ended
    assert len(set(factors)) > 3 and any(a == b for a, b in zip(factors, factors[1:]))
    assert est.epsilon_ == eps
    assert_allclose(est.potential_, g, rtol=0, atol=1e-8 * np.ptp(g))
    assert_array_equal(est.history_["restarted"][1:], np.array(factors[1:]) != 1.0)
    assert est.marginal_error_ < 1e-6
    # the control variates (masses and second moments): V = sum_i w_i V_i
    from skfedmm.federation.client import _current_cv

    state = est.fedmm_state_
    cvs = [_current_cv(c.cv, c.log_scale, state.log_scale) for c in state.clients]
    assert state.cv.shape == (40 + 40 * 41 // 2,)
    assert_allclose(state.cv, sum(w * c for w, c in zip(state.weights, cvs)), rtol=0, atol=1e-12)


def test_newton_steps_never_increase_the_objective_and_need_fewer_rounds():
    clients, _, Y, _, _ = gaussian_problem(d=3, n_clients=3, n=100, m=60, seed=5)
    kw = dict(epsilon_scaling=None, tol=1e-5, max_iter=3000)
    newton = FederatedOTMap(0.03, dual_step="newton", **kw).fit(clients, target=Y)
    sinkhorn = FederatedOTMap(0.03, dual_step="sinkhorn", **kw).fit(clients, target=Y)
    obj = np.asarray(newton.history_["objective"])  # the semi-dual at each round's potential
    assert np.all(np.diff(obj) <= 1e-12 * np.abs(obj[1:]))
    assert np.diff(obj).min() < 0
    assert newton.marginal_error_ <= 1e-5 and sinkhorn.marginal_error_ <= 1e-5
    print(f"rounds to 1e-5 at epsilon 0.03: newton {newton.n_iter_}, sinkhorn {sinkhorn.n_iter_}")
    assert newton.n_iter_ < 0.2 * sinkhorn.n_iter_
    X = np.vstack(clients)  # the same problem: the same map, to the tolerance
    gap = np.max(np.linalg.norm(newton.transform(X) - sinkhorn.transform(X), axis=1))
    assert gap < 5e-3 * np.sqrt(newton.cost_scale_)


def test_small_epsilon_reaches_tol_in_few_rounds():
    # the problem of benchmarks/bench_ot_epsilon.py
    clients, X, Y, _, _ = gaussian_problem(d=4, n_clients=4, n=300, m=300, seed=0)
    est = FederatedOTMap(1e-3, max_iter=60, tol=1e-3).fit(clients, target=Y)
    assert est.problem_.newton and est.n_iter_ <= 60
    assert est.epsilon_ == pytest.approx(1e-3 * est.cost_scale_)
    # the marginal error, recomputed on the pooled rows at the fitted potential
    error = np.abs(est.soft_assignments(X).mean(axis=0) - est.target_weights_).sum()
    assert error <= 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sinkhorn = FederatedOTMap(1e-3, dual_step="sinkhorn", max_iter=60, tol=1e-3).fit(
            clients, target=Y
        )
    assert not sinkhorn.marginal_error_ <= 1e-2 or sinkhorn._epsilon_factor != 1.0


def test_dual_step_auto_and_validation():
    clients, _, Y, _, _ = gaussian_problem(n=40, m=20, seed=0)
    kw = dict(max_iter=2, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert FederatedOTMap(0.01, **kw).fit(clients, target=Y).problem_.newton
        for est in (
            FederatedOTMap(0.05, **kw),  # the default epsilon
            FederatedOTMap(0.01, dual_step="sinkhorn", **kw),
            FederatedOTMap(0.01, participation=0.5, **kw),
            FederatedOTMap(0.01, compression=("qsgd", {"s": 4}), **kw),
            FederatedOTMap(0.01, batch_size=10, **kw),
            FederatedOTMap(0.01, aggregation="parameter", **kw),
            FederatedOTMap(0.01, n_reference=1001, **kw),  # (target=None: m = 1001)
        ):
            est.fit(clients, target=None if est.n_reference == 1001 else Y)
            assert not est.problem_.newton
            assert "second" not in est.problem_.statistic_shapes(None)
        # a continued fit keeps the statistics' layout of the fit it continues
        est = FederatedOTMap(0.01, warm_start=True, **kw).fit(clients, target=Y)
        est.set_params(epsilon=0.05).fit(clients)
        assert est.problem_.newton and est.epsilon_ == pytest.approx(0.05 * est.cost_scale_)
    for bad in (
        dict(participation=0.5), dict(compression=("qsgd", {"s": 4})), dict(batch_size=10),
        dict(aggregation="parameter"),
    ):
        with pytest.raises(ValueError, match="dual_step='newton' needs"):
            FederatedOTMap(0.01, dual_step="newton", **bad).fit(clients, target=Y)
    with pytest.raises(ValueError, match="dual_step"):
        FederatedOTMap(dual_step="lbfgs").fit(clients, target=Y)
    with pytest.raises(ValueError, match="newton"):
        EntropicOTProblem(Y, newton="yes")
    with pytest.raises(ValueError, match="scaling_tol"):
        EntropicOTProblem(Y, scaling_tol=0.0)


# ----------------------------------------------------------- float32 kernel
def test_float32_kernel_agrees_with_float64_kernel():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 10)) + 0.5
    Y = rng.standard_normal((500, 10))
    p64 = EntropicOTProblem(Y, epsilon=0.5, normalize_cost=None)
    p32 = EntropicOTProblem(Y, epsilon=0.5, normalize_cost=None, kernel_dtype="float32")
    g = rng.standard_normal(500)
    s64, l64 = p64.local_statistic(X, g)
    s32, l32 = p32.local_statistic(X, g)
    assert s32["mass"].dtype == np.float64  # the masses stay in the data's dtype
    # the stated accuracy: soft assignments to about 2^-24 |x||y| / eps
    bound = np.finfo(np.float32).eps * np.max(np.linalg.norm(X, axis=1)) * np.max(
        np.linalg.norm(Y, axis=1)) / 0.5
    assert bound < 1e-4
    assert_allclose(s32["mass"], s64["mass"], rtol=bound, atol=0)
    assert_allclose(l32, l64, rtol=1e-6)
    assert p32.check_statistic(s32, g) is None
    assert np.max(np.abs(s32["mass"] - s64["mass"]) / s64["mass"]) > 0  # float32 did run
    # fitted maps: the same to 1e-4 of the data's scale
    clients = np.array_split(X, 4)
    kw = dict(max_iter=30, tol=0.0, epsilon_scaling=None)
    f64 = FederatedOTMap(0.1, **kw).fit(clients, target=Y)
    f32 = FederatedOTMap(0.1, kernel_dtype="float32", **kw).fit(clients, target=Y)
    assert f32.potential_.dtype == np.float64
    gap = np.max(np.linalg.norm(f64.transform(X) - f32.transform(X), axis=1))
    assert 0 < gap < 1e-4 * np.sqrt(f64.cost_scale_)
    assert_allclose(f32.potential_, f64.potential_, rtol=0, atol=1e-4 * f64.epsilon_)
    # and the other way: a float64 kernel on float32 data
    X32, Y32 = X[:500].astype(np.float32), Y[:50].astype(np.float32)
    a = FederatedOTMap(0.1, **kw).fit(X32, target=Y32)
    b = FederatedOTMap(0.1, kernel_dtype="float64", **kw).fit(X32, target=Y32)
    assert b.potential_.dtype == np.float32 and b.transform(X32).dtype == np.float32
    assert_allclose(b.transform(X32), a.transform(X32), atol=1e-4 * np.sqrt(a.cost_scale_))
