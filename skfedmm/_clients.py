"""Client input handling, shared by every estimator.

A federated ``fit`` accepts either a list of 2-D arrays (one per client) or
one 2-D array, split into clients by ``client_ids`` (one label per row; one
client when omitted). This module validates both forms once, with errors
that name the problem and the client.
"""

import numpy as np
import scipy.sparse as sp
from sklearn.utils.validation import check_array, validate_data

from .federation.transport import RemoteClients

__all__ = ["check_clients", "check_sample_weight", "check_transform_input", "is_client_list"]


def _is_2d_like(obj):
    if sp.issparse(obj):
        return True
    shape = getattr(obj, "shape", None)
    if shape is not None:
        return len(shape) == 2
    if isinstance(obj, (list, tuple)):
        return len(obj) == 0 or isinstance(obj[0], (list, tuple, np.ndarray))
    return False


def is_client_list(X):
    """Whether ``X`` is a list of client datasets rather than one dataset.

    A list or tuple whose first element is itself 2-D (an array, a
    DataFrame, a sparse matrix or a list of rows) is a list of clients; a
    list of rows (numbers or 1-D sequences) is one dataset.
    """
    return isinstance(X, (list, tuple)) and len(X) > 0 and _is_2d_like(X[0])


def check_clients(estimator, X, client_ids=None, *, dtype=(np.float64, np.float32), reset=True):
    """Validate federated training input and return one array per client.

    Sets ``estimator.n_features_in_`` (and ``feature_names_in_`` when the
    clients are DataFrames with string column names), exactly as
    :func:`sklearn.utils.validation.validate_data` does for one array.

    Parameters
    ----------
    estimator : BaseEstimator
        The estimator being fitted.
    X : list of array-like of shape (n_i, n_features), or array-like of shape (n_samples, n_features)
        The clients' data, or all rows when ``client_ids`` splits them.
    client_ids : array-like of shape (n_samples,), default=None
        The client of each row of a single array ``X``.
    dtype : dtype or tuple of dtypes
        Accepted dtypes, as for :func:`~sklearn.utils.check_array`. The
        clients are converted to one common dtype (the first client's).
    reset : bool, default=True
        Set ``n_features_in_`` and ``feature_names_in_`` (a new fit), or
        check the input against them (continued training).

    Returns
    -------
    clients : list of ndarray of shape (n_i, n_features)
        C-contiguous arrays of one floating dtype; never views that the
        library writes to.
    labels : ndarray or None
        The sorted distinct client labels when ``client_ids`` was given.

    Raises
    ------
    ValueError
        Empty clients, NaN or infinite values, clients with different
        numbers of features or columns, ``client_ids`` of the wrong length.
    TypeError
        Non-numeric data, sparse matrices, wrong container types.
    """
    if isinstance(X, RemoteClients):
        # clients behind a transport: their rows stay with them; check the
        # number of features they reported
        if client_ids is not None:
            raise ValueError("client_ids is only for one array X, not for remote clients.")
        n_features = X[0].shape[1]
        if reset:
            estimator.n_features_in_ = n_features
            if hasattr(estimator, "feature_names_in_"):
                del estimator.feature_names_in_
        elif n_features != estimator.n_features_in_:
            raise ValueError(
                f"X has {n_features} features, but {type(estimator).__name__} is expecting "
                f"{estimator.n_features_in_} features as input."
            )
        return X, None
    if is_client_list(X):
        if client_ids is not None:
            raise ValueError(
                "client_ids is only for one array X; X is already a list of clients."
            )
        clients = []
        for i, Xi in enumerate(X):
            where = f"client {i}"
            if not _is_2d_like(Xi):
                raise ValueError(
                    f"{where}: expected a 2-D array (rows x features), got "
                    f"{type(Xi).__name__} of shape {np.shape(Xi)}."
                )
            try:
                # (a value too large for the dtype becomes inf in the cast,
                # which validation then names: no numpy warning per value)
                with np.errstate(over="ignore", invalid="ignore"):
                    Xi = validate_data(
                        estimator, Xi, reset=reset and i == 0,
                        dtype=dtype if i == 0 else clients[0].dtype,
                    )
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{where}: {exc}") from exc
            if Xi.shape[0] == 0:
                raise ValueError(f"{where}: is empty (0 rows); every client needs at least one row.")
            clients.append(np.ascontiguousarray(Xi))
        return clients, None

    if isinstance(X, (list, tuple)) and len(X) == 0:
        raise ValueError("X is an empty list: at least one client is needed.")
    X = validate_data(estimator, X, dtype=dtype, reset=reset)
    if client_ids is None:
        return [np.ascontiguousarray(X)], None
    ids = np.asarray(client_ids)
    if ids.ndim != 1 or ids.shape[0] != X.shape[0]:
        raise ValueError(
            f"client_ids must have one label per row of X: got shape {ids.shape} "
            f"for X with {X.shape[0]} rows."
        )
    clients, labels = _split_by_ids(X, ids)
    return clients, labels


