"""Run one of scikit-learn's own test modules with our class swapped in.

The test module of the installed scikit-learn is copied at test time with
every construction ``Name(...)`` of the swapped class replaced by
``FederatedName(...)`` (other classes and functions whose names merely
contain ``Name`` are left alone), and the tests that build our class are run
in a fresh pytest process: a scikit-learn user who swaps the class in should
see them pass.

scikit-learn's fixtures ``global_random_seed`` (42 unless
``SKLEARN_TESTS_GLOBAL_RANDOM_SEED`` says otherwise) and ``global_dtype``
are provided by importing them from ``sklearn.conftest``; the float32 cases
run too (``SKLEARN_RUN_FLOAT32_TESTS=1``). Tests that can never pass for a
principled reason are deselected by patterns, each with its reason; a
pattern that no longer selects anything is an error, so the list cannot go
stale.
"""

import ast
import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import sklearn

import skfedmm

SKLEARN_DIR = Path(sklearn.__file__).parent

# written next to the swapped module: scikit-learn's fixtures, and the
# deselection of the node ids matching the patterns of deselected.json
CONFTEST = '''
import fnmatch
import json
from pathlib import Path

try:
    from sklearn.conftest import global_dtype, pytest_generate_tests  # noqa: F401
except ImportError:  # scikit-learn's conftest needs optional packages: its defaults
    import numpy as np
    import pytest

    @pytest.fixture(params=[np.float32, np.float64])
    def global_dtype(request):
        return request.param

    @pytest.fixture
    def global_random_seed():
        return 42

PATTERNS = json.loads((Path(__file__).parent / "deselected.json").read_text())


def pytest_collection_modifyitems(config, items):
    keep, drop, used = [], [], set()
    for item in items:
        hits = [p for p in PATTERNS if fnmatch.fnmatchcase(item.name, p)]
        (drop if hits else keep).append(item)
        used.update(hits)
    unused = sorted(set(PATTERNS) - used)
    if unused:
        raise RuntimeError(f"deselection patterns that select no test: {unused}")
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
'''


def construction(name):
    """Regex of a construction ``name(`` (not ``MiniBatchName(`` nor ``module.name(``)."""
    return re.compile(rf"(?<![\w.]){name}\(")


def swapped_module(text, name, new_name, *, references=False, messages=()):
    """The test module's text with the class swapped, and how many constructions were.

    Parameters
    ----------
    text : str
        The test module's source.
    name, new_name : str
        The scikit-learn class and ours (imported from skfedmm after the
        module's first ``import`` statement).
    references : bool
        Also swap the bare class name used as a value (``[Name, Other]`` in a
        parametrization), outside import lines and comments.
    messages : iterable of str
        Texts naming the class (for example ``"This Name instance"`` in an
        expected error message), rewritten to name our class.
    """
    new, n = construction(name).subn(f"{new_name}(", text)
    if references:
        bare = re.compile(rf"(?<![\w.\"']){name}(?![\w(\"'])")
        lines = []
        for line in new.splitlines(keepends=True):
            code, hash_, comment = line.partition("#")
            if not re.match(r"\s*(from|import)\s", code):
                code = bare.sub(new_name, code)
            lines.append(code + hash_ + comment)
        new = "".join(lines)
    for message in messages:
        new = new.replace(message, message.replace(name, new_name))
    first_import = re.search(r"^(import|from) (?!__future__).*$", new, flags=re.MULTILINE)
    at = first_import.start()
    new = new[:at] + f"from skfedmm import {new_name}\n" + new[at:]
    return new, n


def swapped_test_names(text, new_name):
    """Names of the module's test functions (with their decorators) that use our class."""
    lines = text.splitlines()
    names = []
    used = re.compile(rf"(?<![\w.]){new_name}\b")
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            if used.search("\n".join(lines[first - 1 : node.end_lineno])):
                names.append(node.name)
    return names


def run_swapped(tmp_path, text, names, deselected, module_name):
    """Run the tests ``names`` of the swapped module ``text`` in a fresh pytest.

    ``deselected`` maps fnmatch patterns of test ids (``name[params]``) to
    the reason they cannot pass. Returns the counts of the summary line
    (``passed``, ``deselected``, ...) and the output.
    """
    module = tmp_path / module_name
    module.write_text(text)
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "deselected.json").write_text(json.dumps(sorted(deselected)))
    env = dict(os.environ)
    # the skfedmm this session imports, installed or not
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(skfedmm.__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
    )
    env.setdefault("SKLEARN_RUN_FLOAT32_TESTS", "1")
    # scikit-learn's k-means (run inside our initializations) spins OpenMP threads,
    # which costs ten times more than one thread on tiny data when the machine is busy
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
        "-o", "addopts=", "-W", "ignore::pytest.PytestUnknownMarkWarning", "--rootdir",
        str(tmp_path), "-rfEs", *[f"{module}::{name}" for name in names],
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    out = proc.stdout + proc.stderr
    counts = {
        word: int(n)
        for n, word in re.findall(r"(\d+) (passed|failed|errors?|deselected|skipped|xfailed)", out)
    }
    return proc.returncode, counts, out


def check_run(returncode, counts, out):
    """Assert a swapped run passed: everything selected ran and passed."""
    assert returncode == 0, out[-8000:]
    assert counts.get("passed", 0) > 0, out[-2000:]
    assert not any(counts.get(k) for k in ("failed", "error", "errors")), out[-4000:]
    # scikit-learn skips a few cases by its own rules (e.g. a missing optional
    # dependency); those are reported, never ours
    return counts


def matching(patterns, test_id):
    """The patterns of ``patterns`` that match ``test_id`` (for the self-tests)."""
    return [p for p in patterns if fnmatch.fnmatchcase(test_id, p)]
