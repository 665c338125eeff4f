"""Property-based hostile input: a correct fit or a clear error, nothing else.

Every generated input ends either in a fit whose model is finite, or in a
ValueError/TypeError whose message names the problem (and the client when
there are several); never a hang, a crash, a warning flood or a NaN model,
and the inputs are never modified.
"""

import os
import re
import tempfile
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skfedmm import FederatedDictionaryLearning

try:
    from skfedmm import FederatedOTMap
except ImportError:  # pragma: no cover - the OT estimator is optional here
    FederatedOTMap = None

pd = pytest.importorskip("pandas")


def make_estimators():
    estimators = [
        ("dictionary", lambda: FederatedDictionaryLearning(n_components=2, alpha=0.1, max_iter=2,
                                                           random_state=0),
         lambda est: est.components_),
    ]
    if FederatedOTMap is not None:
        estimators.append(
            ("ot", lambda: FederatedOTMap(max_iter=3, n_reference=7, random_state=0),
             lambda est: est.potential_)
        )
    return estimators


ESTIMATORS = make_estimators()
MAGNITUDES = [0.0, 1e-300, 1e-12, 1.0, 1e12, 1e150, 1e300]
# valid containers are drawn more often, so that fits happen as well as errors
CONTAINERS = ["array"] * 4 + ["list", "frame", "frame", "memmap", "memmap", "int", "bool",
                              "float32", "float32", "frame_other_columns", "sparse", "complex",
                              "strings"]


@st.composite
def client_inputs(draw):
    n_clients = draw(st.integers(1, 4))
    n_features = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    clients, kinds = [], []
    for i in range(n_clients):
        n_rows = draw(st.sampled_from([0, 1, 1, 2, 5, 9, 9, 9, 9]))
        d = n_features if draw(st.integers(0, 5)) or i == 0 else draw(st.integers(1, 5))
        magnitude = draw(st.sampled_from(MAGNITUDES))
        X = rng.standard_normal((n_rows, d)) * magnitude
        poison = draw(st.sampled_from([None] * 8 + [np.nan, np.inf, -np.inf]))
        if poison is not None and X.size:
            X.flat[draw(st.integers(0, X.size - 1))] = poison
        kind = draw(st.sampled_from(CONTAINERS))
        kinds.append(kind)
        clients.append((kind, X))
    return clients


def materialize(kind, X, tmpdir, i):
    cols = [f"f{j}" for j in range(X.shape[1])]
    if kind == "list":
        return X.tolist() if len(X) else [[]]
    if kind == "frame":
        return pd.DataFrame(X, columns=cols)
    if kind == "frame_other_columns":
        return pd.DataFrame(X, columns=[f"g{j}" for j in range(X.shape[1])])
    if kind == "sparse":
        return sp.csr_matrix(X)
    if kind == "memmap":
        path = os.path.join(tmpdir, f"client{i}.dat")
        mm = np.memmap(path, dtype=X.dtype, mode="w+", shape=X.shape if X.size else (1, X.shape[1]))
        if X.size:
            mm[:] = X
        mm.flush()
        return np.memmap(path, dtype=X.dtype, mode="r", shape=X.shape) if X.size else np.empty(X.shape)
    if kind == "int":
        with np.errstate(invalid="ignore"):
            return np.nan_to_num(X, posinf=2**40, neginf=-(2**40)).clip(-(2**40), 2**40).astype(np.int64)
    if kind == "bool":
        return X > 0
    if kind == "float32":
        with np.errstate(over="ignore"):
            return X.astype(np.float32)
    if kind == "complex":
        return X.astype(np.complex128)
    if kind == "strings":
        return X.astype(str)
    return X


BAD_KINDS = {"sparse", "complex", "strings"}


def offending_clients(spec):
    """The clients whose data alone could justify an error."""
    kind0, X0 = spec[0]
    bad = set()
    for i, (kind, X) in enumerate(spec):
        if (
            X.shape[0] == 0
            or not np.all(np.isfinite(X))
            # (the clients take the first client's dtype)
            or ("float32" in (kind, kind0) and np.any(np.abs(X) > np.finfo(np.float32).max))
            or X.shape[1] != X0.shape[1]
            or kind in BAD_KINDS
            or ({kind, kind0} == {"frame", "frame_other_columns"})
        ):
            bad.add(i)
    return bad


def snapshot(obj):
    if sp.issparse(obj):
        return obj.toarray().copy()
    if isinstance(obj, pd.DataFrame):
        return obj.to_numpy(copy=True)
    if isinstance(obj, list):
        return [list(r) for r in obj]
    return np.array(obj, copy=True)


def same(a, b):
    if isinstance(a, list):
        return a == b or np.array_equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object))
    return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=a.dtype.kind in "fc")


@pytest.mark.parametrize("name, make, model", ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=client_inputs(), as_list=st.booleans())
def test_hostile_clients(name, make, model, spec, as_list):
    with tempfile.TemporaryDirectory() as tmpdir:
        clients = [materialize(kind, X, tmpdir, i) for i, (kind, X) in enumerate(spec)]
        before = [snapshot(c) for c in clients]
        X = clients if as_list or len(clients) > 1 else clients[0]
        est = make()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                est.fit(X)
            except (ValueError, TypeError) as exc:
                message = str(exc)
                assert len(message) > 10
                if isinstance(X, list) and len(clients) > 1 and "scale" not in message:
                    # an error about the clients' data names an offending client
                    named = re.search(r"client (\d+)", message)
                    assert named, message
                    assert int(named.group(1)) in offending_clients(spec), (message, spec)
            else:
                assert np.all(np.isfinite(model(est)))
        assert len(caught) <= len(clients) + 3, [str(w.message) for w in caught]
        for c, b in zip(clients, before):
            assert same(snapshot(c), b)
        del clients


@pytest.mark.parametrize("name, make, model", ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
@pytest.mark.parametrize("magnitude", [1e-300, 1e-100, 1e100, 1e200, 1e300])
def test_extreme_magnitudes_fit_or_raise_naming_the_client(name, make, model, magnitude):
    rng = np.random.default_rng(0)
    clients = [rng.standard_normal((8, 3)), rng.standard_normal((8, 3)) * magnitude]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            est = make().fit(clients)
        except ValueError as exc:
            assert "client" in str(exc) or "scale" in str(exc)
        else:
            assert np.all(np.isfinite(model(est)))
    assert len(caught) <= 3
