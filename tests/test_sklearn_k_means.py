"""scikit-learn's own KMeans tests, with FederatedKMeans swapped in.

``sklearn/cluster/tests/test_k_means.py`` of the installed scikit-learn is
copied with every construction ``KMeans(...)`` replaced by
``FederatedKMeans(...)`` and the class itself swapped where the module
passes it as a value (``@pytest.mark.parametrize("Estimator", [KMeans,
MiniBatchKMeans])``); ``MiniBatchKMeans``, ``k_means``, ``kmeans_plusplus``
and the private kernels are left alone. The tests that use our class run in
a fresh pytest process (see ``tests/_swap.py``), float32 cases included;
the cases that can never pass are deselected below, each with its reason.
"""

import pytest

from ._swap import SKLEARN_DIR, check_run, matching, run_swapped, swapped_module, swapped_test_names

SOURCE = SKLEARN_DIR / "cluster" / "tests" / "test_k_means.py"

_SPARSE = (
    "sparse input: FederatedKMeans refuses sparse matrices with a TypeError "
    "(clients hold dense rows)"
)
_WEIGHTS = (
    "sample_weight: FederatedKMeans.fit takes no per-row weights (TypeError); the "
    "clients' statistics are unweighted counts and sums"
)
_CALLABLE = (
    "callable init: scikit-learn calls it with all the rows X, which a federated "
    "server never holds (refused by parameter validation)"
)
_PRIVATE = "calls scikit-learn's private KMeans._init_centroids"

# test-id pattern (fnmatch on "name[params]") -> why it cannot pass
DESELECTED = {
    # the other estimator of the parametrizations: not ours
    "*MiniBatchKMeans*": "scikit-learn's MiniBatchKMeans, not our class",
    "*sparse*": _SPARSE,
    "*X_csr*": _SPARSE,
    "*csr_array*": _SPARSE,
    "*csr_matrix*": _SPARSE,
    "test_kmeans_results*": _WEIGHTS,
    "test_kmeans_empty_cluster_relocated*": _WEIGHTS,
    "test_weighted_vs_repeated*": _WEIGHTS,
    "test_unit_weights_vs_no_weights*": _WEIGHTS,
    "test_scaled_weights*": _WEIGHTS,
    "test_sample_weight_unchanged*": _WEIGHTS,
    "test_all_init[[]FederatedKMeans-callable-*": _CALLABLE,
    "test_kmeans_init_auto_with_initial_centroids[[]FederatedKMeans-<lambda>-*": _CALLABLE,
    "test_wrong_params[[]param2-*": _CALLABLE,
    "test_wrong_params[[]param4-*": _CALLABLE,
    "test_sample_weight_init*": _PRIVATE,
    "test_sample_weight_zero*": _PRIVATE,
    "test_score_max_iter[[]*-FederatedKMeans]": (
        "assumes the initial centres are not a Lloyd fixed point; our k-means++ "
        "initialization already runs Lloyd steps on every client (the one-shot "
        "federated summary), so on one client max_iter=1 can already be converged"
    ),
    "test_kmeans_relocated_clusters[[]*-dense]": (
        "expects scikit-learn's relocation of an empty cluster onto the rows farthest "
        "from their centres, which the server never sees; ours re-seeds it at a random "
        "offset from the most dispersed cluster, so n_iter_ is 3 to 6 instead of 3 "
        "(the inertia, 0.25, is the expected one)"
    ),
    "test_relocating_with_duplicates[[]*-dense]": (
        "expects n_iter_ == 1 with duplicated initial centres: scikit-learn moves the "
        "empty cluster onto a row, which the server never sees; ours re-seeds it next "
        "to the most dispersed cluster (here at distance 0, as every cluster is one "
        "point), and the fit stops one round later, n_iter_ == 2 (the warning about "
        "fewer distinct clusters is raised as expected)"
    ),
}


def swapped():
    return swapped_module(SOURCE.read_text(), "KMeans", "FederatedKMeans", references=True)


def test_swap_touches_only_kmeans():
    text = (
        "import numpy as np\n"
        "from sklearn.cluster import KMeans, MiniBatchKMeans, k_means\n"
        "a = KMeans(3)\nb = MiniBatchKMeans(3)\nc = sklearn.cluster.KMeans(3)\n"
        "d = [KMeans, MiniBatchKMeans]  # KMeans\ne = k_means(X, 3)\nf = 'KMeans'\n"
    )
    new, n = swapped_module(text, "KMeans", "FederatedKMeans", references=True)
    assert n == 1
    assert "a = FederatedKMeans(3)" in new
    assert "b = MiniBatchKMeans(3)" in new
    assert "c = sklearn.cluster.KMeans(3)" in new
    assert "d = [FederatedKMeans, MiniBatchKMeans]  # KMeans" in new
    assert "e = k_means(X, 3)" in new and "f = 'KMeans'" in new
    assert "from sklearn.cluster import KMeans, MiniBatchKMeans, k_means" in new
    assert new.index("from skfedmm import FederatedKMeans") < new.index("import numpy")


def test_deselection_patterns_select_what_they_say():
    assert matching(DESELECTED, "test_all_init[FederatedKMeans-callable-dense]")
    assert matching(DESELECTED, "test_predict_dense_sparse[FederatedKMeans-random-X_csr0]")
    assert not matching(DESELECTED, "test_all_init[FederatedKMeans-k-means++-dense]")
    assert not matching(DESELECTED, "test_kmeans_predict[float32-42-2-FederatedKMeans-lloyd-dense]")
    assert not matching(DESELECTED, "test_wrong_params[param3-The shape-FederatedKMeans]")


def test_sklearn_k_means_tests_pass_with_our_class(tmp_path):
    if not SOURCE.is_file():
        pytest.skip(f"scikit-learn's test module is not installed ({SOURCE})")
    text, n_swapped = swapped()
    assert n_swapped >= 1
    names = swapped_test_names(text, "FederatedKMeans")
    assert names, "no scikit-learn test builds the class any more"
    counts = check_run(*run_swapped(tmp_path, text, names, DESELECTED, "test_swapped_k_means.py"))
    print(counts)
