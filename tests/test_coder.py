"""The clients' sparse coder: warm starts, the code cache, chunks, float32."""

import numpy as np
import pytest
from joblib import parallel_config
from sklearn.decomposition import sparse_encode

import skfedmm.problems.dictionary as dictionary_module
from skfedmm import FederatedDictionaryLearning
from skfedmm.problems.dictionary import DictionaryLearningProblem, batch_lasso_cd, lasso_objective


def unit_rows(rng, k, d):
    D = rng.standard_normal((k, d))
    return D / np.linalg.norm(D, axis=1, keepdims=True)


def sparse_rows(rng, n, D, density=0.15, noise=0.05):
    H = np.where(rng.random((n, D.shape[0])) < density, rng.standard_normal((n, D.shape[0])), 0)
    return H @ D + noise * rng.standard_normal((n, D.shape[1]))


def correlated_dictionary(rng, k, d, mix=0.9):
    """Atoms close to each other: coordinate descent needs many sweeps."""
    base = unit_rows(rng, 1, d)
    D = mix * base + (1 - mix) * rng.standard_normal((k, d))
    return D / np.linalg.norm(D, axis=1, keepdims=True)


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("start", ["zero", "random", "previous"])
def test_warm_started_coder_reaches_the_lasso_solution(positive, start):
    rng = np.random.default_rng(0)
    D = unit_rows(rng, 40, 25)
    X = sparse_rows(rng, 300, D)
    alpha = 0.1
    init = {
        "zero": None,
        "random": rng.standard_normal((300, 40)),
        # codes at a nearby dictionary: what the code cache holds
        "previous": batch_lasso_cd(X, unit_rows(np.random.default_rng(1), 40, 25) * 0.1 + D,
                                   alpha, positive=positive),
    }[start]
    ours = batch_lasso_cd(X, D, alpha, positive=positive, code_init=init)
    ref = sparse_encode(X, D, algorithm="lasso_lars", alpha=alpha, positive=positive)
    f_ours = lasso_objective(X, ours, D, alpha)
    f_ref = lasso_objective(X, ref, D, alpha)
    assert np.all(f_ours <= f_ref * (1 + 1e-4) + 1e-12)  # row by row, within tol
    if positive:
        assert np.all(ours >= 0)
    if init is not None:
        assert not np.shares_memory(ours, init)


def test_hard_rows_reach_the_lasso_solution():
    """Correlated atoms: coordinate descent needs many sweeps; the rows
    still end at the lasso solution (within the tolerance)."""
    rng = np.random.default_rng(3)
    D = correlated_dictionary(rng, 30, 20)
    X = sparse_rows(rng, 200, D, density=0.3)
    alpha = 0.02
    ours = batch_lasso_cd(X, D, alpha)
    ref = sparse_encode(X, D, algorithm="lasso_lars", alpha=alpha)
    f_ours = lasso_objective(X, ours, D, alpha).sum()
    f_ref = lasso_objective(X, ref, D, alpha).sum()
    assert f_ours <= f_ref * (1 + 1e-4)


def test_warm_started_rows_are_independent():
    rng = np.random.default_rng(1)
    D = correlated_dictionary(rng, 20, 15, mix=0.7)
    X = rng.standard_normal((150, 15))
    init = rng.standard_normal((150, 20)) * (rng.random((150, 20)) < 0.3)
    full = batch_lasso_cd(X, D, 0.05, code_init=init)
    part = batch_lasso_cd(X[37:61], D, 0.05, code_init=init[37:61])
    np.testing.assert_allclose(full[37:61], part, rtol=1e-10, atol=1e-12)
    # rows stop at different sweeps (a stopped row stays in the arrays for
    # a while, its later updates discarded): each row alone gives its code
    for i in (0, 5, 77, 149):
        alone = batch_lasso_cd(X[i:i + 1], D, 0.05, code_init=init[i:i + 1])
        np.testing.assert_allclose(full[i:i + 1], alone, rtol=1e-10, atol=1e-12)


def test_max_iter_bounds_the_work():
    rng = np.random.default_rng(2)
    D = correlated_dictionary(rng, 30, 20)
    X = sparse_rows(rng, 50, D, density=0.3)
    one = batch_lasso_cd(X, D, 0.02, max_iter=1)
    assert np.all(np.isfinite(one))
    zero = batch_lasso_cd(X, D, 0.02, max_iter=0, code_init=np.ones((50, 30)))
    np.testing.assert_array_equal(zero, np.ones((50, 30)))


