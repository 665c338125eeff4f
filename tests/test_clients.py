"""Federated input handling: what every estimator accepts and rejects."""

import numpy as np
import pytest

from skfedmm import FederatedDictionaryLearning
from skfedmm._clients import check_clients, is_client_list


def fresh():
    return FederatedDictionaryLearning(n_components=2, max_iter=2, random_state=0)


def good_clients():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((10, 3)) for _ in range(3)]


def test_list_and_client_ids_give_the_same_clients():
    clients = good_clients()
    X = np.vstack(clients)
    ids = np.repeat(["b", "a", "c"], 10)  # labels, sorted order defines clients
    out, labels = check_clients(fresh(), X, ids)
    assert list(labels) == ["a", "b", "c"]
    np.testing.assert_array_equal(out[0], clients[1])
    np.testing.assert_array_equal(out[1], clients[0])


def test_interleaved_client_ids_keep_row_order_within_clients():
    X = np.arange(12, dtype=float).reshape(6, 2)
    out, _ = check_clients(fresh(), X, [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(out[0], X[[1, 3, 5]])
    np.testing.assert_array_equal(out[1], X[[0, 2, 4]])


def test_one_array_is_one_client_and_lists_of_rows_are_one_array():
    assert not is_client_list([[1.0, 2.0], [3.0, 4.0]])
    assert is_client_list([[[1.0, 2.0]], [[3.0, 4.0]]])
    assert is_client_list([np.ones((2, 2))])
    est = fresh().fit([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]])
    assert est.n_clients_ == 1 and est.n_features_in_ == 2


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda c: [c[0], c[1][:, :2], c[2]], ValueError, "client 1.*features"),
        (lambda c: [c[0], c[1][:0], c[2]], ValueError, "client 1"),
        (lambda c: [c[0], c[1], np.where(np.eye(10, 3) > 0, np.nan, c[2])], ValueError, "client 2.*NaN"),
        (lambda c: [np.where(np.eye(10, 3) > 0, np.inf, c[0])], ValueError, "client 0.*infinity"),
        (lambda c: [c[0], np.array([["a", "b", "c"]] * 4)], ValueError, "client 1"),
        (lambda c: [c[0], c[1][:, 0]], ValueError, "client 1.*2-D"),
        (lambda c: [], ValueError, "empty"),
    ],
)
def test_bad_clients_are_named(make, error, match):
    clients = good_clients()
    with pytest.raises(error, match=match):
        fresh().fit(make(clients))


def test_sparse_client_is_rejected_with_a_clear_error():
    sp = pytest.importorskip("scipy.sparse")
    clients = good_clients()
    with pytest.raises(TypeError, match="client 1.*[Ss]parse"):
        fresh().fit([clients[0], sp.csr_matrix(clients[1])])


def test_client_ids_errors():
    X = np.vstack(good_clients())
    with pytest.raises(ValueError, match="client_ids.*one label per row"):
        fresh().fit(X, client_ids=np.zeros(7))
    with pytest.raises(ValueError, match="client_ids is only for one array"):
        fresh().fit(good_clients(), client_ids=np.zeros(30))


def test_inputs_are_never_modified():
    clients = good_clients()
    copies = [c.copy() for c in clients]
    for c in clients:
        c.setflags(write=False)  # a write would raise
    fresh().fit(clients)
    FederatedDictionaryLearning(n_components=2, max_iter=2, participation=0.5,
                                compression="qsgd", random_state=0).fit(clients)
    for c, orig in zip(clients, copies):
        np.testing.assert_array_equal(c, orig)
    X = np.vstack(copies)
    X.setflags(write=False)
    fresh().fit(X, client_ids=np.repeat([0, 1, 2], 10))


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(alpha=-1.0), "alpha"),
        (dict(n_components=0), "n_components"),
        (dict(max_iter=-1), "max_iter"),
        (dict(participation=0.0), "participation"),
        (dict(participation=1.2), "participation"),
        (dict(compression="zip"), "compression"),
        (dict(fit_algorithm="omp"), "fit_algorithm"),
        (dict(transform_algorithm="best"), "transform_algorithm"),
        (dict(init="svd"), "init"),
        (dict(aggregation="mean"), "aggregation"),
        (dict(cv_rate=-0.5), "cv_rate"),
        (dict(step_size=2.0), "step_size"),
        (dict(batch_size=0), "batch_size"),
        (dict(dict_init=np.ones((3, 3))), "dict_init"),
        (dict(dict_init=np.full((2, 3), np.nan)), "dict_init"),
    ],
)
def test_invalid_hyper_parameters(params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FederatedDictionaryLearning(n_components=2, max_iter=2, **params).fit(good_clients())


def test_no_silent_nan_model_on_huge_values():
    clients = [c * 1e300 for c in good_clients()]
    try:
        est = fresh().fit(clients)
    except (ValueError, FloatingPointError):
        return
    assert np.all(np.isfinite(est.components_))
