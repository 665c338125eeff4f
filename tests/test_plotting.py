"""plot_history: curves, labels, log scales, shading, the optional import."""

import builtins

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from skfedmm import FederatedDictionaryLearning, History, plot_history  # noqa: E402
from skfedmm.datasets import make_sparse_coded_clients  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def make_history(n_rounds=8, start=1.0, rate=0.3, surrogate=True, bits=1000, seed=0):
    """A synthetic History: geometric decay over several decades."""
    rng = np.random.default_rng(seed)
    h = History()
    for t in range(n_rounds + 1):
        h._append(
            objective=start * (1 + rate ** (t + 1)) + 0.01 * rng.random(),
            param_change=rate ** t,
            stat_change=rate ** (t + 1) if surrogate and t > 0 else np.nan,
            bits_up=bits * (1 + rng.integers(3)),
            bits_down=bits,
            n_active=4,
            time=0.1 * t,
        )
    return h


@pytest.fixture(scope="module")
def fitted():
    clients, _ = make_sparse_coded_clients(
        4, 40, 8, 6, atoms_per_client=3, random_state=0
    )
    return {
        agg: FederatedDictionaryLearning(
            n_components=6, alpha=0.2, max_iter=4, tol=0, aggregation=agg, random_state=0
        ).fit(clients)
        for agg in ("surrogate", "parameter")
    }


def lines(ax):
    return [line for line in ax.get_lines() if len(line.get_xdata())]


def test_plot_history_curves_per_metric(fitted):
    fig, axes = plot_history([fitted["surrogate"], fitted["parameter"]])
    assert len(axes) == 3
    assert fig is axes[0].figure
    # both aggregations have an objective and a parameter change; only the
    # surrogate one has a statistic
    assert [len(lines(a)) for a in axes] == [2, 2, 1]
    texts = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert texts == ["aggregation='surrogate'", "aggregation='parameter'"]


def test_plot_history_axes_labels():
    fig, axes = plot_history(make_history(), metrics=("objective", "param_change", "stat_change"))
    assert [a.get_xlabel() for a in axes] == ["round"] * 3
    ylabels = [a.get_ylabel() for a in axes]
    assert "objective" in ylabels[0]
    assert "theta" in ylabels[1]
    assert "S" in ylabels[2]
    _, axes = plot_history(make_history(), x="bits")
    assert all("bits" in a.get_xlabel() for a in axes)


def test_plot_history_log_scale():
    h = make_history(n_rounds=10, rate=0.2)  # param_change spans 7 decades
    _, axes = plot_history(h, metrics=("objective", "param_change"))
    assert axes[0].get_yscale() == "linear"
    assert axes[1].get_yscale() == "log"
    _, axes = plot_history(h, metrics=("objective", "param_change"), log=False)
    assert [a.get_yscale() for a in axes] == ["linear", "linear"]
    _, axes = plot_history(h, metrics=("objective", "param_change"), log=True)
    assert [a.get_yscale() for a in axes] == ["log", "log"]
    _, axes = plot_history(h, metrics=("objective", "param_change"), log={"param_change": False})
    assert [a.get_yscale() for a in axes] == ["linear", "linear"]


def test_plot_history_shading_for_several_runs():
    runs = {
        "surrogate": [make_history(seed=s) for s in range(3)],
        "parameter": [make_history(surrogate=False, seed=s) for s in range(3)],
        "single": make_history(seed=9),
    }
    _, axes = plot_history(runs, metrics=("objective", "stat_change"))
    bands = [c for c in axes[0].collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # the two groups of several runs, not the single run
    assert len(lines(axes[0])) == 3
    # the centre line is the mean over runs
    objective = np.mean([h["objective"] for h in runs["surrogate"]], axis=0)
    np.testing.assert_allclose(lines(axes[0])[0].get_ydata(), objective)
    # parameter runs have no statistic: one line and one band on that axis
    assert len(lines(axes[1])) == 2
    texts = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert texts[0] == "surrogate (3 runs)"
    assert texts[2] == "single"


def test_plot_history_bits_axis_is_cumulative_and_monotone():
    h = make_history(bits=500)
    _, axes = plot_history(h, x="bits", metrics=("objective",))
    (line,) = lines(axes[0])
    xs = np.asarray(line.get_xdata())
    assert np.all(np.diff(xs) > 0)
    np.testing.assert_allclose(xs, np.cumsum(h["bits_up"] + h["bits_down"]))


def test_plot_history_bits_axis_on_fitted_estimators(fitted):
    _, axes = plot_history(fitted, x="bits", metrics=("objective",))
    for line in lines(axes[0]):
        assert np.all(np.diff(np.asarray(line.get_xdata())) >= 0)
    est = fitted["surrogate"]
    np.testing.assert_allclose(lines(axes[0])[0].get_xdata()[-1], est.bits_up_ + est.bits_down_)


def test_plot_history_skips_unevaluated_rounds():
    h = make_history()
    h.full_objective = [1.0 if t % 3 == 0 else np.nan for t in range(len(h))]
    _, axes = plot_history(h, metrics=("full_objective",))
    (line,) = lines(axes[0])
    np.testing.assert_array_equal(line.get_xdata(), [0, 3, 6])


def test_plot_history_on_given_axes_and_labels():
    fig, ax = plt.subplots()
    out_fig, axes = plot_history(
        [make_history(), make_history(seed=1)], metrics=("objective",), ax=ax, labels=["a", "b"]
    )
    assert out_fig is fig and axes[0] is ax
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(metrics=("objectiv",)), "Unknown metrics"),
        (dict(x="seconds"), "x must be"),
        (dict(labels=["a", "b"]), "labels has 2"),
    ],
)
def test_plot_history_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_history(make_history(), **kwargs)


def test_plot_history_unfitted_estimator():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError, match="not fitted"):
        plot_history(FederatedDictionaryLearning())


def test_plot_history_without_matplotlib(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r'pip install "skfedmm\[plot\]"'):
        plot_history(make_history())


def test_plot_history_log_axis_band_is_geometric_and_positive():
    runs = [make_history(n_rounds=10, rate=r) for r in (0.1, 0.2, 0.4)]
    _, axes = plot_history({"runs": runs}, metrics=("param_change",))
    assert axes[0].get_yscale() == "log"
    (line,) = lines(axes[0])
    logs = np.log10([h["param_change"] for h in runs])
    np.testing.assert_allclose(line.get_ydata(), 10 ** logs.mean(axis=0))
    (band,) = [c for c in axes[0].collections if isinstance(c, PolyCollection)]
    assert np.all(band.get_paths()[0].vertices[:, 1] > 0)
