"""Client caches stay where the clients' rows are: with process workers a
task carries a path, not the cache; the model, the caches and continued fits
are those of ``n_jobs=1``; a discarded round leaves the committed caches."""

import os
import pickle

import numpy as np
import pytest
from joblib import parallel_config

from skfedmm import FedMM
from skfedmm.federation import local
from skfedmm.federation.caches import CacheFolder, StoredCache
from skfedmm.federation.transport import LocalTransport
from skfedmm.problems import DictionaryLearningProblem
from skfedmm.problems.kmeans import KMeansProblem


class Boom(Exception):
    pass


class _FailsOnce:
    """A problem whose server M-step raises once, at round ``at`` (None: never)."""

    def minimize(self, stat, theta_prev, rng=None):
        self.minimize_calls += 1
        if self.at is not None and self.minimize_calls == self.at + 1:
            raise Boom("the server failed")
        return super().minimize(stat, theta_prev, rng)


class FaultyKMeans(_FailsOnce, KMeansProblem):
    """k-means whose server M-step raises once, at round ``at``."""

    def __init__(self, n_clusters, at=None, **kwargs):
        super().__init__(n_clusters, **kwargs)
        self.at = at
        self.minimize_calls = 0


class FaultyDictionary(_FailsOnce, DictionaryLearningProblem):
    """Dictionary learning with warm-start codes; its M-step raises once, at round ``at``."""

    def __init__(self, at=None):
        super().__init__(6, 0.2, 5, code_cache=True, coder_tol=1e-2)
        self.at = at
        self.minimize_calls = 0


PROBLEMS = {
    "kmeans": (lambda at=None: FaultyKMeans(4, at=at)),
    "dictionary": FaultyDictionary,
}


def _clients(n_clients=3, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (4, 5))
    return [centers[rng.integers(4, size=n)] + rng.standard_normal((n, 5))
            for _ in range(n_clients)]


@pytest.fixture
def on_workers(monkeypatch, tmp_path):
    """Every call of several clients goes to two loky workers; bytes counted."""
    monkeypatch.setattr(local._Scheduler, "parallel",
                        lambda self, task, n: self.n_workers > 1 and n > 1)
    counter = {"bytes": 0, "calls": 0}
    real = LocalTransport._workers

    class Counting:
        def __init__(self, parallel):
            self.parallel = parallel

        def __call__(self, tasks):
            import cloudpickle

            tasks = list(tasks)
            counter["calls"] += 1
            counter["bytes"] += sum(len(cloudpickle.dumps(t)) for t in tasks)
            outs = self.parallel(tasks)
            counter["bytes"] += sum(len(pickle.dumps(o)) for o in outs)
            return outs

    def workers(self):
        parallel, rows = real(self)
        return Counting(parallel), rows

    monkeypatch.setattr(LocalTransport, "_workers", workers)
    with parallel_config(backend="loky", n_jobs=2, temp_folder=str(tmp_path)):
        yield counter


def _cache_arrays(state):
    out = []
    for c in state.clients:
        cache = getattr(c.cache, "cache", c.cache)
        out.append({k: np.asarray(v) for k, v in (cache or {}).items()})
    return out


def _same_caches(a, b):
    for ca, cb in zip(_cache_arrays(a), _cache_arrays(b)):
        assert ca.keys() == cb.keys()
        for key in ca:
            np.testing.assert_array_equal(ca[key], cb[key])


ENGINE = dict(max_iter=6, tol=0, random_state=0)


