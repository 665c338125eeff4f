"""What crosses the client/server boundary: statistics, never rows."""

import numpy as np
import pytest

import skfedmm.engine as engine
from skfedmm import FederatedDictionaryLearning
from skfedmm.engine import ClientMessage, ClientState


def record_boundary(monkeypatch):
    """Record every object a client task returns to the server."""
    crossed = []
    real = engine._guarded

    def recording(task, *args):
        out = real(task, *args)
        crossed.append((task.__name__, out))
        return out

    monkeypatch.setattr(engine, "_guarded", recording)
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
        for v in vars(obj).values():
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
        "_client_surrogate": {(k * k + n_features * k,)},  # c_i (and the client's own V_i)
        "_client_parameter": {(k * n_features,)},  # compressed parameter change
    }
    for name, out in crossed:
        shapes = {a.shape for a in arrays_in(out)}
        assert shapes <= allowed[name], (name, shapes)
        for a in arrays_in(out):
            assert a.ndim < 2 or a.shape[0] not in (23, 31, 40)  # never rows
