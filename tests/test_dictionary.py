import numpy as np
import pytest
from joblib import parallel_config
from sklearn.decomposition import sparse_encode
from sklearn.decomposition._dict_learning import _update_dict

from skfedmm import FederatedDictionaryLearning, QSGD
from skfedmm.datasets import atom_recovery, make_sparse_coded_clients
from skfedmm.problems.dictionary import (
    DictionaryLearningProblem,
    batch_lasso_cd,
    lasso_objective,
    update_dict,
)


def unit_rows(rng, k, d):
    D = rng.standard_normal((k, d))
    return D / np.linalg.norm(D, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def small_clients():
    clients, D = make_sparse_coded_clients(
        n_clients=4, n_samples=60, n_features=12, n_components=10, atoms_per_client=4,
        random_state=0,
    )
    return clients, D


# ---------------------------------------------------------------- kernels
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_batch_coder_matches_sklearn_lasso_cd(positive, alpha):
    rng = np.random.default_rng(0)
    D = unit_rows(rng, 50, 30)
    H = np.where(rng.random((400, 50)) < 0.1, rng.standard_normal((400, 50)), 0)
    X = H @ D + 0.05 * rng.standard_normal((400, 30))
    ours = batch_lasso_cd(X, D, alpha, positive=positive)
    ref = sparse_encode(X, D, algorithm="lasso_cd", alpha=alpha, positive=positive)
    f_ours = lasso_objective(X, ours, D, alpha).sum()
    f_ref = lasso_objective(X, ref, D, alpha).sum()
    assert abs(f_ours - f_ref) <= 1e-4 * abs(f_ref)
    if positive:
        assert np.all(ours >= 0)


def test_batch_coder_rows_are_independent():
    """A row's code does not depend on the other rows of the batch."""
    rng = np.random.default_rng(1)
    D = unit_rows(rng, 20, 15)
    X = rng.standard_normal((100, 15))
    full = batch_lasso_cd(X, D, 0.2)
    part = batch_lasso_cd(X[37:61], D, 0.2)
    np.testing.assert_allclose(full[37:61], part, rtol=1e-12, atol=1e-14)


def test_batch_coder_float32_and_zero_atoms():
    rng = np.random.default_rng(2)
    D = unit_rows(rng, 8, 6).astype(np.float32)
    D[3] = 0  # an empty atom gets a zero code
    X = rng.standard_normal((30, 6)).astype(np.float32)
    H = batch_lasso_cd(X, D, 0.1)
    assert H.dtype == np.float32 and np.all(H[:, 3] == 0) and np.all(np.isfinite(H))


def test_update_dict_one_sweep_equals_sklearn():
    """Our M-step from (A, B) with one sweep is sklearn's _update_dict."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 10))
    D = unit_rows(rng, 6, 10)
    code = sparse_encode(X, D, algorithm="lasso_cd", alpha=0.1)
    assert np.all(np.diag(code.T @ code) > 1e-6)
    expected = D.copy()
    _update_dict(expected, X, code.copy())
    A, B = code.T @ code / 80, X.T @ code / 80  # means: the same ratio
    ours = update_dict(D, A, B, max_sweeps=1)
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)


def test_update_dict_decreases_surrogate_and_keeps_constraints():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 10))
    D = unit_rows(rng, 6, 10)
    code = np.abs(sparse_encode(X, D, algorithm="lasso_cd", alpha=0.1))
    A, B = code.T @ code, X.T @ code

    def surrogate(D):
        return 0.5 * np.trace(D.T @ A @ D) - np.trace(D @ B)

    for positive in (False, True):
        new = update_dict(D, A, B, positive=positive)
        assert surrogate(new) <= surrogate(np.maximum(D, 0) if positive else D) + 1e-12
        assert np.all(np.linalg.norm(new, axis=1) <= 1 + 1e-12)
        if positive:
            assert np.all(new >= 0)


def test_unused_atoms_are_redrawn_from_the_stream_not_from_data():
    rng = np.random.default_rng(0)
    D = unit_rows(rng, 4, 5)
    A = np.diag([1.0, 0.0, 2.0, 1.0])
    B = rng.standard_normal((5, 4))
    B[:, 1] = 0
    new1 = update_dict(D, A, B, rng=np.random.default_rng(5))
    new2 = update_dict(D, A, B, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(new1, new2)
    assert not np.allclose(new1[1], D[1]) and np.isclose(np.linalg.norm(new1[1]), 1)
    kept = update_dict(D, A, B, rng=None)
    np.testing.assert_array_equal(kept[1], D[1])


# ------------------------------------------------------------- invariants
def test_one_client_equals_centralized_batch_mm(small_clients):
    clients, _ = small_clients
    X = np.vstack(clients)
    D0 = unit_rows(np.random.default_rng(3), 10, 12)
    n_rounds = 6
    est = FederatedDictionaryLearning(
        n_components=10, alpha=0.1, max_iter=n_rounds, tol=0, dict_init=D0
    ).fit(X)
    # plain centralized MM with the same pieces: code all rows (each warm-
    # started at its own last code from the second round on), update D
    problem = DictionaryLearningProblem(10, 0.1, 12)
    D = D0.copy()
    objectives = []
    cache = None
    for t in range(n_rounds + 1):
        if t == 0:  # the initial full round codes from zero
            stat, loss = problem.local_statistic(X, D)
        else:
            stat, loss, cache = problem.cached_statistic(X, D, cache or {}, None)
        objectives.append(loss)
        D = problem.minimize(stat, D)
    np.testing.assert_allclose(est.components_, D, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(est.error_, objectives, rtol=1e-10)
    # without the cache, every round codes from zero
    cold = FederatedDictionaryLearning(
        n_components=10, alpha=0.1, max_iter=n_rounds, tol=0, dict_init=D0, code_cache=False
    ).fit(X)
    D = D0.copy()
    objectives = []
    for _ in range(n_rounds + 1):
        stat, loss = problem.local_statistic(X, D)
        objectives.append(loss)
        D = problem.minimize(stat, D)
    np.testing.assert_allclose(cold.components_, D, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(cold.error_, objectives, rtol=1e-10)


@pytest.mark.parametrize("splitter", ["given", "shuffled-uneven", "client_ids"])
def test_batch_fedmm_is_split_invariant(small_clients, splitter):
    clients, _ = small_clients
    X = np.vstack(clients)
    kwargs = dict(n_components=10, alpha=0.1, max_iter=5, tol=0, random_state=0)
    pooled = FederatedDictionaryLearning(**kwargs).fit(X)
    if splitter == "given":
        fed = FederatedDictionaryLearning(**kwargs).fit(clients)
    elif splitter == "shuffled-uneven":
        perm = np.random.default_rng(0).permutation(len(X))
        fed = FederatedDictionaryLearning(**kwargs).fit(np.split(X[perm], [3, 50, 51, 170]))
    else:
        ids = np.random.default_rng(1).integers(0, 7, size=len(X))
        fed = FederatedDictionaryLearning(**kwargs).fit(X, client_ids=ids)
    assert fed.n_clients_ > 1
    np.testing.assert_allclose(fed.components_, pooled.components_, rtol=1e-8, atol=1e-10)


def test_objective_non_increasing_in_batch_mode(small_clients):
    clients, _ = small_clients
    est = FederatedDictionaryLearning(n_components=10, alpha=0.1, max_iter=15, tol=0,
                                      random_state=0).fit(clients)
    # exact M-step up to its sweep tolerance and an inexact coder (tol 1e-4):
    # the objective may only rise by rounding-level amounts
    assert np.all(np.diff(est.error_) <= 1e-6 * est.error_[:-1])
    assert est.error_[-1] < est.error_[0]


def test_deterministic_across_n_jobs_and_backends(small_clients):
    clients, _ = small_clients
    kwargs = dict(n_components=10, alpha=0.1, max_iter=4, tol=0, random_state=0,
                  participation=0.7, compression=QSGD(s=8), batch_size=40)
    ref = FederatedDictionaryLearning(n_jobs=1, **kwargs).fit(clients)
    for backend in ("loky", "threading"):
        with parallel_config(backend=backend):
            other = FederatedDictionaryLearning(n_jobs=2, **kwargs).fit(clients)
        assert np.array_equal(ref.components_, other.components_)
        np.testing.assert_array_equal(ref.error_, other.error_)


def test_surrogate_beats_parameter_aggregation_on_heterogeneous_clients():
    clients, D_true = make_sparse_coded_clients(random_state=0)  # 10 x 500, 40 features, 30 atoms
    X = np.vstack(clients)
    kwargs = dict(n_components=30, alpha=0.1, max_iter=30, tol=0, random_state=0)
    surrogate = FederatedDictionaryLearning(**kwargs).fit(clients)
    parameter = FederatedDictionaryLearning(aggregation="parameter", **kwargs).fit(clients)
    f_s, f_p = -surrogate.score(X), -parameter.score(X)
    assert f_s <= 0.6 * f_p
    assert atom_recovery(D_true, surrogate.components_) >= 0.6
    assert atom_recovery(D_true, parameter.components_) <= 0.2


@pytest.mark.parametrize(
    "noise, slack",
    [(dict(participation=0.5), 1.03), (dict(participation=0.5, compression=("qsgd", {"s": 8})), None)],
)
def test_control_variates_reduce_the_heterogeneity_floor(noise, slack):
    clients, _ = make_sparse_coded_clients(n_clients=6, n_samples=100, n_features=16,
                                           n_components=12, atoms_per_client=3,
                                           random_state=1)
    X = np.vstack(clients)
    kwargs = dict(n_components=12, alpha=0.1, max_iter=40, tol=0, random_state=0)
    with_cv = FederatedDictionaryLearning(**kwargs, **noise).fit(clients)
    without = FederatedDictionaryLearning(cv_rate=0.0, **kwargs, **noise).fit(clients)
    exact = FederatedDictionaryLearning(**kwargs).fit(clients)
    f_cv, f_no, f_ex = -with_cv.score(X), -without.score(X), -exact.score(X)
    assert f_cv < f_no
    if slack is not None:
        assert f_cv <= slack * f_ex


# ------------------------------------------------------------------- API
def test_float32_end_to_end(small_clients):
    clients, _ = small_clients
    c32 = [c.astype(np.float32) for c in clients]
    est = FederatedDictionaryLearning(n_components=10, alpha=0.1, max_iter=3, random_state=0,
                                      compression="qsgd", participation=0.5).fit(c32)
    assert est.components_.dtype == np.float32
    assert est.transform(c32[0]).dtype == np.float32
    assert np.all(np.isfinite(est.components_))


@pytest.mark.parametrize("fit_algorithm", ["batch_cd", "cd", "lars"])
def test_fit_algorithms_agree(small_clients, fit_algorithm):
    clients, _ = small_clients
    ref = FederatedDictionaryLearning(n_components=10, alpha=0.1, max_iter=5, tol=0,
                                      random_state=0).fit(clients)
    est = FederatedDictionaryLearning(n_components=10, alpha=0.1, max_iter=5, tol=0,
                                      random_state=0, fit_algorithm=fit_algorithm).fit(clients)
    np.testing.assert_allclose(est.error_, ref.error_, rtol=1e-4)


def test_positive_options(small_clients):
    clients, _ = small_clients
    est = FederatedDictionaryLearning(n_components=6, alpha=0.1, max_iter=5, random_state=0,
                                      positive_code=True, positive_dict=True,
                                      transform_algorithm="lasso_cd").fit(clients)
    assert np.all(est.components_ >= 0)
    assert np.all(est.transform(clients[0]) >= 0)


@pytest.mark.parametrize("init", ["pca", "random"])
def test_inits_need_no_rows_on_the_server(small_clients, init):
    clients, _ = small_clients
    est = FederatedDictionaryLearning(n_components=14, alpha=0.1, max_iter=3, init=init,
                                      random_state=0).fit(clients)
    assert est.components_.shape == (14, 12)  # more atoms than features
    assert np.all(np.linalg.norm(est.components_, axis=1) <= 1 + 1e-12)


def test_pca_init_is_the_top_eigenvectors_of_the_pooled_second_moment(small_clients):
    clients, _ = small_clients
    X = np.vstack(clients)
    problem = DictionaryLearningProblem(3, 0.1, 12)
    M = sum(len(c) * problem.init_statistic(c)["M"] for c in clients) / len(X)
    D0 = problem.init_parameter({"M": M}, np.random.default_rng(0))
    _, _, Vt = np.linalg.svd(X, full_matrices=False)
    np.testing.assert_allclose(np.abs(D0 @ Vt[:3].T), np.eye(3), atol=1e-8)


def test_transform_inverse_transform_split_sign(small_clients):
    clients, _ = small_clients
    est = FederatedDictionaryLearning(n_components=10, alpha=0.1, max_iter=3, random_state=0,
                                      split_sign=True, transform_algorithm="lasso_cd",
                                      transform_alpha=0.01).fit(clients)
    code = est.transform(clients[1])
    assert code.shape == (60, 20) and np.all(code >= 0)
    rec = est.inverse_transform(code)
    assert rec.shape == clients[1].shape
    assert np.linalg.norm(rec - clients[1]) < 0.5 * np.linalg.norm(clients[1])
    with pytest.raises(ValueError, match="columns"):
        est.inverse_transform(code[:, :10])


def test_fit_transform_is_fit_then_transform(small_clients):
    clients, _ = small_clients
    est = FederatedDictionaryLearning(n_components=10, alpha=0.1, max_iter=3, random_state=0)
    codes = est.fit_transform(clients)
    np.testing.assert_allclose(codes, est.transform(np.vstack(clients)))
    names = est.get_feature_names_out()
    assert list(names[:2]) == ["federateddictionarylearning0", "federateddictionarylearning1"]


def test_score_is_minus_the_mean_objective(small_clients):
    clients, _ = small_clients
    X = np.vstack(clients)
    est = FederatedDictionaryLearning(n_components=10, alpha=0.1, max_iter=3, random_state=0).fit(X)
    code = batch_lasso_cd(X, est.components_, 0.1)
    np.testing.assert_allclose(est.score(X), -lasso_objective(X, code, est.components_, 0.1).mean())
    np.testing.assert_allclose(est.score(clients), est.score(X))
    w = np.zeros(len(X))
    w[:60] = 1
    np.testing.assert_allclose(est.score(X, sample_weight=w), est.score(clients[0]))


def test_history_and_bits(small_clients):
    clients, _ = small_clients
    est = FederatedDictionaryLearning(n_components=10, alpha=0.1, max_iter=4, tol=0,
                                      random_state=0).fit(clients)
    h = est.history_.as_dict()
    for key in ("objective", "param_change", "stat_change", "bits_up", "bits_down", "n_active", "time"):
        assert len(h[key]) == est.n_iter_ + 1
    d = 10 * 10 + 12 * 10  # A and B
    assert np.all(h["bits_up"][1:] == 4 * (d * 64 + 64))
    assert est.bits_up_ == int(h["bits_up"].sum()) and est.bits_down_ == int(h["bits_down"].sum())
    assert np.all(h["time"][1:] >= h["time"][:-1])


def test_verbose_reports_rounds(small_clients, capsys, no_tqdm):
    clients, _ = small_clients
    FederatedDictionaryLearning(n_components=4, alpha=0.1, max_iter=2, verbose=1,
                                random_state=0).fit(clients)
    out = capsys.readouterr().out
    assert "round    1" in out and "objective" in out and "active 4" in out and "bits" in out


def test_silent_by_default(small_clients, capsys):
    clients, _ = small_clients
    FederatedDictionaryLearning(n_components=4, alpha=0.1, max_iter=2, random_state=0).fit(clients)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_grid_search_routes_client_ids(small_clients):
    import sklearn
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clients, _ = small_clients
    X = np.vstack(clients)
    ids = np.repeat(np.arange(4), [len(c) for c in clients])
    seen = []

    class Spy(FederatedDictionaryLearning):
        def fit(self, X, y=None, *, client_ids=None):
            seen.append(None if client_ids is None else len(np.unique(client_ids)))
            return super().fit(X, y, client_ids=client_ids)

    with sklearn.config_context(enable_metadata_routing=True):
        pipe = make_pipeline(
            StandardScaler(),
            Spy(n_components=4, max_iter=2, random_state=0).set_fit_request(client_ids=True),
        )
        search = GridSearchCV(pipe, {"spy__alpha": [0.1, 1.0]}, cv=GroupKFold(n_splits=2),
                              error_score="raise")
        search.fit(X, client_ids=ids, groups=ids)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    # a smaller penalty gives a smaller objective, hence a higher score
    assert search.best_params_["spy__alpha"] == 0.1
    # each training fold holds two of the four clients; the refit all four
    assert seen[:-1] == [2] * 4 and seen[-1] == 4


def test_pandas_feature_names():
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    cols = ["a", "b", "c", "d"]
    clients = [pd.DataFrame(rng.standard_normal((20, 4)), columns=cols) for _ in range(3)]
    est = FederatedDictionaryLearning(n_components=3, max_iter=2, random_state=0).fit(clients)
    assert list(est.feature_names_in_) == cols
    est.transform(clients[0])
    bad = [clients[0], clients[1][["b", "a", "c", "d"]]]
    with pytest.raises(ValueError, match="client 1"):
        FederatedDictionaryLearning(n_components=3, max_iter=2).fit(bad)


def test_docstring_documents_every_parameter():
    doc = FederatedDictionaryLearning.__doc__
    assert doc is not None
    for name in FederatedDictionaryLearning().get_params():
        assert f"\n    {name} :" in doc, name