def test_coder_keeps_float32():
    rng = np.random.default_rng(4)
    D = correlated_dictionary(rng, 16, 10).astype(np.float32)
    X = sparse_rows(rng, 80, D.astype(float)).astype(np.float32)
    for init in (None, np.zeros((80, 16), dtype=np.float64)):
        H = batch_lasso_cd(X, D, 0.05, code_init=init)
        assert H.dtype == np.float32 and np.all(np.isfinite(H))
    ref = sparse_encode(X.astype(float), D.astype(float), algorithm="lasso_lars", alpha=0.05)
    f = lasso_objective(X.astype(float), H.astype(float), D.astype(float), 0.05).sum()
    assert f <= lasso_objective(X.astype(float), ref, D.astype(float), 0.05).sum() * (1 + 1e-3)


# ------------------------------------------------------------- the cache
def test_cache_warm_starts_only_unchanged_rows():
    rng = np.random.default_rng(5)
    D = unit_rows(rng, 8, 12)
    X = sparse_rows(rng, 60, D)
    problem = DictionaryLearningProblem(8, 0.1, 12, code_cache="auto")
    cache = problem.client_cache(X)
    assert cache == {}
    stat, loss, cache = problem.cached_statistic(X, D, cache, None)
    # the first call codes from zero: exactly local_statistic
    ref_stat, ref_loss = problem.local_statistic(X, D)
    np.testing.assert_array_equal(stat["A"], ref_stat["A"])
    assert loss == ref_loss
    np.testing.assert_array_equal(cache["codes_t"].T, batch_lasso_cd(X, D, 0.1))
    # other rows at the same positions: no warm start, exactly cold codes
    Y = sparse_rows(rng, 60, D)
    stat, loss, new = problem.cached_statistic(Y, D, cache, None)
    ref_stat, ref_loss = problem.local_statistic(Y, D)
    np.testing.assert_array_equal(stat["B"], ref_stat["B"])
    assert loss == ref_loss
    # the given cache is not modified
    np.testing.assert_array_equal(cache["codes_t"].T, batch_lasso_cd(X, D, 0.1))
    # a cache for another number of rows is ignored
    stat, loss, _ = problem.cached_statistic(Y[:30], D, cache, None)
    assert loss == problem.local_statistic(Y[:30], D)[1]


def test_cache_starts_each_row_at_its_last_code(monkeypatch):
    rng = np.random.default_rng(9)
    D0 = unit_rows(rng, 8, 12)
    X = sparse_rows(rng, 60, D0)
    path = [D0 + 0.05 * t * unit_rows(np.random.default_rng(t), 8, 12) for t in range(3)]
    problem = DictionaryLearningProblem(8, 0.1, 12)  # code_cache="auto" by default
    starts = []
    real = dictionary_module._lasso_codes_t

    def spy(X, D, alpha, **kwargs):
        starts.append(None if kwargs.get("init_t") is None else np.array(kwargs["init_t"]))
        return real(X, D, alpha, **kwargs)

    monkeypatch.setattr(dictionary_module, "_lasso_codes_t", spy)
    cache = problem.client_cache(X)
    _, _, first = problem.cached_statistic(X, path[0], cache, None)
    assert starts[-1] is None
    stat, loss, second = problem.cached_statistic(X, path[1], first, None)
    np.testing.assert_array_equal(starts[-1], first["codes_t"])
    # the start changes the codes only within the coder's tolerance
    ref_stat, ref_loss = problem.local_statistic(X, path[1])
    assert abs(loss - ref_loss) <= 1e-4 * ref_loss
    np.testing.assert_allclose(stat["A"], ref_stat["A"], rtol=1e-2, atol=1e-4)
    # a changed row starts from zero; the other rows' starts do not depend on it
    Y = X.copy()
    Y[3] += 1.0
    problem.cached_statistic(Y, path[2], second, None)
    assert np.all(starts[-1][:, 3] == 0)
    np.testing.assert_array_equal(starts[-1][:, 4], second["codes_t"][:, 4])


def test_minibatch_cache_updates_the_drawn_rows_only():
    rng = np.random.default_rng(6)
    D = unit_rows(rng, 8, 10)
    X = sparse_rows(rng, 40, D)
    problem = DictionaryLearningProblem(8, 0.1, 10, code_cache=True)
    rows = np.array([1, 5, 6, 30])
    stat, loss, cache = problem.cached_statistic(X, D, {}, rows)
    ref_stat, ref_loss = problem.local_statistic(X[rows], D)
    np.testing.assert_array_equal(stat["A"], ref_stat["A"])
    codes = cache["codes_t"].T
    np.testing.assert_array_equal(codes[rows], batch_lasso_cd(X[rows], D, 0.1))
    others = np.setdiff1d(np.arange(40), rows)
    assert np.all(codes[others] == 0)
    # "auto" leaves small minibatches (below a sixteenth of the rows) uncached
    auto = DictionaryLearningProblem(8, 0.1, 10, code_cache="auto")
    assert auto.cached_statistic(X, D, {}, rows[:2])[2] == {}
    assert auto.cached_statistic(X, D, {}, rows)[2]["codes_t"].shape == (8, 40)


