"""FederatedGaussianMixture and GaussianMixtureProblem: batch FedMM is scikit-learn's EM."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from skfedmm import FederatedGaussianMixture, FedMM
from skfedmm.problems import GaussianMixtureProblem

K, D = 4, 3
TYPES = ["full", "tied", "diag", "spherical"]


@pytest.fixture(scope="module")
def data():
    X, y = make_blobs(480, n_features=D, centers=K, cluster_std=1.5, random_state=0)
    return X, y


def initial(X, covariance_type, seed=1):
    rng = np.random.default_rng(seed)
    means = X[rng.choice(X.shape[0], K, replace=False)]
    weights = rng.dirichlet(np.full(K, 5.0))
    prec = {
        "full": np.stack([np.eye(D) * s for s in (0.5, 1.0, 2.0, 0.8)]),
        "tied": np.eye(D) * 0.7,
        "diag": rng.uniform(0.5, 2.0, size=(K, D)),
        "spherical": rng.uniform(0.5, 2.0, size=K),
    }[covariance_type]
    return dict(weights_init=weights, means_init=means, precisions_init=prec)


def splits(X):
    n = X.shape[0]
    order = np.random.default_rng(3).permutation(n)
    return {
        "one": [X],
        "uneven": [X[:7], X[7:300], X[300:]],
        "shuffled": np.array_split(X[order], 6),
    }


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("split", ["one", "uneven", "shuffled"])
@pytest.mark.parametrize("covariance_type", TYPES)
def test_batch_fedmm_is_sklearn_em(data, covariance_type, split):
    """Same init, same number of iterations: EM's parameters and lower bound, to 1e-8."""
    X, _ = data
    init = initial(X, covariance_type)
    pooled = X if split != "shuffled" else np.vstack(splits(X)[split])
    for max_iter in (1, 6):
        ref = quiet(GaussianMixture(K, covariance_type=covariance_type, max_iter=max_iter, tol=0,
                                    **init).fit, pooled)
        fed = quiet(FederatedGaussianMixture(K, covariance_type=covariance_type,
                                             max_iter=max_iter, tol=0, **init).fit,
                    splits(X)[split])
        assert fed.n_iter_ == ref.n_iter_ == max_iter
        np.testing.assert_allclose(fed.means_, ref.means_, atol=1e-8, rtol=0)
        np.testing.assert_allclose(fed.weights_, ref.weights_, atol=1e-8, rtol=0)
        np.testing.assert_allclose(fed.covariances_, ref.covariances_, atol=1e-8, rtol=0)
        np.testing.assert_allclose(fed.precisions_, ref.precisions_, atol=1e-8, rtol=1e-8)
        assert abs(fed.lower_bound_ - ref.lower_bound_) < 1e-8
        np.testing.assert_allclose(fed.lower_bounds_, ref.lower_bounds_, atol=1e-8, rtol=0)


@pytest.mark.parametrize("covariance_type", TYPES)
def test_convergence_matches_sklearn(data, covariance_type):
    """tol compares absolute changes of the mean log-likelihood, as scikit-learn."""
    X, _ = data
    init = initial(X, covariance_type)
    ref = GaussianMixture(K, covariance_type=covariance_type, tol=1e-4, **init).fit(X)
    fed = FederatedGaussianMixture(K, covariance_type=covariance_type, tol=1e-4,
                                   **init).fit(splits(X)["uneven"])
    assert ref.converged_ and fed.converged_
    assert fed.n_iter_ == ref.n_iter_
    assert abs(fed.score(X) - ref.score(X)) < 1e-8
    assert abs(fed.bic(X) - ref.bic(X)) < 1e-6 and abs(fed.aic(X) - ref.aic(X)) < 1e-6
    np.testing.assert_allclose(fed.predict_proba(X), ref.predict_proba(X), atol=1e-8)


