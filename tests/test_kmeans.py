"""FederatedKMeans and KMeansProblem: batch FedMM is scikit-learn's Lloyd."""

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.exceptions import ConvergenceWarning

from skfedmm import FederatedKMeans
from skfedmm.problems import KMeansProblem
from skfedmm.problems.kmeans import assign_clusters

K, D = 5, 4


@pytest.fixture(scope="module")
def data():
    X, y = make_blobs(600, n_features=D, centers=K, cluster_std=2.5, random_state=0)
    return X, y


def splits(X):
    order = np.random.default_rng(3).permutation(X.shape[0])
    return {
        "one": [X],
        "uneven": [X[:3], X[3:350], X[350:]],
        "shuffled": np.array_split(X[order], 7),
    }


@pytest.mark.parametrize("split", ["one", "uneven", "shuffled"])
@pytest.mark.parametrize("max_iter", [1, 3, 20])
def test_batch_fedmm_is_sklearn_lloyd(data, split, max_iter):
    """Same initial centres: the centres, inertia and labels of Lloyd, to 1e-10."""
    X, _ = data
    clients = splits(X)[split]
    pooled = np.vstack(clients)
    init = X[np.random.default_rng(1).choice(X.shape[0], K, replace=False)]
    ref = KMeans(K, init=init, n_init=1, max_iter=max_iter, tol=0, algorithm="lloyd").fit(pooled)
    fed = FederatedKMeans(K, init=init, max_iter=max_iter, tol=0).fit(clients)
    np.testing.assert_allclose(fed.cluster_centers_, ref.cluster_centers_, atol=1e-10, rtol=0)
    np.testing.assert_allclose(fed.inertia_, ref.inertia_, rtol=1e-10)
    np.testing.assert_array_equal(fed.labels_, ref.labels_)
    assert fed.n_iter_ == ref.n_iter_


@pytest.mark.parametrize("tol", [1e-4, 1e-2])
def test_tolerance_as_sklearn(data, tol):
    """tol scales with the pooled mean feature variance (from the clients' moments)."""
    X, _ = data
    init = X[:K]
    ref = KMeans(K, init=init, n_init=1, tol=tol, algorithm="lloyd").fit(X)
    fed = FederatedKMeans(K, init=init, tol=tol).fit(splits(X)["uneven"])
    assert fed.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(fed.cluster_centers_, ref.cluster_centers_, atol=1e-10)


def test_inertia_never_increases(data):
    X, _ = data
    fed = FederatedKMeans(K, max_iter=30, tol=0, random_state=0).fit(splits(X)["uneven"])
    assert np.all(np.diff(fed.history_["objective"]) <= 1e-12)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_federated_init_reaches_sklearn_quality(data, init):
    X, _ = data
    fed = FederatedKMeans(K, init=init, random_state=0).fit(splits(X)["shuffled"])
    ref = KMeans(K, init=init, random_state=0).fit(X)
    assert fed.inertia_ <= 1.01 * ref.inertia_


def test_default_init_sends_no_rows(data):
    X, _ = data
    problem = KMeansProblem(K)
    a, b = problem.init_statistic(X[:50]), problem.init_statistic(X[50:177])
    for name in a:
        assert np.shape(a[name]) == np.shape(b[name])
        assert 50 not in np.shape(a[name]) and 127 not in np.shape(b[name])
    np.testing.assert_allclose(a["mass"].sum(), 1)


def test_empty_cluster_is_reseeded_without_rows(data):
    """A centre no row is closest to moves next to the worst cluster (statistics only)."""
    X, _ = data
    init = np.vstack([X[:K - 1], np.full((1, D), 1e3)])  # the last centre attracts no row
    fed = FederatedKMeans(K, init=init, max_iter=50, tol=0, random_state=0).fit(splits(X)["uneven"])
    assert np.bincount(fed.labels_, minlength=K).min() > 0
    assert np.abs(fed.cluster_centers_).max() < 100
    ref = KMeans(K, init="k-means++", n_init=10, random_state=0).fit(X)
    assert fed.inertia_ <= 1.05 * ref.inertia_