def test_cache_size_rule():
    X = np.zeros((10, 4))
    assert DictionaryLearningProblem(3, 0.1, 4, code_cache="auto").client_cache(X) == {}
    assert DictionaryLearningProblem(3, 0.1, 4).client_cache(X) == {}  # "auto" by default
    assert DictionaryLearningProblem(3, 0.1, 4, code_cache=False).client_cache(X) is None
    assert DictionaryLearningProblem(3, 0.1, 4, fit_algorithm="lars").client_cache(X) is None
    big = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(10**7, 16), strides=(0, 0))
    assert DictionaryLearningProblem(8, 0.1, 16, code_cache="auto").client_cache(big) is None  # 640 MB of codes
    # the codes: 2**21 rows x 4 atoms x 8 bytes = 64 MiB
    edge = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(2**21, 4), strides=(0, 0))
    assert DictionaryLearningProblem(4, 0.1, 4).client_cache(edge) == {}
    over = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(2**21 + 1, 4), strides=(0, 0))
    assert DictionaryLearningProblem(4, 0.1, 4).client_cache(over) is None
    assert DictionaryLearningProblem(8, 0.1, 16, code_cache=True).client_cache(big) == {}
    # more atoms than features: the exact solver, which starts from zero
    assert DictionaryLearningProblem(20, 0.1, 16, code_cache=True).client_cache(big) is None


def test_cached_fit_is_within_the_coder_tolerance_of_the_cold_fit():
    rng = np.random.default_rng(7)
    D = unit_rows(rng, 10, 12)
    clients = [sparse_rows(rng, 80, D) for _ in range(3)]
    kwargs = dict(n_components=10, alpha=0.1, max_iter=8, tol=0, random_state=0)
    warm = FederatedDictionaryLearning(code_cache="auto", **kwargs).fit(clients)
    cold = FederatedDictionaryLearning(code_cache=False, **kwargs).fit(clients)
    np.testing.assert_allclose(warm.error_, cold.error_, rtol=1e-4)
    assert all(c.cache and c.cache["codes_t"].shape == (10, 80) for c in warm.fedmm_state_.clients)
    assert all(c.cache is None for c in cold.fedmm_state_.clients)


def test_minibatch_cache_is_independent_of_n_jobs_and_backend():
    rng = np.random.default_rng(8)
    D = unit_rows(rng, 6, 8)
    clients = [sparse_rows(rng, 50, D) for _ in range(3)]
    kwargs = dict(n_components=6, alpha=0.1, max_iter=4, tol=0, random_state=0, batch_size=20,
                  code_cache=True, participation=0.7)
    ref = FederatedDictionaryLearning(n_jobs=1, **kwargs).fit(clients)
    assert any(c.cache for c in ref.fedmm_state_.clients)
    for backend in ("loky", "threading"):
        with parallel_config(backend=backend):
            other = FederatedDictionaryLearning(n_jobs=2, **kwargs).fit(clients)
        np.testing.assert_array_equal(ref.components_, other.components_)
        np.testing.assert_array_equal(ref.error_, other.error_)


def test_float32_fit_keeps_float32_in_the_clients_work():
    rng = np.random.default_rng(9)
    D = unit_rows(rng, 6, 8)
    clients = [sparse_rows(rng, 40, D).astype(np.float32) for _ in range(2)]
    for batch_size, cache in ((None, "auto"), (15, True)):
        est = FederatedDictionaryLearning(n_components=6, alpha=0.1, max_iter=3, random_state=0,
                                          batch_size=batch_size, code_cache=cache).fit(clients)
        state = est.fedmm_state_
        assert est.components_.dtype == np.float32 and state.s_hat.dtype == np.float32
        for c in state.clients:
            assert c.cv.dtype == np.float32
            # (besides the integer checksum of the rows the cache belongs to)
            assert all(a.dtype == np.float32 for k, a in c.cache.items() if k != "_rows")


