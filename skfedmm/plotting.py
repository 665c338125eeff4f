"""Plots of FedMM training histories (matplotlib is an optional dependency)."""

from collections.abc import Mapping

import numpy as np

__all__ = ["plot_history"]

_INSTALL_HINT = 'plot_history needs matplotlib: pip install "skfedmm[plot]"'

#: Axis labels of the history fields.
_METRIC_LABELS = {
    "objective": "objective (active clients' mean loss)",
    "full_objective": r"objective $W(\theta_t)$ (all rows)",
    "mean_field": r"mean field $\|H_t\|_1$",
    "param_change": r"$\|\theta_{t+1} - \theta_t\|_2$",
    "stat_change": r"$\|\hat S_{t+1} - \hat S_t\|_2$",
    "step_size": r"step size $\gamma_t$",
    "bits_up": "bits sent up in the round",
    "bits_down": "bits sent down in the round",
    "n_active": "active clients",
    "time": "wall time (s)",
}

_X_LABELS = {
    "round": "round",
    "bits": "bits sent, cumulative (up + down)",
    "bits_up": "bits sent by the clients, cumulative",
}

#: Values spanning more than this ratio get a log axis with ``log="auto"``.
_DECADES_RATIO = 100.0


def _import_pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return plt


def _as_history(obj):
    """A mapping name -> array from an estimator, a History or a dict."""
    if hasattr(obj, "history_"):
        obj = obj.history_
    elif hasattr(obj, "get_params"):
        from sklearn.exceptions import NotFittedError

        raise NotFittedError(
            f"This {type(obj).__name__} instance is not fitted yet: it has no history_ to plot."
        )
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(
        "plot_history takes fitted estimators, History objects or dicts of arrays (or a "
        f"list or dict of them), got {type(obj).__name__}."
    )


def _default_labels(items):
    """Labels for ungrouped curves: the estimator parameters that differ."""
    estimators = [it for it in items if hasattr(it, "get_params")]
    if len(estimators) == len(items) and len(items) > 1:
        params = [est.get_params(deep=False) for est in estimators]
        differ = [
            name for name in params[0]
            if any(name not in p or not _same(p[name], params[0][name]) for p in params[1:])
        ]
        if differ and len({type(e) for e in estimators}) == 1:
            return [", ".join(f"{k}={p.get(k)!r}" for k in differ) for p in params]
        return [type(e).__name__ + (f" {i}" if len(items) > 1 else "") for i, e in enumerate(estimators)]
    if len(items) == 1:
        return [type(items[0]).__name__ if hasattr(items[0], "get_params") else "history"]
    return [f"run {i}" for i in range(len(items))]


def _same(a, b):
    try:
        return bool(np.all(a == b)) if not isinstance(a, np.ndarray) else np.array_equal(a, b)
    except Exception:  # noqa: BLE001 - incomparable parameters differ
        return a is b


def _groups(data, labels):
    """[(label, [history, ...]), ...] from the accepted input forms."""
    if isinstance(data, Mapping) and not ("objective" in data and "bits_up" in data):
        names = list(data)
        runs = [list(v) if isinstance(v, (list, tuple)) else [v] for v in data.values()]
    else:
        items = list(data) if isinstance(data, (list, tuple)) else [data]
        names = _default_labels(items)
        runs = [[it] for it in items]
    if not runs:
        raise ValueError("Nothing to plot: give at least one fitted estimator or History.")
    if any(len(r) == 0 for r in runs):
        raise ValueError("Every group of runs must hold at least one run.")
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(runs):
            raise ValueError(f"labels has {len(labels)} entries for {len(runs)} curves.")
        names = [str(label) for label in labels]
    return [(name, [_as_history(r) for r in group]) for name, group in zip(names, runs)]


def _x_values(history, x):
    n = len(np.asarray(history["objective"]))
    if x == "round":
        return np.arange(n, dtype=float)
    bits = np.nan_to_num(np.asarray(history["bits_up"], dtype=float))
    if x == "bits":
        bits = bits + np.nan_to_num(np.asarray(history["bits_down"], dtype=float))
    return np.cumsum(bits)


def _stack(arrays):
    """Rows padded with NaN to the longest run (fits may stop early)."""
    n = max(len(a) for a in arrays)
    out = np.full((len(arrays), n), np.nan)
    for k, a in enumerate(arrays):
        out[k, : len(a)] = a
    return out


