"""Federated synthetic data and splits of real data sets into clients."""

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["make_sparse_coded_clients", "atom_recovery", "split_by_labels"]


def make_sparse_coded_clients(
    n_clients=10,
    n_samples=500,
    n_features=40,
    n_components=30,
    *,
    atoms_per_client=8,
    n_nonzero=3,
    noise=0.05,
    heterogeneous=True,
    random_state=None,
):
    r"""Clients whose rows are sparse combinations of a ground-truth dictionary.

    Each row is :math:`x = h D^\star + \sigma \varepsilon` with
    :math:`n_\text{nonzero}` Gaussian nonzeros in :math:`h`, unit-norm atoms
    :math:`D^\star` and Gaussian noise. With ``heterogeneous=True`` each
    client draws its nonzeros from its own subset of ``atoms_per_client``
    atoms (subsets cycle over the dictionary so that every atom is used by
    some client); otherwise every client uses all atoms.

    Parameters
    ----------
    n_clients : int, default=10
    n_samples : int, default=500
        Rows per client.
    n_features : int, default=40
    n_components : int, default=30
        Atoms of the ground-truth dictionary.
    atoms_per_client : int, default=8
    n_nonzero : int, default=3
        Nonzeros per row (at most the size of the client's atom pool).
    noise : float, default=0.05
    heterogeneous : bool, default=True
    random_state : int, RandomState instance or None, default=None

    Returns
    -------
    clients : list of ndarray of shape (n_samples, n_features)
    dictionary : ndarray of shape (n_components, n_features)
        The ground truth.
    """
    rng = check_random_state(random_state)
    D = rng.standard_normal((n_components, n_features))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    clients = []
    for i in range(n_clients):
        if heterogeneous:
            start = (i * atoms_per_client) % n_components
            pool = (start + np.arange(atoms_per_client)) % n_components
        else:
            pool = np.arange(n_components)
        code = np.zeros((n_samples, n_components))
        # n_nonzero distinct atoms per row from the client's pool
        nnz = min(n_nonzero, pool.size)
        picks = np.argsort(rng.random((n_samples, pool.size)), axis=1)[:, :nnz]
        rows = np.repeat(np.arange(n_samples), nnz)
        code[rows, pool[picks.ravel()]] = rng.standard_normal(n_samples * nnz)
        clients.append(code @ D + noise * rng.standard_normal((n_samples, n_features)))
    return clients, D


def atom_recovery(true_dictionary, dictionary, threshold=0.95):
    """Fraction of ground-truth atoms recovered by a learned dictionary.

    An atom counts as recovered when some learned atom has an absolute
    cosine similarity above ``threshold`` with it.

    Parameters
    ----------
    true_dictionary : ndarray of shape (k_true, n_features)
    dictionary : ndarray of shape (k, n_features)
    threshold : float, default=0.95

    Returns
    -------
    fraction : float
    """
    T = true_dictionary / np.linalg.norm(true_dictionary, axis=1, keepdims=True)
    norms = np.linalg.norm(dictionary, axis=1, keepdims=True)
    L = dictionary / np.where(norms > 0, norms, 1)
    return float(np.mean(np.abs(T @ L.T).max(axis=1) > threshold))


def split_by_labels(X, labels):
    """One client per distinct label (in sorted label order).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    labels : array-like of shape (n_samples,)

    Returns
    -------
    clients : list of ndarray
    """
    labels = np.asarray(labels)
    return [X[labels == value] for value in np.unique(labels)]