def test_chunked_coding_equals_one_chunk(monkeypatch):
    rng = np.random.default_rng(10)
    D = unit_rows(rng, 12, 8)
    X = sparse_rows(rng, 3000, D)
    problem = DictionaryLearningProblem(12, 0.1, 8, code_cache="auto")
    whole, loss = problem.local_statistic(X, D)
    monkeypatch.setattr(dictionary_module, "_CHUNK_BYTES", 1)  # 1024-row chunks
    assert problem._chunk_rows(X) == 1024
    parts, loss_parts = problem.local_statistic(X, D)
    for name in whole:
        np.testing.assert_allclose(parts[name], whole[name], rtol=1e-10, atol=1e-14)
    assert loss_parts == pytest.approx(loss, rel=1e-12)
    # the cached codes of an undercomplete dictionary, chunked or not
    D = unit_rows(rng, 6, 8)
    problem = DictionaryLearningProblem(6, 0.1, 8)
    monkeypatch.setattr(dictionary_module, "_CHUNK_BYTES", 2**30)
    _, loss_one, one = problem.cached_statistic(X, D, {}, None)
    monkeypatch.setattr(dictionary_module, "_CHUNK_BYTES", 1)
    _, loss_parts, parts = problem.cached_statistic(X, D, {}, None)
    np.testing.assert_allclose(parts["codes_t"], one["codes_t"], rtol=1e-10, atol=1e-14)
    assert loss_parts == pytest.approx(loss_one, rel=1e-12)


# ------------------------------------------------------- default step rule
def test_default_step_rule_is_unchanged_with_full_batches_and_decays_with_minibatches():
    from skfedmm.compression import make_compressor
    from skfedmm.schedules import auto_step_size

    rng = np.random.default_rng(11)
    D = unit_rows(rng, 5, 6)
    clients = [sparse_rows(rng, 40, D), sparse_rows(rng, 60, D)]
    kwargs = dict(n_components=5, alpha=0.1, max_iter=12, tol=0, random_state=0)
    full = FederatedDictionaryLearning(**kwargs).fit(clients)
    np.testing.assert_array_equal(full.history_["step_size"][1:], 1.0)
    compressed = FederatedDictionaryLearning(compression="qsgd", **kwargs).fit(clients)
    steps = np.asarray(compressed.history_["step_size"][1:])
    # measured on each round's messages, never below the worst-case step
    floor = auto_step_size(make_compressor("qsgd").omega(compressed.fedmm_state_.layout.size), 1.0)
    assert np.all((steps >= floor) & (steps <= 1)) and steps.min() < 1
    # minibatches of 20 rows: a round draws 40 of the 100 rows (f = 0.4)
    mini = FederatedDictionaryLearning(batch_size=20, **kwargs).fit(clients)
    steps = np.asarray(mini.history_["step_size"][1:])
    expected = [min(1.0, (0.4 * (t + 1)) ** -0.6) for t in range(12)]
    np.testing.assert_allclose(steps, expected, rtol=1e-12)
    assert steps[0] == steps[1] == 1.0 and np.all(np.diff(steps[2:]) < 0)
    # a batch as large as every client is a full batch
    big = FederatedDictionaryLearning(batch_size=60, **kwargs).fit(clients)
    np.testing.assert_array_equal(big.history_["step_size"][1:], 1.0)
    np.testing.assert_array_equal(big.components_, full.components_)


def test_client_ids_in_blocks_split_without_copying():
    from skfedmm._clients import check_clients

    X = np.random.default_rng(12).standard_normal((30, 4)).astype(np.float32)
    est = FederatedDictionaryLearning()
    grouped = np.repeat([2, 5, 7], 10)
    clients, labels = check_clients(est, X, grouped)
    assert [c.shape[0] for c in clients] == [10, 10, 10] and list(labels) == [2, 5, 7]
    assert all(np.shares_memory(c, X) and c.dtype == np.float32 for c in clients)
    np.testing.assert_array_equal(np.vstack(clients), X)
    mixed = np.tile([2, 5, 7], 10)
    clients, _ = check_clients(est, X, mixed)
    assert not any(np.shares_memory(c, X) for c in clients)
    np.testing.assert_array_equal(clients[1], X[1::3])


def test_switching_the_cache_off_in_a_continued_fit_drops_it():
    rng = np.random.default_rng(13)
    D = unit_rows(rng, 5, 6)
    clients = [sparse_rows(rng, 30, D) for _ in range(2)]
    est = FederatedDictionaryLearning(n_components=5, alpha=0.1, max_iter=2, tol=0,
                                      random_state=0, warm_start=True,
                                      code_cache="auto").fit(clients)
    assert all(c.cache for c in est.fedmm_state_.clients)
    est.set_params(code_cache=False).fit(clients)
    assert est.n_iter_ == 4 and all(c.cache is None for c in est.fedmm_state_.clients)
