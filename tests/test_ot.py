"""Tests of FederatedOTMap and EntropicOTProblem (issue 3)."""

import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.linalg import sqrtm
from scipy.special import logsumexp
from sklearn import config_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import parametrize_with_checks

from skfedmm import FederatedOTMap
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
# The common checks call fit(X, y) with y the class labels of X (a 1-D
# array of n_samples values); for FederatedOTMap y is the *target sample*,
# so a 1-D y is n points on the line and a multi-feature X rejects it with a
# ValueError. Those checks are expected to fail for that one reason.
_Y_IS_TARGET = "fit(X, y) passes labels as y; FederatedOTMap's y is the target sample"
EXPECTED_FAILED_CHECKS = {
    "check_transformer_general": _Y_IS_TARGET,
    "check_transformer_data_not_an_array": _Y_IS_TARGET,
    "check_transformers_unfitted_stateless": _Y_IS_TARGET,
    "check_transformer_preserve_dtypes": _Y_IS_TARGET,
    "check_fit_check_is_fitted": _Y_IS_TARGET,
    "check_methods_sample_order_invariance": _Y_IS_TARGET,
    "check_methods_subset_invariance": _Y_IS_TARGET,
    "check_fit2d_1sample": _Y_IS_TARGET,
    "check_dict_unchanged": _Y_IS_TARGET,
    "check_dont_overwrite_parameters": _Y_IS_TARGET,
    "check_fit_idempotent": _Y_IS_TARGET,
    "check_n_features_in": _Y_IS_TARGET,
    "check_fit_score_takes_y": _Y_IS_TARGET,
    "check_estimators_fit_returns_self": _Y_IS_TARGET,
    "check_pipeline_consistency": _Y_IS_TARGET,
    "check_estimators_dtypes": _Y_IS_TARGET,
    "check_estimators_pickle": _Y_IS_TARGET,
    "check_readonly_memmap_input": _Y_IS_TARGET,
    "check_n_features_in_after_fitting": _Y_IS_TARGET,
    "check_f_contiguous_array_estimator": _Y_IS_TARGET,
    "check_transformer_n_iter": _Y_IS_TARGET,
    "check_get_feature_names_out_error": _Y_IS_TARGET,
    "check_set_output_transform": _Y_IS_TARGET,
    "check_global_output_transform_pandas": _Y_IS_TARGET,
    "check_global_set_output_transform_polars": _Y_IS_TARGET,
    "check_set_output_transform_pandas": _Y_IS_TARGET,
    "check_set_output_transform_polars": _Y_IS_TARGET,
    "check_estimators_overwrite_params": _Y_IS_TARGET,
    "check_estimators_nan_inf": _Y_IS_TARGET,
    "check_positive_only_tag_during_fit": _Y_IS_TARGET,
    "check_dtype_object": _Y_IS_TARGET,
    "check_fit2d_predict1d": _Y_IS_TARGET,
}


def _expected_failed_checks(estimator):
    return EXPECTED_FAILED_CHECKS


