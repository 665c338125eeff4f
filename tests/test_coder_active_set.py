"""The coder's exact active-set solver (greedy first atom, feature-sign search)."""

import numpy as np
import pytest
from sklearn.decomposition import sparse_encode

from skfedmm.problems.dictionary import _feature_sign, batch_lasso_cd, lasso_objective


def unit_rows(rng, k, d):
    D = rng.standard_normal((k, d))
    return D / np.linalg.norm(D, axis=1, keepdims=True)


def overcomplete_problem(seed=0, n=300, k=40, d=16, density=0.1):
    rng = np.random.default_rng(seed)
    D = unit_rows(rng, k, d)
    H = np.where(rng.random((n, k)) < density, rng.standard_normal((n, k)), 0)
    X = H @ D + 0.05 * rng.standard_normal((n, d))
    return X, D


def kkt_violation(X, H, D, alpha, positive=False):
    """Largest violation of the lasso's optimality conditions, per row."""
    corr = (X - H @ D) @ D.T
    on = H != 0
    if positive:
        off = np.where(on, -np.inf, corr - alpha).max(axis=1)
        on_err = np.where(on, np.abs(corr - alpha), 0).max(axis=1)
    else:
        off = np.where(on, -np.inf, np.abs(corr) - alpha).max(axis=1)
        on_err = np.where(on, np.abs(corr - alpha * np.sign(H)), 0).max(axis=1)
    return np.maximum(np.maximum(off, 0), on_err)


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("warm", [False, True])
def test_active_set_codes_meet_the_optimality_conditions(positive, warm):
    X, D = overcomplete_problem()
    alpha = 0.1
    init = None
    if warm:  # codes at a nearby dictionary, as the code cache holds
        other = unit_rows(np.random.default_rng(9), *D.shape) * 0.1 + D
        init = batch_lasso_cd(X, other / np.linalg.norm(other, axis=1, keepdims=True), alpha,
                              positive=positive)
    H = batch_lasso_cd(X, D, alpha, positive=positive, solver="active_set", code_init=init)
    # every row is at the lasso solution: violations at most tol * alpha
    assert np.all(kkt_violation(X, H, D, alpha, positive) <= 1e-4 * alpha + 1e-9)
    if positive:
        assert np.all(H >= 0)
    ref = sparse_encode(X, D, algorithm="lasso_lars", alpha=alpha, positive=positive)
    f, f_ref = lasso_objective(X, H, D, alpha), lasso_objective(X, ref, D, alpha)
    assert np.all(f <= f_ref * (1 + 1e-9) + 1e-12)
    # and no worse than coordinate descent to its tolerance
    cd = batch_lasso_cd(X, D, alpha, positive=positive, solver="cd", code_init=init)
    assert f.sum() <= lasso_objective(X, cd, D, alpha).sum() * (1 + 1e-12)


@pytest.mark.parametrize("warm", [False, True])
def test_active_set_rows_are_independent(warm):
    """Same code alone and in a batch, up to the rounding of the products
    with the rows (BLAS may sum in another order for another batch)."""
    X, D = overcomplete_problem(seed=1, n=200)
    init = batch_lasso_cd(X, D * 0.9 + 0.1 * unit_rows(np.random.default_rng(2), *D.shape), 0.1) \
        if warm else None
    full = batch_lasso_cd(X, D, 0.1, solver="active_set", code_init=init)
    for part in (slice(37, 61), slice(5, 6), slice(150, 200)):
        alone = batch_lasso_cd(X[part], D, 0.1, solver="active_set",
                               code_init=None if init is None else init[part])
        np.testing.assert_allclose(full[part], alone, rtol=1e-10, atol=1e-12)


def test_auto_picks_the_solver_by_the_dictionary_shape():
    X, D = overcomplete_problem(seed=3, n=80)
    np.testing.assert_array_equal(batch_lasso_cd(X, D, 0.1),
                                  batch_lasso_cd(X, D, 0.1, solver="active_set"))
    rng = np.random.default_rng(4)
    D2 = unit_rows(rng, 10, 16)  # undercomplete: coordinate descent
    X2 = rng.standard_normal((50, 16))
    np.testing.assert_array_equal(batch_lasso_cd(X2, D2, 0.1), batch_lasso_cd(X2, D2, 0.1, solver="cd"))
    with pytest.raises(ValueError, match="solver"):
        batch_lasso_cd(X2, D2, 0.1, solver="lars")


def test_duplicate_atoms_fall_back_without_harm():
    """A duplicated atom makes restricted systems singular: the rows that
    meet one still end at a lasso solution (objective as sklearn's)."""
    X, D = overcomplete_problem(seed=5, n=150, k=20, d=12, density=0.2)
    D[7] = D[3]
    D[11] = -D[2]
    alpha = 0.05
    H = batch_lasso_cd(X, D, alpha, solver="active_set")
    assert np.all(np.isfinite(H))
    ref = sparse_encode(X, D, algorithm="lasso_lars", alpha=alpha)
    f, f_ref = lasso_objective(X, H, D, alpha), lasso_objective(X, ref, D, alpha)
    assert np.all(f <= f_ref * (1 + 1e-4) + 1e-10)


def test_dense_solutions_fall_back_to_coordinate_descent():
    """A small penalty: solutions with about as many atoms as features,
    where restricted systems become singular; the rows still end within the
    tolerance of coordinate descent (weak on so hard a problem)."""
    X, D = overcomplete_problem(seed=6, n=100, k=30, d=10, density=0.3)
    alpha = 0.02
    H = batch_lasso_cd(X, D, alpha, solver="active_set")
    assert np.all(np.isfinite(H))
    f = lasso_objective(X, H, D, alpha).sum()
    assert f <= lasso_objective(X, batch_lasso_cd(X, D, alpha, solver="cd"), D, alpha).sum()
    exact = batch_lasso_cd(X, D, alpha, solver="cd", tol=1e-10, max_iter=100000)
    assert f <= lasso_objective(X, exact, D, alpha).sum() * (1 + 1e-3)


def test_feature_sign_never_increases_the_objective_and_finishes():
    X, D = overcomplete_problem(seed=6, n=100, k=30, d=10, density=0.1)
    alpha = 0.1
    G, C = D @ D.T, X @ D.T
    # three random atoms per row with random values: wrong supports and signs
    rng = np.random.default_rng(7)
    start = np.zeros((100, 30))
    np.put_along_axis(start, rng.permuted(np.tile(np.arange(30), (100, 1)), axis=1)[:, :3],
                      rng.standard_normal((100, 3)), axis=1)
    H, done = _feature_sign(C, G, start, alpha, False, 1e-4, max_steps=200)
    f_start = lasso_objective(X, start, D, alpha)
    assert np.all(lasso_objective(X, H, D, alpha) <= f_start + 1e-12)
    assert done.mean() > 0.9
    assert np.all(kkt_violation(X[done], H[done], D, alpha) <= 1e-4 * alpha + 1e-9)
    # the others stopped where a further atom would make the restricted
    # system singular (as many atoms as features): coordinate descent's turn
    assert np.all(np.count_nonzero(H[~done], axis=1) == X.shape[1])
    # a zero step budget leaves the codes as they were
    H0, done0 = _feature_sign(C, G, start, alpha, False, 1e-4, max_steps=0)
    np.testing.assert_array_equal(H0, start)
    assert not done0.any()


def test_active_set_keeps_float32():
    X, D = overcomplete_problem(seed=8, n=60)
    H = batch_lasso_cd(X.astype(np.float32), D.astype(np.float32), 0.1, solver="active_set")
    assert H.dtype == np.float32 and np.all(np.isfinite(H))