def test_minimize_empty_rule_is_deterministic():
    problem = KMeansProblem(2)
    stat = {"count": np.array([1.0, 0.0]), "sum": np.array([[2.0, 2.0], [0.0, 0.0]]),
            "sq": np.array([10.0, 0.0])}
    prev = np.array([[0.0, 0.0], [9.0, 9.0]])
    a = problem.minimize(stat, prev, np.random.default_rng(0))
    b = problem.minimize(stat, prev, np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    # rms radius of cluster 0: sqrt(10 - 8) around its centre (2, 2)
    assert np.isclose(np.linalg.norm(a[1] - a[0]), np.sqrt(2.0))
    np.testing.assert_array_equal(problem.minimize(stat, prev, None)[1], prev[1])


def test_methods(data):
    X, _ = data
    ids = np.random.default_rng(0).integers(0, 4, size=X.shape[0])
    est = FederatedKMeans(K, random_state=0)
    labels = est.fit_predict(X, client_ids=ids)
    np.testing.assert_array_equal(labels, est.predict(X))
    assert np.isclose(-est.score(X), est.inertia_)
    dist = est.fit_transform(X, client_ids=ids)
    np.testing.assert_allclose(dist.argmin(axis=1), est.labels_)


def test_warm_start_continues_bitwise(data):
    X, _ = data
    clients = splits(X)["uneven"]
    kwargs = dict(n_clusters=K, tol=0, random_state=0, participation=0.7, compression="qsgd")
    ten = FederatedKMeans(max_iter=10, **kwargs).fit(clients)
    est = FederatedKMeans(max_iter=5, warm_start=True, **kwargs).fit(clients)
    est.fit(clients)
    np.testing.assert_array_equal(est.cluster_centers_, ten.cluster_centers_)


def test_n_init_keeps_the_best(data):
    X, _ = data
    one = FederatedKMeans(K, init="random", n_init=1, random_state=2).fit(X)
    five = FederatedKMeans(K, init="random", n_init=5, random_state=2).fit(X)
    assert five.inertia_ <= one.inertia_


def test_parameter_averaging_baseline_runs(data):
    X, y = data
    clients = [X[y == j] for j in range(K)]
    est = FederatedKMeans(K, aggregation="parameter", max_iter=10, random_state=0).fit(clients)
    assert np.all(np.isfinite(est.cluster_centers_))


def test_errors_name_the_problem(data):
    X, _ = data
    with pytest.raises(ValueError, match="n_samples=3 should be >= n_clusters=5"):
        FederatedKMeans(K).fit(X[:3])
    with pytest.raises(ValueError, match="initial centers"):
        FederatedKMeans(K, init=X[:2]).fit(X)
    with pytest.raises(ValueError, match="client 1"):
        FederatedKMeans(K).fit([X[:50], np.full((5, D), np.nan)])


def test_results_do_not_depend_on_n_jobs(data):
    X, _ = data
    clients = splits(X)["shuffled"]
    kw = dict(n_clusters=K, max_iter=10, tol=0, random_state=0, participation=0.7)
    a = FederatedKMeans(n_jobs=1, **kw).fit(clients)
    b = FederatedKMeans(n_jobs=2, **kw).fit(clients)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)


# ------------------------------------------------------------------ memory
def _centre_walk(X, k, rng):
    """Centres as a fit sees them: Lloyd-like small steps, a jump, an empty cluster."""
    c = X[rng.choice(X.shape[0], k, replace=False)].copy()
    steps = [c]
    for t in range(12):
        c = c + rng.normal(scale=0.3 if t != 6 else 4.0, size=c.shape)
        if t == 9:
            c[0] = 1e3  # a cluster nobody joins
        steps.append(c.copy())
    for _ in range(10):  # settled: tiny moves, the bounds keep almost every label
        c = c + rng.normal(scale=1e-3, size=c.shape)
        steps.append(c.copy())
    return steps


@pytest.mark.parametrize("k", [1, 2, K])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_memory_statistic_equals_a_full_pass(data, k, dtype):
    """With the client cache (Hamerly's bounds), the statistic of a full pass
    to rounding, the exact labels, and the memory passed in is never modified."""
    X = data[0].astype(dtype)
    problem = KMeansProblem(k).prepare({"mean": X.mean(0), "sq": (X * X).mean(0)})
    memory, bounded = problem.client_cache(X), 0
    for c in _centre_walk(X, k, np.random.default_rng(k)):
        c = c.astype(dtype)
        before = {n: a.copy() for n, a in memory.items()}
        stat, loss, new_memory = problem.cached_statistic(X, c, memory, None)
        if before:
            for name, a in before.items():
                np.testing.assert_array_equal(memory[name], a)
            bounded += "keys" in before
        ref, ref_loss = problem.local_statistic(X, c)
        tol = 1e-9 if dtype == np.float64 else 1e-4
        for name in ref:
            np.testing.assert_allclose(stat[name], ref[name], rtol=tol, atol=tol * np.abs(ref[name]).max())
        np.testing.assert_allclose(loss, ref_loss, rtol=tol)
        labels, _ = KMeansProblem(k).local_statistic.__globals__["assign_clusters"](X, c)
        np.testing.assert_array_equal(new_memory["labels"], labels)
        memory = new_memory
    assert bounded >= 3  # the bounds were used