@pytest.mark.parametrize("covariance_type", TYPES)
def test_log_likelihood_never_decreases(data, covariance_type):
    X, _ = data
    fed = quiet(FederatedGaussianMixture(K, covariance_type=covariance_type, max_iter=30, tol=0,
                                         random_state=0).fit, splits(X)["uneven"])
    assert np.all(np.diff(fed.lower_bounds_) >= -1e-10)


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
@pytest.mark.parametrize("covariance_type", TYPES)
def test_every_init_fits(data, covariance_type, init_params):
    X, _ = data
    fed = FederatedGaussianMixture(K, covariance_type=covariance_type, init_params=init_params,
                                   max_iter=200, random_state=0).fit(splits(X)["uneven"])
    assert np.isfinite(fed.lower_bound_) and np.isclose(fed.weights_.sum(), 1)
    again = FederatedGaussianMixture(K, covariance_type=covariance_type, init_params=init_params,
                                     max_iter=200, random_state=0).fit(splits(X)["uneven"])
    np.testing.assert_array_equal(fed.means_, again.means_)  # deterministic


def test_kmeans_init_is_close_to_sklearn_fit(data):
    """The federated k-means initialization is as good as scikit-learn's on blobs
    (both stop at tol=1e-3, so they agree to a few thousandths)."""
    X, _ = data
    fed = FederatedGaussianMixture(K, random_state=0).fit(splits(X)["shuffled"])
    ref = GaussianMixture(K, random_state=0).fit(X)
    assert fed.score(X) > ref.score(X) - 5e-3


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random"])
def test_default_inits_send_no_rows(data, init_params):
    """The init statistic's shapes do not depend on the client's number of rows."""
    X, _ = data
    problem = GaussianMixtureProblem(K, "full", init_params=init_params)
    a, b = problem.init_statistic(X[:50]), problem.init_statistic(X[50:177])
    assert a.keys() == b.keys()
    for name in a:
        assert np.shape(a[name]) == np.shape(b[name])
        assert 50 not in np.shape(a[name]) and 127 not in np.shape(b[name])
    assert "rows" not in a
    assert GaussianMixtureProblem(K, init_params="random_from_data").init_statistic(X)["rows"].shape == (K, D)


def test_all_given_inits_need_no_client_summary(data):
    X, _ = data
    problem = GaussianMixtureProblem(K, "full", **initial(X, "full"))
    assert problem.init_statistic(X) is None


@pytest.mark.parametrize("covariance_type", TYPES)
def test_project_keeps_statistics_valid(data, covariance_type):
    X, _ = data
    problem = GaussianMixtureProblem(K, covariance_type, **initial(X, covariance_type))
    theta = problem.init_parameter(None, None)
    stat, _ = problem.local_statistic(X, theta)
    same = problem.project(stat)
    for name in stat:  # (up to the symmetrization of the second moments)
        np.testing.assert_allclose(same[name], stat[name], rtol=1e-14, atol=0)
    rng = np.random.default_rng(0)
    noisy = {name: v + rng.normal(scale=5 * np.abs(v).max(), size=np.shape(v)) for name, v in stat.items()}
    if covariance_type in ("full", "tied"):  # keep the noise symmetric, as the scatter is
        noisy["xx"] = (noisy["xx"] + np.swapaxes(noisy["xx"], -1, -2)) / 2
    fixed = problem.project(noisy)
    assert np.all(fixed["resp"] > 0)
    s0, s1, s2 = fixed["resp"], fixed["x"], fixed["xx"]
    if covariance_type == "full":
        scatter = s2 - np.einsum("ki,kj->kij", s1, s1) / s0[:, None, None]
        assert np.linalg.eigvalsh(scatter).min() >= -1e-9 * np.abs(scatter).max()
    elif covariance_type == "tied":
        scatter = s2 - (s1 / s0[:, None]).T @ s1
        assert np.linalg.eigvalsh(scatter).min() >= -1e-9 * np.abs(scatter).max()
    elif covariance_type == "diag":
        assert np.all(s2 - s1**2 / s0[:, None] >= -1e-12 * np.abs(s2).max())
    else:
        assert np.all(s2 - (s1**2).sum(axis=1) / s0 >= -1e-12 * np.abs(s2).max())
    theta = problem.minimize(fixed, theta)  # a valid model (positive definite covariances)
    assert np.all(np.isfinite(theta["precisions_cholesky"]))


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_noisy_rounds_stay_valid_and_close(data, covariance_type):
    """Compression and partial participation: valid models near the batch fit."""
    X, _ = data
    clients = splits(X)["shuffled"]
    batch = quiet(FederatedGaussianMixture(K, covariance_type=covariance_type, max_iter=40,
                                           random_state=0).fit, clients)
    noisy = quiet(FederatedGaussianMixture(K, covariance_type=covariance_type, max_iter=40,
                                           participation=0.7, compression=("qsgd", {"s": 16}),
                                           random_state=0).fit, clients)
    assert np.all(np.isfinite(noisy.means_))
    assert noisy.score(X) > batch.score(X) - 0.05