@parametrize_with_checks(
    [FederatedOTMap(max_iter=3, tol=0.0, n_reference=20, random_state=0)],
    expected_failed_checks=_expected_failed_checks,
)
def test_sklearn_compatible(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


# ------------------------------------------------------------- exactness
@pytest.mark.parametrize("split", ["one", "three", "ids"])
def test_batch_fedmm_is_semidiscrete_sinkhorn(split):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((240, 3))
    Y = rng.standard_normal((40, 3)) * 0.8 + 0.5
    n_iter = 15
    est = FederatedOTMap(0.2, normalize_cost=None, max_iter=n_iter, tol=0.0, random_state=0)
    if split == "one":
        est.fit(X, Y)
    elif split == "three":
        est.fit([X[:30], X[30:200], X[200:]], Y)
    else:
        est.fit(X, Y, client_ids=rng.integers(0, 5, size=X.shape[0]))
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
    ref = FederatedOTMap(0.1, max_iter=10, tol=0.0).fit(X, Y)
    with config_context(working_memory=0.01):  # blocks of 4 rows x 300
        small = FederatedOTMap(0.1, max_iter=10, tol=0.0).fit(X, Y)
        assert_allclose(small.transform(X), ref.transform(X), rtol=1e-10, atol=1e-12)
    assert_allclose(small.potential_, ref.potential_, rtol=1e-10, atol=1e-12)


# -------------------------------------------------- statistical behaviour
def test_gaussian_monge_map_federated_vs_pooled_vs_parameter_vs_pot():
    ot = pytest.importorskip("ot")
    clients, X, Y, X_test, monge = gaussian_problem()
    params = dict(epsilon=0.02, max_iter=500, tol=1e-6, random_state=0)
    fed = FederatedOTMap(**params).fit(clients, Y)
    pooled = FederatedOTMap(**params).fit(np.vstack(clients), Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        param = FederatedOTMap(**{**params, "max_iter": 100}, aggregation="parameter").fit(clients, Y)
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
    est = FederatedOTMap(0.01, random_state=0).fit(clients, y)
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
        est = FederatedOTMap(1e-3, max_iter=60, random_state=0).fit(clients32, Y)
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
    est = FederatedOTMap(0.1, max_iter=400, tol=tol, random_state=0, **noise).fit(clients, Y)
    assert est.marginal_error_ <= tol and est.n_iter_ < 400
    with pytest.warns(ConvergenceWarning, match="did not reach tol"):
        ablation = FederatedOTMap(
            0.1, max_iter=200, tol=tol, random_state=0, cv_rate=0.0, **noise
        ).fit(clients, Y)
    assert np.min(ablation.history_["mean_field"][-50:]) > 10 * tol


def test_parallel_clients_bitwise_identical():
    clients, _, Y, _, _ = gaussian_problem(n=100, m=60, seed=2)
    kw = dict(epsilon=0.05, max_iter=15, tol=0.0, random_state=3, compression="qsgd",
              participation=0.6)
    a = FederatedOTMap(n_jobs=1, **kw).fit(clients, Y)
    b = FederatedOTMap(n_jobs=2, **kw).fit(clients, Y)
    assert_array_equal(a.potential_, b.potential_)
    assert_array_equal(a.history_["mean_field"], b.history_["mean_field"])


def test_warm_start_continues_bitwise():
    clients, _, Y, _, _ = gaussian_problem(n=80, m=50, seed=4)
    kw = dict(epsilon=0.05, tol=0.0, random_state=0, participation=0.5)
    full = FederatedOTMap(max_iter=10, **kw).fit(clients, Y)
    part = FederatedOTMap(max_iter=5, warm_start=True, **kw).fit(clients, Y)
    part.fit(clients, Y)
    assert part.n_iter_ == 10
    assert_array_equal(part.potential_, full.potential_)


def test_normalize_cost_makes_epsilon_scale_free():
    clients, _, Y, X_test, _ = gaussian_problem(n=60, m=50, seed=5)
    est = FederatedOTMap(0.05, random_state=0).fit(clients, Y)
    big = FederatedOTMap(0.05, random_state=0).fit([100 * c for c in clients], 100 * Y)
    assert_allclose(big.cost_scale_, 1e4 * est.cost_scale_, rtol=1e-10)
    assert_allclose(big.transform(100 * X_test), 100 * est.transform(X_test), rtol=1e-6, atol=1e-6)


def test_normalizing_map_with_reference_target():
    rng = np.random.default_rng(0)
    clients = [rng.gamma(2.0, size=(300, 2)) * [1, 3] + 4 * i for i in range(3)]
    a = FederatedOTMap(0.005, n_reference=300, random_state=7).fit(clients)
    b = FederatedOTMap(0.005, n_reference=300, random_state=7, max_iter=1, tol=0.0).fit(clients)
    assert_array_equal(a.target_, b.target_)  # seeded reference sample
    assert a.target_.shape == (300, 2)
    Z = a.fit_transform(clients)
    assert Z.shape == (900, 2)
    assert_allclose(Z.mean(axis=0), a.target_.mean(axis=0), atol=0.05)
    # the correlated, skewed source comes out close to the standard normal sample
    assert np.corrcoef(np.vstack(clients).T)[0, 1] > 0.3
    # (the entropic map shrinks the spread a little: it averages target points)
    assert_allclose(np.cov(Z.T), np.cov(a.target_.T), atol=0.2)
    assert abs(np.corrcoef(Z.T)[0, 1]) < 0.1


def test_target_weights_are_used():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 1))
    y = np.array([-1.0, 1.0])
    est = FederatedOTMap(0.05, target_weights=[3, 1], tol=1e-8, max_iter=500).fit(X, y)
    assert_allclose(est.target_weights_, [0.75, 0.25])
    chi = est.soft_assignments(X)
    assert_allclose(chi.mean(axis=0), [0.75, 0.25], atol=1e-6)


def test_parameter_aggregation_reports_exact_marginal_error():
    clients, _, Y, _, _ = gaussian_problem(n=50, m=30, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = FederatedOTMap(0.1, max_iter=5, aggregation="parameter").fit(clients, Y)
    prob = EntropicOTProblem(Y, epsilon=est.epsilon_, normalize_cost=None)
    masses = sum(len(c) * prob.local_statistic(c, est.potential_)[0]["mass"] for c in clients)
    expected = np.abs(masses / sum(map(len, clients)) - est.target_weights_).sum()
    assert_allclose(est.marginal_error_, expected, rtol=1e-8)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "params, y, err, match",
    [
        (dict(epsilon=0.0), None, ValueError, "epsilon must be > 0"),
        (dict(epsilon=-1.0), None, ValueError, "epsilon must be > 0"),
        (dict(epsilon="small"), None, TypeError, "epsilon must be a number"),
        (dict(normalize_cost="max"), None, ValueError, "normalize_cost"),
        (dict(n_reference=0), None, ValueError, "n_reference must be >= 1"),
        (dict(), np.ones((5, 2)), ValueError, "y .the target sample. has 2 feature.s. but the source X has 3"),
        (dict(), np.ones(5), ValueError, "has 1 feature.s. but the source X has 3"),
        (dict(), np.array([[0, 1, np.nan]]), ValueError, "y .the target sample.*NaN"),
        (dict(), np.ones((2, 2, 3)), ValueError, "y .the target sample."),
        (dict(target_weights=[1, 2]), np.ones((3, 3)), ValueError, "target_weights has shape"),
        (dict(target_weights=[1, 0, 1]), np.ones((3, 3)), ValueError, "strictly positive"),
        (dict(target_weights=[1, np.inf, 1]), np.ones((3, 3)), ValueError, "target_weights"),
    ],
)
def test_bad_parameters_and_targets(params, y, err, match):
    X = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(err, match=match):
        FederatedOTMap(max_iter=2, **params).fit(X, y)


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