def _split_by_ids(X, ids):
    """Rows of ``X`` grouped by client label (labels sorted, rows in order)."""
    try:
        labels, inverse = np.unique(ids, return_inverse=True)
    except TypeError as exc:
        raise TypeError(f"client_ids must be sortable labels: {exc}") from exc
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(labels) + 1))
    if np.array_equal(order, np.arange(len(order))) and X.flags.c_contiguous:
        # rows already grouped by sorted label: views, no copy of the data
        return [X[bounds[k] : bounds[k + 1]] for k in range(len(labels))], labels
    parts = [
        np.ascontiguousarray(X[order[bounds[k] : bounds[k + 1]]]) for k in range(len(labels))
    ]
    return parts, labels


def check_per_client_rows(name, value, clients, client_ids=None, *, n_columns, dtype):
    """Per-row data aligned with the clients' rows (e.g. initial codes).

    Parameters
    ----------
    name : str
        The parameter's name, for errors.
    value : list of array-like of shape (n_i, n_columns), or array-like of shape (n_samples, n_columns)
        One array per client (when the clients were given as a list), or
        one array aligned with ``X`` (split like ``X`` by ``client_ids``).
    clients : list of ndarray
        The validated clients.
    client_ids : array-like of shape (n_samples,), default=None
    n_columns : int
    dtype : dtype

    Returns
    -------
    parts : list of ndarray of shape (n_i, n_columns)
        Copies, one per client.
    """
    if is_client_list(value):
        if len(value) != len(clients):
            raise ValueError(
                f"{name} has {len(value)} arrays for {len(clients)} clients; give one per client."
            )
        raw = list(value)
    else:
        try:
            whole = check_array(value, dtype=dtype, input_name=name)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{name}: {exc}") from exc
        n = sum(X.shape[0] for X in clients)
        if whole.shape[0] != n:
            raise ValueError(f"{name} has {whole.shape[0]} rows; X has {n}.")
        raw = [whole] if client_ids is None else _split_by_ids(whole, np.asarray(client_ids))[0]
    parts = []
    for i, (part, X) in enumerate(zip(raw, clients)):
        try:
            part = check_array(part, dtype=dtype, input_name=name, copy=True)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"client {i}: {name}: {exc}") from exc
        if part.shape != (X.shape[0], n_columns):
            raise ValueError(
                f"client {i}: {name} has shape {part.shape}; expected {(X.shape[0], n_columns)} "
                "(one row per row of the client, one column per component)."
            )
        parts.append(part)
    return parts


def check_transform_input(estimator, X, **kwargs):
    """Validate prediction-time input (one array) against the fitted features."""
    return validate_data(estimator, X, reset=False, **kwargs)


def check_sample_weight(sample_weight, n_samples):
    """Validate row weights: finite, nonnegative, one per row, not all zero."""
    w = check_array(sample_weight, ensure_2d=False, dtype=np.float64, input_name="sample_weight")
    if w.shape != (n_samples,):
        raise ValueError(f"sample_weight has shape {w.shape}; expected ({n_samples},).")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("sample_weight must be nonnegative and not all zero.")
    return w