def test_warm_start_continues_bitwise(data):
    X, _ = data
    clients = splits(X)["uneven"]
    kwargs = dict(n_components=K, tol=0, random_state=0, participation=0.7)
    ten = quiet(FederatedGaussianMixture(max_iter=10, **kwargs).fit, clients)
    est = FederatedGaussianMixture(max_iter=5, warm_start=True, **kwargs)
    quiet(est.fit, clients)
    quiet(est.fit, clients)
    np.testing.assert_array_equal(est.means_, ten.means_)
    assert est.n_iter_ == 5


def test_n_init_keeps_the_best(data):
    X, _ = data
    one = FederatedGaussianMixture(K, init_params="random", n_init=1, max_iter=30, random_state=2).fit(X)
    three = FederatedGaussianMixture(K, init_params="random", n_init=3, max_iter=30, random_state=2).fit(X)
    assert three.lower_bound_ >= one.lower_bound_


def test_fit_predict_in_row_order(data):
    X, _ = data
    ids = np.random.default_rng(0).integers(0, 3, size=X.shape[0])
    est = FederatedGaussianMixture(K, random_state=0)
    labels = est.fit_predict(X, client_ids=ids)
    np.testing.assert_array_equal(labels, est.predict(X))
    np.testing.assert_allclose(est.predict_proba(X).sum(axis=1), 1)
    Xs, ys = est.sample(50)
    assert Xs.shape == (50, D) and ys.shape == (50,)


def test_parameter_averaging_baseline_runs(data):
    X, y = data
    clients = [X[y == j] for j in range(K)]  # one component per client
    est = quiet(FederatedGaussianMixture(K, aggregation="parameter", local_steps=2, max_iter=20,
                                         random_state=0).fit, clients)
    assert np.isclose(est.weights_.sum(), 1) and np.all(np.isfinite(est.precisions_cholesky_))


def test_match_components_permutes_to_previous_means():
    problem = GaussianMixtureProblem(2, "diag", match_components=True)
    prev = {"means": np.array([[5.0, 5.0], [0.0, 0.0]])}
    stat = {"resp": np.array([0.5, 0.5]), "x": np.array([[0.0, 0.1], [2.5, 2.4]]),
            "xx": np.array([[1.0, 1.0], [13.0, 13.0]])}
    theta = problem.minimize(stat, prev)
    assert theta["means"][0, 0] > theta["means"][1, 0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(means_init=np.zeros((3, D))), "means"),
        (dict(weights_init=np.full(K, 0.5)), "normalized"),
        (dict(precisions_init=-np.ones(K), covariance_type="spherical"), "spherical precision"),
    ],
)
def test_bad_initial_parameters_are_named(data, kwargs, match):
    X, _ = data
    with pytest.raises(ValueError, match=match):
        FederatedGaussianMixture(K, **kwargs).fit(X)


def test_too_few_rows():
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        FederatedGaussianMixture(5).fit([np.ones((2, 2)), np.zeros((1, 2))])


def test_problem_on_engine_directly(data):
    """The problem is a plain MMProblem: the engine runs it without the estimator."""
    X, _ = data
    state = FedMM(GaussianMixtureProblem(K, "spherical"), max_iter=5).fit(splits(X)["uneven"])
    assert set(state.theta) == {"weights", "means", "covariances", "precisions_cholesky"}


