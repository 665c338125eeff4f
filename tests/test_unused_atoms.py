"""Dead dictionary atoms (unused or duplicated) and the stopping rule (issue 13)."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_almost_equal
from sklearn.decomposition import DictionaryLearning, sparse_encode

from skfedmm import FedMM, FederatedDictionaryLearning, MMProblem
from skfedmm.datasets import atom_recovery
from skfedmm.problems.dictionary import (
    DictionaryLearningProblem,
    dead_atoms,
    residual_second_moment,
    update_dict,
)

# scikit-learn's test_dict_learning_reconstruction: 12 atoms for 8 features
X_SK = np.random.RandomState(0).randn(10, 8)


def unit_rows(rng, k, d):
    D = rng.standard_normal((k, d))
    return D / np.linalg.norm(D, axis=1, keepdims=True)


def stats(X, D, alpha):
    code = sparse_encode(X, D, algorithm="lasso_cd", alpha=alpha)
    n = X.shape[0]
    return code, code.T @ code / n, X.T @ code / n, X.T @ X / n


# ------------------------------------------------------------------ kernels
def test_residual_second_moment_is_the_residuals_second_moment():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 6))
    D = unit_rows(rng, 4, 6)
    code, A, B, M = stats(X, D, 0.1)
    residual = X - code @ D
    assert_allclose(residual_second_moment(M, A, B, D), residual.T @ residual / 50, atol=1e-12)


def test_dead_atoms_unused_and_duplicates_merge_codes():
    rng = np.random.default_rng(1)
    D = unit_rows(rng, 5, 7)
    D[3] = -D[1]  # a duplicate, up to the sign
    H = rng.standard_normal((40, 5))
    H[:, 4] = 0  # unused
    H[:, 3] *= 0.1  # used less than its twin
    A = H.T @ H / 40
    dead, merge = dead_atoms(A, D)
    np.testing.assert_array_equal(dead, [False, False, False, True, True])
    # the merged codes h_1 - h_3 on atom 1 give the same reconstruction
    merged = H @ merge
    assert np.all(merged[:, 3] == 0)
    assert_allclose(merged @ D, H @ D, atol=1e-12)
    assert np.abs(merged).sum() <= np.abs(H).sum()
    # no duplicate: no merge
    assert dead_atoms(A, unit_rows(rng, 5, 7))[1] is None


def test_dead_atom_goes_to_the_leading_residual_direction():
    """The placement: top eigenvectors of R, deterministic, without any rng."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 8)) * np.array([3, 2, 1, 1, 1, 1, 1, 1.0])
    D = unit_rows(rng, 6, 8)
    code, A, B, M = stats(X, D, 0.3)
    A[[2, 5], :] = A[:, [2, 5]] = 0  # two atoms unused by every code
    B[:, [2, 5]] = 0
    new = update_dict(D, A, B, M=M)
    np.testing.assert_array_equal(new, update_dict(D, A, B, M=M, rng=np.random.default_rng(9)))
    live = new.copy()
    live[[2, 5]] = 0
    evals, evecs = np.linalg.eigh(residual_second_moment(M, A, B, live))
    top = evecs[:, ::-1][:, :2].T
    assert_allclose(np.abs(new[[2, 5]] @ top.T), np.eye(2), atol=1e-10)
    # used atoms are exactly the plain M-step's
    kept = [0, 1, 3, 4]
    assert_allclose(new[kept], update_dict(D, A, B)[kept], atol=1e-12)
    assert_allclose(np.linalg.norm(new[[2, 5]], axis=1), 1)
    assert np.all(np.linalg.norm(new, axis=1) <= 1 + 1e-12)


def test_placement_with_nonnegative_atoms():
    rng = np.random.default_rng(3)
    X = np.abs(rng.standard_normal((100, 6)))
    D = np.abs(unit_rows(rng, 4, 6))
    code, A, B, M = stats(X, D, 0.2)
    A[1, :] = A[:, 1] = 0
    B[:, 1] = 0
    new = update_dict(D, A, B, M=M, positive=True)
    assert np.all(new >= 0) and np.isclose(np.linalg.norm(new[1]), 1)
    assert not np.allclose(new[1], D[1])


def test_no_residual_energy_leaves_the_atom():
    """When the live atoms explain everything, a dead atom has nowhere to go."""
    rng = np.random.default_rng(4)
    D = unit_rows(rng, 3, 3)
    X = rng.standard_normal((30, 3))
    code = np.linalg.solve(D.T, X.T).T  # exact codes: zero residual
    D4 = np.vstack([D, unit_rows(rng, 1, 3)])
    code4 = np.hstack([code, np.zeros((30, 1))])
    A, B, M = code4.T @ code4 / 30, X.T @ code4 / 30, X.T @ X / 30
    new = update_dict(D4, A, B, M=M, max_sweeps=0)
    np.testing.assert_array_equal(new[3], D4[3])


