"""scikit-learn's own DictionaryLearning tests, with our class swapped in.

The test module ``sklearn/decomposition/tests/test_dict_learning.py`` of the
installed scikit-learn is copied at test time with every construction
``DictionaryLearning(...)`` replaced by ``FederatedDictionaryLearning(...)``
(``MiniBatchDictionaryLearning``, ``SparseCoder``, ``dict_learning`` and the
other functions are left alone), and the tests that build our class are run
in a fresh pytest process: a scikit-learn user who swaps the class in should
see them pass. Nothing is deselected.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sklearn

import skfedmm

SOURCE = Path(sklearn.__file__).parent / "decomposition" / "tests" / "test_dict_learning.py"
# a construction of the class, not MiniBatchDictionaryLearning nor an attribute
CONSTRUCTION = re.compile(r"(?<![\w.])DictionaryLearning\(")
# tests that can never pass for a principled reason, with the reason (none today)
DESELECTED = {}


def swapped_module(text):
    """The test module's text with the class swapped, and how many were."""
    new, n = CONSTRUCTION.subn("FederatedDictionaryLearning(", text)
    new = re.sub(
        r"^import sklearn$", "import sklearn\nfrom skfedmm import FederatedDictionaryLearning",
        new, count=1, flags=re.MULTILINE,
    )
    return new, n


def _swapped_test_names(text):
    """Names of the module's test functions (with their decorators) that build our class."""
    lines = text.splitlines()
    names = []
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            if "FederatedDictionaryLearning(" in "\n".join(lines[first - 1 : node.end_lineno]):
                names.append(node.name)
    return names


def test_swap_touches_only_dictionary_learning():
    text = (
        "from sklearn.decomposition import DictionaryLearning, MiniBatchDictionaryLearning\n"
        "import sklearn\n"
        "a = DictionaryLearning(3)\nb = MiniBatchDictionaryLearning(3)\n"
        "c = sklearn.decomposition.DictionaryLearning(3)\nd = [DictionaryLearning()]\n"
    )
    new, n = swapped_module(text)
    assert n == 2
    assert "a = FederatedDictionaryLearning(3)" in new
    assert "d = [FederatedDictionaryLearning()]" in new
    assert "b = MiniBatchDictionaryLearning(3)" in new
    assert "c = sklearn.decomposition.DictionaryLearning(3)" in new
    assert "from skfedmm import FederatedDictionaryLearning" in new


def test_sklearn_dict_learning_tests_pass_with_our_class(tmp_path):
    if not SOURCE.is_file():
        pytest.skip(f"scikit-learn's test module is not installed ({SOURCE})")
    text, n_swapped = swapped_module(SOURCE.read_text())
    assert n_swapped >= 1 and "from skfedmm import FederatedDictionaryLearning" in text
    names = [name for name in _swapped_test_names(text) if name not in DESELECTED]
    assert names, "no scikit-learn test builds the class any more"
    module = tmp_path / "test_swapped_dict_learning.py"
    module.write_text(text)
    env = dict(os.environ)
    # the skfedmm this session imports, installed or not
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(skfedmm.__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
    )
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
        "-o", "addopts=", "-W", "ignore::pytest.PytestUnknownMarkWarning", "--rootdir",
        str(tmp_path), *[f"{module}::{name}" for name in names],
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    summary = re.search(r"(\d+) passed", out)
    assert summary and int(summary.group(1)) >= len(names), out[-2000:]
    assert " failed" not in out and " error" not in out, out[-2000:]
