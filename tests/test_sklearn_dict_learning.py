"""scikit-learn's own DictionaryLearning tests, with our class swapped in.

The test module ``sklearn/decomposition/tests/test_dict_learning.py`` of the
installed scikit-learn is copied at test time with every construction
``DictionaryLearning(...)`` replaced by ``FederatedDictionaryLearning(...)``
(``MiniBatchDictionaryLearning``, ``SparseCoder``, ``dict_learning`` and the
other functions are left alone), and the tests that build our class are run
in a fresh pytest process (see ``tests/_swap.py``): a scikit-learn user who
swaps the class in should see them pass. Nothing is deselected.
"""

import pytest

from ._swap import SKLEARN_DIR, check_run, run_swapped, swapped_module, swapped_test_names

SOURCE = SKLEARN_DIR / "decomposition" / "tests" / "test_dict_learning.py"
# test-id pattern (fnmatch on "name[params]") -> why it can never pass (none today)
DESELECTED = {}


def swapped():
    return swapped_module(SOURCE.read_text(), "DictionaryLearning", "FederatedDictionaryLearning")


def test_swap_touches_only_dictionary_learning():
    text = (
        "from sklearn.decomposition import DictionaryLearning, MiniBatchDictionaryLearning\n"
        "import sklearn\n"
        "a = DictionaryLearning(3)\nb = MiniBatchDictionaryLearning(3)\n"
        "c = sklearn.decomposition.DictionaryLearning(3)\nd = [DictionaryLearning()]\n"
    )
    new, n = swapped_module(text, "DictionaryLearning", "FederatedDictionaryLearning")
    assert n == 2
    assert "a = FederatedDictionaryLearning(3)" in new
    assert "d = [FederatedDictionaryLearning()]" in new
    assert "b = MiniBatchDictionaryLearning(3)" in new
    assert "c = sklearn.decomposition.DictionaryLearning(3)" in new
    assert "from skfedmm import FederatedDictionaryLearning" in new


def test_sklearn_dict_learning_tests_pass_with_our_class(tmp_path):
    if not SOURCE.is_file():
        pytest.skip(f"scikit-learn's test module is not installed ({SOURCE})")
    text, n_swapped = swapped()
    assert n_swapped >= 1
    names = swapped_test_names(text, "FederatedDictionaryLearning")
    assert names, "no scikit-learn test builds the class any more"
    counts = check_run(
        *run_swapped(tmp_path, text, names, DESELECTED, "test_swapped_dict_learning.py")
    )
    assert counts["passed"] >= len(names) and not counts.get("deselected")
