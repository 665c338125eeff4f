"""Every gallery example runs (quick sizes, Agg backend), so none silently breaks."""

import glob
import os
import runpy

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EXAMPLES = sorted(
    glob.glob(os.path.join(os.path.dirname(__file__), os.pardir, "examples", "plot_*.py"))
)


def test_examples_found():
    assert EXAMPLES, "no examples/plot_*.py found"


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_runs(path, monkeypatch, tmp_path):
    monkeypatch.setenv("SKFEDMM_QUICK", "1")
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)
    monkeypatch.chdir(tmp_path)  # a file an example saves lands in a temporary directory
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        plt.close("all")