def _summary(xs, ys, log):
    """(x, centre, lower, upper) over runs (rows), NaN where absent.

    Arithmetic mean +/- std; on a log axis the same in log10 space
    (geometric mean, multiplicative band), ignoring nonpositive values.
    """
    with np.errstate(all="ignore"), _quiet():
        x_mean = np.nanmean(xs, axis=0)
        if log:
            ys = np.log10(np.where(ys > 0, ys, np.nan))
        y_mean = np.nanmean(ys, axis=0)
        lower = upper = None
        if ys.shape[0] > 1:
            y_std = np.nanstd(ys, axis=0)
            lower, upper = y_mean - y_std, y_mean + y_std
    if log:
        y_mean = 10.0**y_mean
        if lower is not None:
            lower, upper = 10.0**lower, 10.0**upper
    return x_mean, y_mean, lower, upper


class _quiet:
    """Silence 'Mean of empty slice' warnings (rounds no run reported)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _use_log(values, log, metric):
    if isinstance(log, Mapping):
        log = log.get(metric, "auto")
    if log != "auto":
        return bool(log)
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size < 2:
        return False
    return bool(positive.max() / positive.min() > _DECADES_RATIO)


def plot_history(
    estimators_or_histories,
    *,
    x="round",
    metrics=("objective", "param_change", "stat_change"),
    labels=None,
    ax=None,
    log="auto",
    log_x="auto",
):
    r"""Plot FedMM training curves against rounds or bits sent.

    One subplot per metric, one curve per fitted estimator (or
    :class:`~skfedmm.History`). Given several runs of one setting (a dict
    ``label -> list of runs``), the curve is their mean, a band shows
    mean :math:`\pm` one standard deviation over the runs, and the legend
    gives the number of runs. On a logarithmic axis both are taken on
    :math:`\log_{10}` of the values (the curve is the geometric mean and the
    band multiplicative), so that the band stays positive.

    The default metrics are the three curves of the "impact of aggregation
    space" study: the objective, the parameter update
    size :math:`\|\theta_{t+1} - \theta_t\|_2` and the statistic update size
    :math:`\|\hat S_{t+1} - \hat S_t\|_2`, where :math:`\theta_t` is the
    broadcast parameter and :math:`\hat S_t` the server statistic of round
    :math:`t`. Rounds where a metric is undefined (NaN: the statistic of
    parameter aggregation, rounds no client reported, objectives not
    evaluated) are skipped, so sparse metrics such as ``"full_objective"``
    with ``eval_every`` draw as connected lines.

    Parameters
    ----------
    estimators_or_histories : estimator, History, dict of arrays, list of those, or dict
        What to plot:

        - a fitted estimator (anything with a ``history_`` attribute), a
          :class:`~skfedmm.History` or a dict of arrays such as
          ``History.as_dict()``: one curve;
        - a list or tuple of those: one curve each;
        - a dict ``label -> run or list of runs``: one curve per key, the
          mean over its runs, with a shaded mean :math:`\pm` std band when
          it holds several runs.
    x : {"round", "bits", "bits_up"}, default="round"
        Horizontal axis: the round index (row 0 is the initialization); the
        cumulative number of bits sent up and down at the end of each round;
        or only those the clients sent (what compression reduces: the
        server's broadcasts are not compressed). Bits are averaged over the
        runs of a group, which may differ under partial participation or
        random sparsification.
    metrics : sequence of str, default=("objective", "param_change", "stat_change")
        History fields to plot, one subplot each: any of ``"objective"``,
        ``"full_objective"``, ``"mean_field"``, ``"param_change"``,
        ``"stat_change"``, ``"step_size"``, ``"bits_up"``, ``"bits_down"``,
        ``"n_active"``, ``"time"``.
    labels : sequence of str, default=None
        Legend labels, one per curve. By default: the dict keys; for a list
        of estimators of one class, the parameters that differ between them;
        otherwise ``"run 0"``, ``"run 1"``...
    ax : matplotlib Axes or sequence of Axes, default=None
        Axes to draw on, one per metric; a new figure when None.
    log : "auto", bool or dict, default="auto"
        Logarithmic vertical axes: ``"auto"`` uses one for a metric whose
        positive values span more than two decades; a bool applies to every
        metric; a dict maps metric names to ``"auto"`` or a bool.
    log_x : "auto" or bool, default="auto"
        Logarithmic horizontal axis. ``"auto"``: only for a bits axis,
        when the total bits of the curves differ by more than a factor 10
        (for example compressed against uncompressed runs).

    Returns
    -------
    fig : matplotlib.figure.Figure
    axes : ndarray of matplotlib.axes.Axes of shape (len(metrics),)

    Raises
    ------
    ImportError
        When matplotlib is not installed (``pip install "skfedmm[plot]"``).

    See Also
    --------
    skfedmm.History : The per-round record being plotted.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skfedmm import FederatedDictionaryLearning, plot_history
    >>> from skfedmm.datasets import make_sparse_coded_clients
    >>> clients, _ = make_sparse_coded_clients(4, 60, 10, 8, atoms_per_client=4,
    ...                                        random_state=0)
    >>> fits = {
    ...     agg: FederatedDictionaryLearning(n_components=8, alpha=0.2, max_iter=5,
    ...                                      aggregation=agg, tol=0,
    ...                                      random_state=0).fit(clients)
    ...     for agg in ("surrogate", "parameter")
    ... }
    >>> fig, axes = plot_history(fits, x="round")
    >>> [a.get_xlabel() for a in axes]
    ['round', 'round', 'round']
    """
    plt = _import_pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    if x not in _X_LABELS:
        raise ValueError(f"x must be 'round', 'bits' or 'bits_up', got {x!r}.")
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in _METRIC_LABELS]
    if unknown or not metrics:
        raise ValueError(
            f"Unknown metrics {unknown}; choose among {sorted(_METRIC_LABELS)}."
        )
    if not (log == "auto" or isinstance(log, (bool, np.bool_, Mapping))):
        raise ValueError(f"log must be 'auto', a bool or a dict, got {log!r}.")
    groups = _groups(estimators_or_histories, labels)

    if ax is None:
        fig, axes = plt.subplots(
            1, len(metrics), figsize=(4.4 * len(metrics), 3.6), layout="constrained", squeeze=False
        )
        axes = axes.ravel()
    else:
        axes = np.ravel(np.asarray(ax, dtype=object))
        if len(axes) != len(metrics):
            raise ValueError(f"ax holds {len(axes)} Axes for {len(metrics)} metrics.")
        fig = axes[0].figure

    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    handles = [
        Line2D([], [], color=colors[k % len(colors)],
               label=f"{name} ({len(runs)} runs)" if len(runs) > 1 else name)
        for k, (name, runs) in enumerate(groups)
    ]
    xs = [_stack([_x_values(h, x) for h in runs]) for _, runs in groups]
    finals = [float(np.nanmean(v[:, -1])) for v in xs]
    for metric, a in zip(metrics, axes):
        ys = [_stack([np.asarray(h[metric], dtype=float) for h in runs]) for _, runs in groups]
        use_log = _use_log(np.concatenate([y.ravel() for y in ys]), log, metric)
        for k, ((name, runs), x_k, y_k) in enumerate(zip(groups, xs, ys)):
            color = colors[k % len(colors)]
            x_mean, centre, lower, upper = _summary(x_k, y_k, use_log)
            keep = np.isfinite(x_mean) & np.isfinite(centre)
            if not keep.any():
                continue
            a.plot(x_mean[keep], centre[keep], color=color, lw=1.6,
                   marker="o" if keep.sum() <= 12 else None, ms=3, label=name)
            if lower is not None:
                a.fill_between(x_mean[keep], lower[keep], upper[keep], color=color, alpha=0.2, lw=0)
        if use_log:
            a.set_yscale("log")
        a.set_ylabel(_METRIC_LABELS[metric])
        a.set_xlabel(_X_LABELS[x])
        a.grid(True, which="major", alpha=0.3)
        if x != "round":
            if log_x == "auto":
                positive = np.asarray([f for f in finals if f > 0])
                use = positive.size > 1 and positive.max() / positive.min() > 10
            else:
                use = bool(log_x)
            if use:
                a.set_xscale("log")
                # bits span one or two decades: label the decades only
                a.xaxis.set_minor_formatter(NullFormatter())
    axes[0].legend(handles=handles, fontsize="small", framealpha=0.8)
    return fig, np.asarray(list(axes), dtype=object)