def test_memory_does_not_outlive_changed_rows(data):
    """A continued fit on other rows (same shapes) forgets the clients' memory:
    it equals the continued fit of a state without memory, and a continued fit
    on the same rows keeps it (bitwise the uninterrupted fit)."""
    from dataclasses import replace

    from skfedmm.engine import FedMM

    X, _ = data
    clients = splits(X)["uneven"]
    others = [c[::-1] * 1.5 + 2.0 for c in clients]
    engine = FedMM(KMeansProblem(K, init=X[:K]), max_iter=6, tol=0, random_state=0)
    state = engine.fit(clients)
    assert all("keys" in c.cache for c in state.clients)
    forgot = engine.fit(others, state=replace(
        state, clients=[replace(c, cache=None) for c in state.clients]))
    continued = engine.fit(others, state=state)
    np.testing.assert_array_equal(continued.theta, forgot.theta)
    np.testing.assert_array_equal(
        continued.history.objective, forgot.history.objective)
    # same rows: the memory is kept, and 6 + 6 rounds are 12 rounds
    straight = FedMM(KMeansProblem(K, init=X[:K]), max_iter=12, tol=0, random_state=0).fit(clients)
    resumed = engine.fit(clients, state=state)
    np.testing.assert_array_equal(resumed.theta, straight.theta)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_memory_follows_rows_changing_cluster(dtype):
    """Drifting centres: rounds that use the bounds while rows change cluster
    give the labels and statistic of a full pass."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 5)).astype(dtype)
    problem = KMeansProblem(6).prepare({"mean": X.mean(0), "sq": (X * X).mean(0)})
    c, memory, previous, moved = X[:6].copy(), {}, None, 0
    tol = 1e-9 if dtype == np.float64 else 1e-4
    for _ in range(40):
        c = (c + rng.normal(scale=0.02, size=c.shape)).astype(dtype)
        bounded = "keys" in memory
        stat, _, memory = problem.cached_statistic(X, c, memory, None)
        ref, _ = problem.local_statistic(X, c)
        labels, _ = assign_clusters(X, c)
        np.testing.assert_array_equal(memory["labels"], labels)
        for name in ref:
            np.testing.assert_allclose(stat[name], ref[name], rtol=tol, atol=1e-12)
        if bounded:
            moved += int(np.count_nonzero(previous != labels))
        previous = labels
    assert moved > 100  # the bounds were used while rows moved


def test_sklearn_conveniences(data, capsys):
    """What a KMeans user relies on besides the centres (also covered, when
    scikit-learn's test module is installed, by tests/test_sklearn_k_means.py)."""
    X, _ = data
    init = X[:K]
    lloyd = FederatedKMeans(K, init=init, verbose=1).fit(X)
    out = capsys.readouterr().out
    assert "Initialization complete" in out and "Iteration 0, inertia" in out
    assert "Converged at iteration" in out
    # "elkan" is accepted and runs the same iterations
    elkan = FederatedKMeans(K, init=init, algorithm="elkan").fit(X)
    np.testing.assert_array_equal(elkan.cluster_centers_, lloyd.cluster_centers_)
    assert elkan.n_iter_ == lloyd.n_iter_ and lloyd._n_init == 1
    with pytest.warns(RuntimeWarning, match="single cluster"):
        FederatedKMeans(1, algorithm="elkan").fit(X)
    with pytest.raises(ValueError, match="number of features of the data 4"):
        FederatedKMeans(K, init=init[:, :2]).fit(X)
    # fewer distinct rows than clusters: scikit-learn's warning
    with pytest.warns(ConvergenceWarning, match=r"distinct clusters \(3\) found smaller than n_clusters"):
        FederatedKMeans(4, random_state=0).fit(np.array([[0, 0], [0, 1], [1, 0], [1, 0.0]]))


def test_fixed_point_initialization_stops_after_one_iteration(data):
    """Initial centres that Lloyd leaves in place: one iteration, as scikit-learn."""
    X, _ = data
    centres = KMeans(K, n_init=1, random_state=0, tol=0).fit(X).cluster_centers_
    ref = KMeans(K, init=centres, n_init=1).fit(X)
    ours = FederatedKMeans(K, init=centres).fit(splits(X)["shuffled"])
    assert ours.n_iter_ == ref.n_iter_ == 1