def test_caches_stay_on_the_workers_with_loky(on_workers, tmp_path):
    clients = _clients()
    ref = FedMM(KMeansProblem(4), n_jobs=1, **ENGINE).fit(clients)
    cache_bytes = sum(v.nbytes for c in _cache_arrays(ref) for v in c.values())
    assert cache_bytes > 3 * 3000 * 8  # (labels, bounds and norms per row)
    rounds = []
    real_round = FedMM._round

    def counted_round(self, *args, **kwargs):
        state = real_round(self, *args, **kwargs)
        rounds.append(on_workers["bytes"])
        return state

    FedMM._round = counted_round
    try:
        state = FedMM(KMeansProblem(4), n_jobs=2, **ENGINE).fit(clients)
    finally:
        FedMM._round = real_round
    assert on_workers["calls"] >= ENGINE["max_iter"]
    per_round = np.diff(rounds)
    # a round moves statistics and paths, not the caches
    assert np.all(per_round < 0.1 * cache_bytes), (per_round, cache_bytes)
    np.testing.assert_array_equal(state.theta, ref.theta)
    _same_caches(state, ref)
    # the returned state holds its caches itself: the fit's folder is gone
    assert not [p for p in os.listdir(tmp_path) if p.startswith("skfedmm-")]
    cache = state.clients[0].cache
    assert isinstance(cache, StoredCache) and cache.ref is None
    assert type(pickle.loads(pickle.dumps(cache))) is dict
    # and a continued fit is the uninterrupted one
    more = FedMM(KMeansProblem(4), n_jobs=2, **ENGINE).fit(clients, state=state, max_iter=3)
    whole = FedMM(KMeansProblem(4), n_jobs=1, **{**ENGINE, "max_iter": 9}).fit(clients)
    np.testing.assert_array_equal(more.theta, whole.theta)
    _same_caches(more, whole)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_a_discarded_round_leaves_the_committed_caches(on_workers, name):
    make = PROBLEMS[name]
    clients = _clients(n=600, seed=1)
    committed = []
    with pytest.raises(Boom):
        FedMM(make(at=4), n_jobs=2, **ENGINE).fit(clients, on_commit=committed.append)
    last = committed[-1]
    assert last.round == 3  # round 4's answers (and caches) were discarded
    resumed = FedMM(make(), n_jobs=2, **ENGINE).fit(clients, state=last, max_iter=3)
    whole = FedMM(make(), n_jobs=1, **ENGINE).fit(clients)
    np.testing.assert_array_equal(resumed.theta, whole.theta)
    _same_caches(resumed, whole)


def test_a_cache_version_is_written_whole(tmp_path):
    folder = CacheFolder(str(tmp_path))
    cache = {"codes": np.arange(6.0).reshape(2, 3), "empty": np.zeros((0, 3)), "wait": (0, 1),
             "labels": np.asfortranarray(np.arange(12).reshape(3, 4)).astype(np.intp, order="F")}
    ref = folder.save(3, cache)
    assert os.listdir(tmp_path) == [os.path.basename(ref.path)]  # (no temporary left)
    back = ref.load()
    np.testing.assert_array_equal(back["codes"], cache["codes"])
    assert back["empty"].shape == (0, 3) and back["wait"] == (0, 1)
    np.testing.assert_array_equal(back["labels"], cache["labels"])
    assert back["labels"].flags.f_contiguous and back["labels"].dtype == np.intp
    assert back["codes"].ctypes.data % 64 == 0  # (aligned as a fresh array)
    back["codes"][0, 0] = 99.0  # copy-on-write: the stored version is unchanged
    assert ref.load()["codes"][0, 0] == 0.0
    # the server's handle reads it once, pickles as the dict, and removes the
    # version when nothing refers to it any more
    handle = StoredCache(ref)
    assert handle["codes"][1, 2] == 5.0 and set(handle) == set(cache)
    assert pickle.loads(pickle.dumps(handle))["wait"] == (0, 1)
    del handle
    import gc

    gc.collect()
    assert not os.path.exists(ref.path)


def test_a_continued_fit_on_changed_rows_drops_the_stored_caches(on_workers):
    clients = _clients(n=800, seed=2)
    state = FedMM(KMeansProblem(4), n_jobs=2, **ENGINE).fit(clients)
    changed = [X + 0.25 for X in clients]  # (same shapes, other rows)
    on = FedMM(KMeansProblem(4), n_jobs=2, **ENGINE).fit(changed, state=state, max_iter=2)
    here = FedMM(KMeansProblem(4), n_jobs=1, **ENGINE).fit(changed, state=state, max_iter=2)
    np.testing.assert_array_equal(on.theta, here.theta)
    _same_caches(on, here)
    # each client checked its rows and rebuilt its cache for the changed ones
    from skfedmm.federation.client import _checksum

    for c, X in zip(on.clients, changed):
        np.testing.assert_array_equal(c.cache["_rows"], _checksum(X))