def test_restarted_hook_is_stateless():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((60, 5))
    # an M-step solved to convergence, so that its result depends on the
    # statistic only, not on the warm start
    problem = DictionaryLearningProblem(
        7, 0.5, 5, atom_restart="residual", dict_max_sweeps=10_000, dict_tol=1e-15,
    )
    prepared = problem.prepare(problem.init_statistic(X))
    assert prepared is not problem and not hasattr(problem, "second_moment_")
    D = unit_rows(rng, 7, 5)
    D[6] = D[0]  # a duplicate: dead
    stat, _ = prepared.local_statistic(X, D)
    new = prepared.minimize(stat, D)
    assert prepared.restarted(stat, D, new)
    # atom 6 is no duplicate any more (whether the codes used it, as
    # coordinate descent does, or left it unused, as the exact active-set
    # coder does: both are lasso solutions when two atoms coincide)
    assert abs(new[6] @ new[0]) < (1 - 1e-6) * np.linalg.norm(new[6]) * np.linalg.norm(new[0])
    # an unused atom: placed once (a restart), then on the same direction again
    # from the same statistic (no restart): what the hook reports depends on
    # its arguments only
    D = unit_rows(rng, 7, 5)
    unused, _ = prepared.local_statistic(X, D)
    unused["A"][3, :] = unused["A"][:, 3] = 0
    unused["B"][:, 3] = 0
    placed = prepared.minimize(unused, D)
    assert prepared.restarted(unused, D, placed)
    again = prepared.minimize(unused, placed)
    assert_allclose(again, placed, atol=1e-6)
    assert not prepared.restarted(unused, placed, again)
    assert prepared.restarted(unused, D, placed)
    # random re-draws (no second moment) are never reported
    random = DictionaryLearningProblem(7, 0.5, 5, atom_restart="random")
    assert random.prepare(random.init_statistic(X)) is random
    assert not random.restarted(stat, D, random.minimize(stat, D, np.random.default_rng(0)))


@pytest.mark.parametrize(
    "d, k, init, dict_init, expected",
    [(8, 12, "pca", False, True), (100, 10, "pca", False, True), (100, 10, "random", False, False),
     (100, 10, "pca", True, False), (12, 10, "random", False, True)],
)
def test_auto_rule(d, k, init, dict_init, expected):
    D0 = np.eye(k, d) if dict_init else None
    problem = DictionaryLearningProblem(k, 1.0, d, init=init, dict_init=D0)
    assert problem.uses_residual_rule() is expected
    sends = expected or (D0 is None and init == "pca")
    assert (problem.init_statistic(np.ones((3, d))) is not None) is sends


# ------------------------------------------------------- the estimator's fit
SPLITS = {
    "pooled": lambda X: X,
    "two": lambda X: [X[:3], X[3:]],
    "one row each": lambda X: [X[i : i + 1] for i in range(len(X))],
    "shuffled": lambda X: [X[[7, 2, 9]], X[[0, 5]], X[[1, 3, 4, 6, 8]]],
}


@pytest.mark.parametrize("split", list(SPLITS))
def test_overcomplete_dictionary_reconstructs_the_rows_for_any_split(split):
    """scikit-learn's test_dict_learning_reconstruction, whatever the clients."""
    est = FederatedDictionaryLearning(
        12, transform_algorithm="omp", transform_alpha=0.001, random_state=0
    ).fit(SPLITS[split](X_SK))
    code = est.transform(X_SK)
    assert_array_almost_equal(code @ est.components_, X_SK)
    assert_array_almost_equal(est.inverse_transform(code), X_SK)
    # the objective scikit-learn reaches (sum over rows there)
    ref = DictionaryLearning(12, random_state=0).fit(X_SK)
    assert est.error_[-1] <= ref.error_[-1] / len(X_SK) * (1 + 1e-6)
    pooled = FederatedDictionaryLearning(12, random_state=0).fit(X_SK)
    # the rule uses aggregated statistics only: split-invariant
    assert_allclose(est.components_, pooled.components_, rtol=1e-7, atol=1e-9)
    assert est.n_iter_ == pooled.n_iter_


def test_random_redraws_stall_where_the_residual_rule_does_not():
    """The regression of issue 13, measured: the plateau is a dead atom."""
    kwargs = dict(n_components=12, random_state=0, max_iter=30)
    random = FederatedDictionaryLearning(atom_restart="random", tol=0, **kwargs).fit(X_SK)
    residual = FederatedDictionaryLearning(atom_restart="residual", tol=0, **kwargs).fit(X_SK)
    assert residual.error_[10] < random.error_[10] - 1e-3
    assert residual.error_[-1] <= random.error_[-1] + 1e-9
    assert np.all(random.history_["restarted"][1:] == 0)  # random re-draws are no restart
    assert np.nansum(residual.history_["restarted"]) >= 1


def make_missing_atom_case(d=60):
    """Rows from 6 atoms in ``d`` dimensions; atom 5, the strongest, is missing
    from the initial dictionary, whose atom 5 is a copy of atom 0."""
    rng = np.random.default_rng(0)
    true = unit_rows(rng, 6, d)
    H = np.where(rng.random((300, 6)) < 0.4, rng.standard_normal((300, 6)), 0)
    H[:, 5] *= 3
    X = H @ true + 0.01 * rng.standard_normal((300, d))
    D0 = true.copy()
    D0[5] = true[0]
    return X, true, D0


