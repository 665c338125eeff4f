"""Resumable training: warm_start, partial_fit and pickling."""

import pickle

import numpy as np
import pytest

from skfedmm import FederatedDictionaryLearning, FederatedOTMap
from skfedmm.datasets import make_sparse_coded_clients

NOISY = dict(participation=0.6, compression=("qsgd", {"s": 4}), batch_size=30)


@pytest.fixture(scope="module")
def clients():
    clients, _ = make_sparse_coded_clients(n_clients=4, n_samples=50, n_features=10,
                                           n_components=8, atoms_per_client=3, random_state=0)
    return clients


def model(est):
    return est.components_ if hasattr(est, "components_") else est.potential_


def assert_same_model(a, b):
    np.testing.assert_array_equal(model(a), model(b))
    ha, hb = a.history_.as_dict(), b.history_.as_dict()
    for key in ha:
        if key != "time":
            np.testing.assert_array_equal(ha[key], hb[key], err_msg=key)


@pytest.mark.parametrize("settings", [{}, NOISY], ids=["batch", "noisy"])
@pytest.mark.parametrize("aggregation", ["surrogate", "parameter"])
def test_warm_start_10_plus_10_is_20(clients, settings, aggregation):
    kwargs = dict(n_components=8, alpha=0.1, tol=0, random_state=0, aggregation=aggregation,
                  **settings)
    twenty = FederatedDictionaryLearning(max_iter=20, **kwargs).fit(clients)
    est = FederatedDictionaryLearning(max_iter=10, warm_start=True, **kwargs).fit(clients)
    est.fit(clients)
    assert est.n_iter_ == 20
    assert_same_model(est, twenty)


def test_without_warm_start_fit_starts_over(clients):
    est = FederatedDictionaryLearning(n_components=8, max_iter=5, tol=0, random_state=0,
                                      **NOISY)
    first = est.fit(clients).components_.copy()
    np.testing.assert_array_equal(est.fit(clients).components_, first)
    assert est.n_iter_ == 5


def test_partial_fit_rounds_equal_fit_rounds(clients):
    kwargs = dict(n_components=8, alpha=0.1, tol=0, random_state=0, **NOISY)
    est = FederatedDictionaryLearning(**kwargs)
    for _ in range(4):
        est.partial_fit(clients)
    ref = FederatedDictionaryLearning(max_iter=4, **kwargs).fit(clients)
    assert est.n_iter_ == 4
    assert_same_model(est, ref)


def test_partial_fit_streams_new_rows(clients):
    est = FederatedDictionaryLearning(n_components=8, alpha=0.1, random_state=0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        est.partial_fit([c[rng.choice(len(c), 20, replace=False)] for c in clients])
    assert est.n_iter_ == 3 and np.all(np.isfinite(est.components_))
    with pytest.raises(ValueError, match="4 clients with 3 clients"):
        est.partial_fit(clients[:3])
    with pytest.raises(ValueError, match="features"):
        est.partial_fit([c[:, :5] for c in clients])


def test_pickle_mid_training_continues_identically(clients):
    kwargs = dict(n_components=8, alpha=0.1, tol=0, random_state=0, **NOISY)
    est = FederatedDictionaryLearning(**kwargs)
    est.partial_fit(clients)
    est.partial_fit(clients)
    clone = pickle.loads(pickle.dumps(est))
    for model in (est, clone):
        model.partial_fit(clients)
        model.partial_fit(clients)
    assert_same_model(est, clone)
    warm = FederatedDictionaryLearning(max_iter=3, warm_start=True, **kwargs).fit(clients)
    clone = pickle.loads(pickle.dumps(warm))
    warm.fit(clients)
    clone.fit(clients)
    assert_same_model(warm, clone)


def test_pickled_fitted_estimator_behaves_the_same(clients):
    est = FederatedDictionaryLearning(n_components=8, alpha=0.1, max_iter=3,
                                      random_state=0).fit(clients)
    clone = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(clone.transform(clients[0]), est.transform(clients[0]))
    assert clone.score(clients) == est.score(clients)


OT_NOISY = dict(participation=0.75, participation_scheme="fixed", compression=("qsgd", {"s": 8}),
                batch_size=30)


@pytest.mark.parametrize("settings", [{}, OT_NOISY], ids=["batch", "noisy"])
def test_ot_warm_start_partial_fit_and_pickle(clients, settings):
    kwargs = dict(epsilon=0.1, tol=0, random_state=0, n_reference=15, **settings)
    twenty = FederatedOTMap(max_iter=20, **kwargs).fit(clients)
    warm = FederatedOTMap(max_iter=10, warm_start=True, **kwargs).fit(clients)
    clone = pickle.loads(pickle.dumps(warm))  # mid-training
    warm.fit(clients)
    clone.fit(clients)
    assert warm.n_iter_ == 20
    assert_same_model(warm, twenty)
    assert_same_model(clone, twenty)
    streamed = FederatedOTMap(**kwargs)
    for _ in range(5):
        streamed.partial_fit(clients)
    assert_same_model(streamed, FederatedOTMap(max_iter=5, **kwargs).fit(clients))
    restored = pickle.loads(pickle.dumps(twenty))
    np.testing.assert_array_equal(restored.transform(clients[0]), twenty.transform(clients[0]))
