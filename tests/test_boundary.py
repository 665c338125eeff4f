"""What crosses the client/server boundary: statistics, never rows."""

import numpy as np
import pytest

import skfedmm.federation.transport as transport
from skfedmm import FederatedDictionaryLearning
from skfedmm.federation.client import ClientMessage, ClientState
from skfedmm.federation.local import _Placed


def record_boundary(monkeypatch):
    """Record every object a client task returns to the server."""
    crossed = []
    real = transport._guarded

    def recording(task, *args, **kwargs):
        out = real(task, *args, **kwargs)
        crossed.append((task.__name__, out))
        return out

    monkeypatch.setattr(transport, "_guarded", recording)
    return crossed


def arrays_in(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from arrays_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from arrays_in(v)
    elif isinstance(obj, (ClientMessage, ClientState)):
        for name, v in vars(obj).items():
            # the client's cache (its rows' codes) stays with the client's
            # rows: in-process here, next to the rows on workers, on the
            # node with Flower; the server never reads it
            if name != "cache":
                yield from arrays_in(v)


@pytest.mark.parametrize("aggregation", ["surrogate", "parameter"])
def test_dictionary_learning_clients_send_only_statistics(monkeypatch, aggregation):
    crossed = record_boundary(monkeypatch)
    rng = np.random.default_rng(0)
    n_features, k = 7, 5
    clients = [rng.standard_normal((n, n_features)) for n in (23, 31, 40)]
    FederatedDictionaryLearning(n_components=k, alpha=0.1, max_iter=3, random_state=0,
                                aggregation=aggregation, compression="qsgd",
                                n_jobs=1).fit(clients)
    assert crossed
    allowed = {
        "_client_init": {(n_features, n_features)},  # mean x^T x (PCA init)
        "_client_full": {(k, k), (n_features, k)},  # A and B of the initial round
        # the same, compressed (with compression, the initialization is too)
        "_client_init_compressed": {(n_features, n_features)},
        "_client_full_compressed": {(k, k), (n_features, k)},
        "_client_surrogate": {(k * k + n_features * k,)},  # c_i (and the client's own V_i)
        "_client_parameter": {(k * n_features,)},  # compressed parameter change
    }
    for name, out in crossed:
        shapes = {a.shape for a in arrays_in(out)}
        assert shapes <= allowed[name], (name, shapes)
        for a in arrays_in(out):
            assert a.ndim < 2 or a.shape[0] not in (23, 31, 40)  # never rows


def test_process_workers_get_the_rows_once(monkeypatch):
    """With loky, tasks carry a file path, not the rows, every round."""
    import pickle

    from joblib import parallel_config

    sizes = []
    captured = []
    real_place = transport._place_clients

    def place(clients, n_jobs, stack, **kwargs):
        placed = real_place(clients, n_jobs, stack, **kwargs)
        captured.append(placed)
        return placed

    monkeypatch.setattr(transport, "_place_clients", place)
    rng = np.random.default_rng(0)
    clients = [rng.standard_normal((3000, 8)) for _ in range(3)]
    with parallel_config(backend="loky"):
        est = FederatedDictionaryLearning(n_components=4, max_iter=3, random_state=0,
                                          n_jobs=2).fit(clients)
    placed = captured[0]
    assert isinstance(placed, _Placed)
    for i in range(3):
        sizes.append(len(pickle.dumps(placed[i])))
    assert max(sizes) < 500  # a path, versus 192 kB of rows per client
    ref = FederatedDictionaryLearning(n_components=4, max_iter=3, random_state=0,
                                      n_jobs=1).fit(clients)
    np.testing.assert_array_equal(est.components_, ref.components_)


@pytest.mark.parametrize("aggregation", ["surrogate", "parameter"])
def test_ot_clients_send_only_masses(monkeypatch, aggregation):
    from skfedmm import FederatedOTMap

    crossed = record_boundary(monkeypatch)
    rng = np.random.default_rng(0)
    m = 9
    clients = [rng.standard_normal((n, 3)) for n in (23, 31, 40)]
    FederatedOTMap(n_reference=m, max_iter=3, tol=0, random_state=0, aggregation=aggregation,
                   compression="qsgd", n_jobs=1).fit(clients)
    allowed = {
        "_client_init": {(3,), (1,)},  # mean of the rows, their spread around it
        "_client_full": {(m,)},  # mean soft assignment (initial round)
        "_client_full_compressed": {(m,)},  # the same, compressed
        "_client_surrogate": {(m,)},  # compressed mass message (and its own V_i)
        "_client_parameter": {(m,)},  # compressed potential change
        "_client_loss": set(),
    }
    assert crossed
    for name, out in crossed:
        shapes = {a.shape for a in arrays_in(out)}
        assert shapes <= allowed[name], (name, shapes)
