"""Scale-out on a Dask cluster through joblib's dask backend (loopback only)."""

import numpy as np
import pytest
from joblib import parallel_config

from skfedmm import FederatedDictionaryLearning
from skfedmm.datasets import make_sparse_coded_clients

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def dask_client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, silence_logs=40,
    )
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()



def count_sent_bytes(monkeypatch):
    """The sizes of the messages Dask's TCP comms write from now on (a list
    that grows as they are written)."""
    from distributed.comm import tcp

    sent = []
    real_write = tcp.TCP.write

    async def counting_write(self, msg, serializers=None, on_error="message"):
        n = await real_write(self, msg, serializers=serializers, on_error=on_error)
        sent.append(n)
        return n

    monkeypatch.setattr(tcp.TCP, "write", counting_write)
    return sent

def test_dask_fit_is_bitwise_the_local_fit(dask_client):
    clients, _ = make_sparse_coded_clients(n_clients=4, n_samples=80, n_features=10,
                                           n_components=8, atoms_per_client=3, random_state=0)
    kwargs = dict(n_components=8, alpha=0.1, max_iter=4, tol=0, random_state=0,
                  participation=0.75, compression=("qsgd", {"s": 8}))
    local = FederatedDictionaryLearning(n_jobs=1, **kwargs).fit(clients)
    with parallel_config(backend="dask"):
        remote = FederatedDictionaryLearning(**kwargs).fit(clients)
    np.testing.assert_array_equal(remote.components_, local.components_)
    np.testing.assert_array_equal(remote.error_, local.error_)


def test_rows_are_scattered_once(dask_client, monkeypatch):
    """Per round, what crosses the scheduler is far smaller than the rows."""
    sent = count_sent_bytes(monkeypatch)
    rng = np.random.default_rng(0)
    clients = [rng.standard_normal((4000, 20)) for _ in range(2)]  # 640 kB each
    data_bytes = sum(c.nbytes for c in clients)
    per_round = []
    marks = []

    def mark(info):
        marks.append(sum(sent))

    with parallel_config(backend="dask"):
        FederatedDictionaryLearning(n_components=5, alpha=0.5, max_iter=4, tol=0,
                                    random_state=0, callback=mark).fit(clients)
    per_round = np.diff(marks)  # (the first mark: after the initial round)
    assert len(per_round) == 4
    # the rows went out once (before round 1); rounds move kilobytes
    assert np.all(per_round < 0.05 * data_bytes), (per_round, data_bytes)


def test_dask_backend_helper(dask_client):
    from skfedmm import dask_backend

    clients, _ = make_sparse_coded_clients(n_clients=2, n_samples=30, n_features=6,
                                           n_components=4, atoms_per_client=2, random_state=0)
    with dask_backend(dask_client):
        est = FederatedDictionaryLearning(n_components=4, max_iter=2, random_state=0).fit(clients)
    assert np.all(np.isfinite(est.components_))


def test_missing_dask_says_how_to_install(monkeypatch):
    import importlib.util

    from skfedmm import dask_backend

    real_find_spec = importlib.util.find_spec

    def no_distributed(name, *args, **kwargs):
        return None if name == "distributed" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_distributed)
    with pytest.raises(ImportError, match=r'pip install "skfedmm\[dask\]"'):
        dask_backend()


def test_client_caches_stay_on_the_dask_workers(dask_client, monkeypatch):
    """Warm-start codes stay on the workers; the model is that of n_jobs=1."""
    rng = np.random.default_rng(1)
    clients = [rng.standard_normal((3000, 10)) for _ in range(2)]
    kwargs = dict(n_components=8, alpha=0.3, max_iter=4, tol=0, random_state=0,
                  code_cache=True, warm_start=True)
    local = FederatedDictionaryLearning(n_jobs=1, **kwargs).fit(clients)
    codes = sum(c.cache["codes_t"].nbytes for c in local.fedmm_state_.clients)
    marks = []
    sent = count_sent_bytes(monkeypatch)
    with parallel_config(backend="dask"):
        remote = FederatedDictionaryLearning(callback=lambda info: marks.append(sum(sent)),
                                             **kwargs).fit(clients)
    per_round = np.diff(marks)
    assert np.all(per_round < 0.2 * codes), (per_round, codes)
    np.testing.assert_array_equal(remote.components_, local.components_)
    for a, b in zip(remote.fedmm_state_.clients, local.fedmm_state_.clients):
        np.testing.assert_array_equal(a.cache["codes_t"], b.cache["codes_t"])
    # continued fits start from the caches read back at the end of the fit
    with parallel_config(backend="dask"):
        remote.fit(clients)
    local.fit(clients)
    np.testing.assert_array_equal(remote.components_, local.components_)


def test_the_problem_and_the_payload_go_to_each_worker_once(dask_client, monkeypatch):
    """A problem's constants travel once per fit, the round's payload once
    per round and worker, not with every client's task."""
    from skfedmm import FedMM

    from ._helpers import CauchyLocation, make_clients

    class Heavy(CauchyLocation):
        """A problem holding a large constant (as a prepared aggregate would)."""

        def __init__(self, c=1.0, dim=3, constant=None):
            super().__init__(c, dim)
            self.constant = np.zeros(100_000) if constant is None else constant  # 800 kB

    clients = make_clients(n_clients=8)
    local = FedMM(Heavy(), max_iter=3, tol=0, random_state=0, n_jobs=1).fit(clients)
    marks = []
    sent = count_sent_bytes(monkeypatch)
    with parallel_config(backend="dask"):
        remote = FedMM(Heavy(), max_iter=3, tol=0, random_state=0,
                       callback=lambda info: marks.append(sum(sent))).fit(clients)
    np.testing.assert_array_equal(remote.theta, local.theta)
    per_round = np.diff(marks)
    # (sent with each of the 8 clients' tasks, the constant alone would be
    # 6.4 MB per round, twice: client to scheduler, scheduler to worker)
    assert np.all(per_round < 400_000), per_round