def test_log_responsibilities_is_scipy_logsumexp():
    from scipy.special import logsumexp

    from skfedmm.problems.mixture import log_responsibilities

    a = np.random.default_rng(0).normal(scale=300, size=(50, 4))
    a[0, :] = -np.inf
    a[1, 2] = -np.inf
    log_norm, resp = log_responsibilities(a)
    with np.errstate(invalid="ignore"):
        expected = logsumexp(a, axis=1)
        np.testing.assert_allclose(log_norm, expected, rtol=1e-14)
        np.testing.assert_allclose(resp[1:], np.exp(a - expected[:, None])[1:], rtol=1e-12, atol=1e-300)


def test_warm_start_refuses_changed_initialization(data):
    X, _ = data
    init = initial(X, "full")
    est = quiet(FederatedGaussianMixture(K, max_iter=2, warm_start=True, **init).fit, X)
    est.set_params(means_init=init["means_init"] + 1)
    with pytest.raises(ValueError, match="means_init changed"):
        est.fit(X)
    est.set_params(means_init=init["means_init"].copy())  # equal values continue
    quiet(est.fit, X)


def test_results_do_not_depend_on_n_jobs(data):
    X, _ = data
    clients = splits(X)["shuffled"]
    kw = dict(n_components=K, max_iter=10, tol=0, random_state=0, participation=0.7)
    a = quiet(FederatedGaussianMixture(n_jobs=1, **kw).fit, clients)
    b = quiet(FederatedGaussianMixture(n_jobs=2, **kw).fit, clients)
    np.testing.assert_array_equal(a.means_, b.means_)


def test_verbose_interval_spaces_the_reports(capsys, no_tqdm):
    """verbose_interval, as in scikit-learn: a report every that many rounds."""
    X = np.random.default_rng(0).normal(size=(60, 2))
    lines = {}
    for interval in (1, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            FederatedGaussianMixture(2, max_iter=7, tol=0, verbose=1, verbose_interval=interval,
                                     random_state=0).fit([X[:30], X[30:]])
        out = capsys.readouterr().out
        lines[interval] = [ln for ln in out.splitlines() if ln.startswith("[FedMM] round")]
    assert len(lines[1]) == 6  # rounds 1..6 after the initial round
    assert [ln.split()[2] for ln in lines[3]] == ["3", "6"]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_max_iter_zero_gives_the_initial_parameters(covariance_type):
    """max_iter=0, as scikit-learn: the initialization, no EM iteration, no warning."""
    X, _ = make_blobs(200, centers=3, n_features=2, random_state=0)
    # (scikit-learn cannot be given precisions_init too with max_iter=0: it
    # then has no covariances_)
    kw = dict(covariance_type=covariance_type, means_init=X[[0, 70, 140]], max_iter=0, tol=0,
              weights_init=np.array([0.2, 0.3, 0.5]))
    ref = GaussianMixture(3, **kw).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = FederatedGaussianMixture(3, random_state=0, **kw).fit([X[:50], X[50:]])
    assert est.n_iter_ == ref.n_iter_ == 0 and not est.converged_
    assert est.lower_bound_ == ref.lower_bound_ == -np.inf and len(est.lower_bounds_) == 0
    np.testing.assert_allclose(est.means_, ref.means_, rtol=1e-8)
    np.testing.assert_allclose(est.weights_, ref.weights_, rtol=1e-8)
    np.testing.assert_allclose(est.means_, kw["means_init"], rtol=1e-12)
    # one EM iteration moves them
    one = FederatedGaussianMixture(3, random_state=0, **{**kw, "max_iter": 1}).fit(X)
    assert not np.allclose(one.means_, est.means_)
    # and a continued fit goes on from there
    est.set_params(warm_start=True, max_iter=1)
    est.fit([X[:50], X[50:]])
    np.testing.assert_allclose(est.means_, one.means_, rtol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scores_in_the_rows_dtype(data, dtype):
    X = data[0].astype(dtype)
    gm = FederatedGaussianMixture(2, random_state=0).fit(X)
    assert gm.score_samples(X).dtype == dtype and gm.predict_proba(X).dtype == dtype
    assert gm.score(X).dtype == dtype
    np.testing.assert_allclose(gm.score(X), gm.score_samples(X).mean(), rtol=1e-5)