def test_missing_atom_plateau():
    """A plateau of our own: with alpha = 1 in 60 dimensions a random unit
    atom correlates with no row's residual beyond alpha, so re-drawing it
    stalls; the residual's leading direction is the missing atom."""
    X, true, D0 = make_missing_atom_case()
    clients = [X[:100], X[100:250], X[250:]]
    fits = {
        rule: FederatedDictionaryLearning(
            6, alpha=1.0, dict_init=D0, atom_restart=rule, random_state=0, max_iter=200,
        ).fit(clients)
        for rule in ("residual", "random")
    }
    # every learned atom is one of the true atoms; a re-drawn one stays junk
    learned = {rule: np.abs(est.components_ @ true.T).max(axis=1) for rule, est in fits.items()}
    assert learned["residual"].min() > 0.95 and learned["random"].min() < 0.5
    assert atom_recovery(true, fits["residual"].components_) == 1.0
    assert atom_recovery(true, fits["random"].components_) < 1.0
    assert fits["residual"].error_[-1] < fits["random"].error_[-1] - 1e-2
    # the same fit pooled: the placement only used aggregated statistics
    pooled = FederatedDictionaryLearning(
        6, alpha=1.0, dict_init=D0, atom_restart="residual", random_state=0, max_iter=200,
    ).fit(X)
    assert_allclose(pooled.components_, fits["residual"].components_, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("tol", [1e-8, 1e-3, 0.05])
def test_never_stops_in_a_round_that_restarted_an_atom(tol, monkeypatch):
    est = FederatedDictionaryLearning(12, tol=tol, random_state=0, max_iter=100).fit(X_SK)
    restarted = est.history_["restarted"]
    assert np.nansum(restarted) >= 1 and restarted[-1] == 0 and est.n_iter_ < 100
    if tol == 0.05:
        # without the hook this fit stops right after a restart (round 3)
        monkeypatch.setattr(DictionaryLearningProblem, "restarted", lambda self, *a: False)
        plain = FederatedDictionaryLearning(12, tol=tol, random_state=0, max_iter=100).fit(X_SK)
        assert plain.n_iter_ < est.n_iter_ and restarted[plain.n_iter_] == 1


def test_persistently_dead_atoms_do_not_hold_the_stop_back():
    """alpha so large that no code is ever nonzero: every atom stays dead,
    placed on the same directions every round, which is no restart."""
    est = FederatedDictionaryLearning(12, alpha=100.0, random_state=0, max_iter=1000).fit(X_SK)
    assert est.n_iter_ < 10
    assert np.nansum(est.history_["restarted"]) <= 1


def test_objective_non_increasing_with_restarts():
    X, _, D0 = make_missing_atom_case()
    est = FederatedDictionaryLearning(6, alpha=0.05, dict_init=D0, random_state=0, max_iter=20,
                                      tol=0).fit(X)
    assert np.all(np.diff(est.error_) <= 1e-6 * est.error_[:-1])


# ------------------------------------------------------------------ engine
class FlatWithRestarts(MMProblem):
    """A flat objective; theta[1] counts M-steps, and M-steps below 3 'restart'."""

    def init_parameter(self, init_stat, rng):
        return np.zeros(2)

    def local_statistic(self, X, theta):
        return {"m": X.mean(axis=0)}, 1.0

    def minimize(self, stat, theta_prev, rng=None):
        return np.array([stat["m"][0], theta_prev[1] + 1])

    def restarted(self, stat, theta_prev, theta_new):
        return bool(theta_new[1] <= 3)


def test_engine_never_stops_in_a_restart_round():
    clients = [np.ones((4, 1)), np.zeros((3, 1))]
    state = FedMM(FlatWithRestarts(), max_iter=50, tol=1e-8).fit(clients)
    # theta[1] = 1 after the initial round; rounds 1 and 2 restart (theta[1]
    # = 2, 3); round 3 does not and the objective is flat: stop there
    assert state.round == 3
    np.testing.assert_array_equal(state.history["restarted"][1:], [1, 1, 0])
    plain = FedMM(FlatWithRestarts(), max_iter=50, tol=1e-8)
    plain.problem.restarted = lambda *args: False
    assert plain.fit(clients).round == 1


def test_check_statistic_tolerates_a_tiny_code_lost_to_rounding():
    """An atom used by one row with a code ~1e-13 (what a dead atom's first
    use looks like): A_jj ~ 1e-27 vanishes in the server's rounding while
    A_jl ~ 1e-13 does not; that is no invalid message."""
    problem = DictionaryLearningProblem(2, 0.1, 3)
    h = np.array([[2.0, -3e-13]])
    A = h.T @ h
    lost = A.copy()
    lost[1, 1] = 0.0
    theta = np.eye(2, 3)
    assert problem.check_statistic({"A": lost, "B": np.zeros((3, 2))}, theta, atol=1e-15) is None
    bad = np.array([[1.0, 0.5], [0.5, 0.1]])  # |A_01| > sqrt(A_00 A_11)
    assert problem.check_statistic({"A": bad, "B": np.zeros((3, 2))}, theta, atol=1e-15)
