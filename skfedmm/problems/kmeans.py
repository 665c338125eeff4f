r"""k-means as an MM problem: Lloyd's algorithm.

.. math::

    \min_{c_1, \dots, c_k} \; \sum_i w_i \frac{1}{n_i} \sum_{x \in X_i}
    \min_{j} \|x - c_j\|_2^2,

where:

- :math:`c_j` (a row of the ``k x d`` parameter) is the centre of cluster
  :math:`j`;
- :math:`X_i` holds the :math:`n_i` rows of client :math:`i`, :math:`w_i`
  is its weight.

Fixing each row's nearest centre :math:`j(x) = \arg\min_j \|x - c_j\|^2` at
the current centres :math:`\tau` gives a majorizer,
:math:`\min_j \|x - c_j\|^2 \le \|x - c_{j(x)}\|^2`, with equality at
:math:`c = \tau`, and it is linear in the statistic

.. math::

    S(x; \tau) = \big(\mathbb 1[j(x) = j],\; \mathbb 1[j(x) = j]\, x,\;
    \mathbb 1[j(x) = j]\, \|x\|^2\big)_{j = 1..k},

(per-cluster mass, sum and sum of squared norms; computed in standardized
coordinates, see :meth:`KMeansProblem.prepare`), whose M-step
:math:`T(s)_j = s^{(1)}_j / s^{(0)}_j` is the cluster mean: batch MM is
Lloyd's algorithm exactly. The squared norms do not enter :math:`T`; they
give the server each cluster's within-cluster sum of squares
:math:`s^{(2)}_j - \|s^{(1)}_j\|^2 / s^{(0)}_j`, which the empty-cluster
rule uses.

Empty clusters. scikit-learn moves an empty cluster's centre onto the rows
farthest from their centres; the server here never sees a row. Instead, an
empty cluster (:math:`s^{(0)}_j = 0`) is re-seeded next to the cluster with
the largest within-cluster sum of squares (computed from the aggregated
statistic alone): at that cluster's centre plus a random direction, drawn
from the server's seeded M-step stream, scaled by the cluster's
root-mean-square radius. Several empty clusters take the next largest
donors. Such a round does not count as converged
(:meth:`KMeansProblem.restarted`).

Initialization without rows (``init="k-means++"``): each client runs
k-means++ and a few Lloyd steps on its own rows and sends its local centres
with their masses (one-shot federated clustering); the server runs weighted
k-means (k-means++ seeding and Lloyd) on the pooled centres.
``doc/what_leaves_a_client.md`` lists what each choice sends.

References
----------
.. [1] S. Lloyd. Least squares quantization in PCM. IEEE Trans. Inf. Theory
   28(2), 1982.
.. [2] D. Dennis, T. Li, V. Smith. Heterogeneity for the win: one-shot
   federated clustering. ICML 2021.
"""

import copy
import warnings
import zlib

import numpy as np
from scipy.optimize import linear_sum_assignment

from .base import MMProblem

__all__ = ["KMeansProblem", "assign_clusters", "local_kmeans_summary", "pooled_kmeans"]


def assign_clusters(X, centres):
    r"""Nearest centre of every row and the squared distance to it.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    centres : ndarray of shape (n_clusters, n_features)

    Returns
    -------
    labels : ndarray of int of shape (n_samples,)
    sq_dist : ndarray of shape (n_samples,)
        :math:`\|x - c_{j(x)}\|^2 = \|x\|^2 - 2 x \cdot c_{j(x)} +
        \|c_{j(x)}\|^2` from one matrix product (clipped at 0).
    """
    centres = np.asarray(centres, dtype=X.dtype)
    labels = _labels(X, centres)
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2 at the row's own centre
    n = X.shape[0]
    scores = X @ (-2.0 * centres).T
    sq = np.take(scores, labels + np.arange(n) * centres.shape[0])
    sq += np.einsum("ij,ij->i", X, X)
    sq += np.take(np.einsum("ij,ij->i", centres, centres), labels)
    return labels, np.maximum(sq, 0, out=sq)


def _nearest(X, centres):
    r"""Labels and the scores :math:`\|c\|^2 - 2 x \cdot c` they minimize."""
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the row term does not change the argmin
    scores = X @ (-2.0 * centres).T
    scores += np.einsum("ij,ij->i", centres, centres)
    return np.argmin(scores, axis=1), scores


def _lloyd_pass(X, centres):
    """Labels, per-cluster counts and sums of the rows at ``centres``.

    scikit-learn's compiled Lloyd kernel (``lloyd_iter_chunked_dense``, one
    thread: the engine parallelizes over clients) when it is available,
    which assigns and accumulates in one pass over the rows; it re-seeds a
    cluster that gets no row of ``X`` from ``X``'s rows, so a pass where a
    cluster is empty recomputes the sums from the labels instead (a client
    often sees only some of the clusters). NumPy otherwise.
    """
    k = centres.shape[0]
    if _compiled(X):
        dtype = X.dtype
        centres_old = np.ascontiguousarray(centres, dtype=dtype)
        centres_new = np.zeros_like(centres_old)
        weight = np.zeros(k, dtype=dtype)
        labels = np.full(X.shape[0], -1, dtype=np.int32)
        shift = np.zeros(k, dtype=dtype)
        _LLOYD(X, np.ones(X.shape[0], dtype=dtype), centres_old, centres_new, weight, labels,
               shift, 1)
        count = np.bincount(labels, minlength=k).astype(dtype)
        if np.all(count > 0):
            return labels, count, centres_new * count[:, None]
        return labels, count, _cluster_sums(X, labels, k)
    labels, _ = _nearest(X, centres)
    return labels, np.bincount(labels, minlength=k).astype(X.dtype), _cluster_sums(X, labels, k)


def _compiled(X):
    """Whether scikit-learn's compiled Lloyd step can take ``X``."""
    return _LLOYD is not None and X.dtype in (np.float32, np.float64) and X.flags.c_contiguous


def _labels(X, centres):
    """Nearest centre of every row: scikit-learn's compiled Lloyd step without
    the update (one thread) when it is available, NumPy otherwise."""
    if _compiled(X):
        labels = np.full(X.shape[0], -1, dtype=np.int32)
        _LLOYD(X, np.ones(X.shape[0], dtype=X.dtype), np.ascontiguousarray(centres, dtype=X.dtype),
               None, None, labels, np.zeros(centres.shape[0], dtype=X.dtype), 1, update_centers=False)
        return labels.astype(np.intp)
    return _nearest(X, centres)[0]


def _nearest_two(X, x_sq, centres, labels=None, hint=None):
    r"""Nearest centre of every row, the distance to it and to the next nearest.

    Distances from one matrix product, :math:`\|x - c\|^2 = \|x\|^2 - 2 x
    \cdot c + \|c\|^2` (clipped at 0), laid out ``(k, n)`` so that the
    reductions run over contiguous rows. Labels: ``labels`` when given (a
    row whose computed distances put another centre nearer, a near tie,
    then gets a second distance below the first); else the first nearest
    centre by these distances, found from ``hint`` (each row's previous
    centre: kept where it is strictly nearer than every other, the argmin
    computed for the other rows only); else from :func:`_labels`.
    """
    k, n = centres.shape[0], X.shape[0]
    if labels is None and hint is None:
        labels = _labels(X, centres)
    d2 = (-2.0 * centres) @ X.T
    d2 += np.einsum("ij,ij->i", centres, centres)[:, None]
    given = hint if labels is None else labels
    flat = given * n
    flat += np.arange(n)
    first = np.take(d2, flat)
    if k > 1:
        np.put(d2, flat, np.inf)
        second = d2.min(axis=0)
        if labels is None:
            labels = hint
            # rows whose previous centre is not strictly the nearest any more
            redo = np.flatnonzero(second <= first)
            if redo.size:
                np.put(d2, flat[redo], first[redo])
                sub = d2[:, redo]
                cols = np.arange(redo.size)
                new = np.argmin(sub, axis=0)  # (the first nearest, as argmin)
                labels = hint.copy()
                labels[redo] = new
                first[redo] = sub[new, cols]
                sub[new, cols] = np.inf
                second[redo] = sub.min(axis=0)
        second += x_sq
        np.maximum(second, 0, out=second)
        np.sqrt(second, out=second)
    else:
        labels = given
        # (one cluster: no other centre; a finite bound keeps the memory finite)
        second = np.full(n, np.finfo(d2.dtype).max, dtype=d2.dtype)
    first += x_sq
    np.maximum(first, 0, out=first)
    return labels, np.sqrt(first, out=first), second


_CHUNK = 8192


def _bounds_memory(X, x_sq, centres, labels):
    r"""The bounds of every row at ``centres`` (after a full pass gave ``labels``).

    A row's key is :math:`\ell_i - u_i`, its lower bound on the distance to
    the other centres minus its distance to its own (the cumulative moves
    start at 0). A near tie that the full pass labelled otherwise gets a
    negative key (its distances are computed next round).
    """
    n = X.shape[0]
    upper, lower = np.empty(n, dtype=X.dtype), np.empty(n)
    for start in range(0, n, _CHUNK):  # (in chunks: small temporaries)
        part = slice(start, min(start + _CHUNK, n))
        _, upper[part], lower[part] = _nearest_two(X[part], x_sq[part], centres, labels[part])
    return dict(lower=lower, keys=lower - upper, drift=np.zeros(centres.shape[0]),
                total=np.zeros(1))


def _bounded_pass(X, centres, memory):
    r"""Labels and per-cluster sums at ``centres`` from the remembered ones.

    Hamerly's bounds: each row remembers an upper bound :math:`u_i` on its
    distance to its own centre and a lower bound :math:`\ell_i` on its
    distance to every other centre. When centre :math:`j` moves by
    :math:`m_j`, the upper bound of a row of cluster :math:`j` grows by
    :math:`m_j` and every lower bound falls by :math:`\max_l m_l` (triangle
    inequality). With the cumulative moves :math:`D_j = \sum m_j` and
    :math:`M = \sum \max_l m_l`, a row keeps its label while

    .. math::

        \kappa_i > D_{j(i)} + M + \text{margin}, \qquad
        \kappa_i = (\ell_i^0 + M^0) + D_{j(i)}^0 - u_i^0,

    with a key :math:`\kappa_i` fixed since the row's bounds were last
    computed (superscript 0; ``lower`` holds :math:`\ell_i^0 + M^0`): one
    comparison per row and round. The other rows (near a boundary) get
    their nearest centre and all their distances computed, which renews
    both their bounds. ``margin`` covers the rounding of distances computed
    from one matrix product and of the cumulative moves, so that a kept
    label is the exact nearest centre. The sums are updated by the rows
    that changed cluster.

    Returns None when more than a third of the rows are near a boundary
    (the compiled full pass is then cheaper).
    """
    n, k = X.shape[0], centres.shape[0]
    labels, x_sq = memory["labels"], memory["x_sq"]
    step = centres - memory["centres"]
    moves = np.sqrt(np.einsum("ij,ij->i", step, step)).astype(np.float64)
    drift = memory["drift"] + moves
    total = memory["total"] + moves.max()
    c_sq = np.einsum("ij,ij->i", centres, centres)
    eps = np.finfo(X.dtype).eps
    big = float(memory["x_sq_max"][0] + c_sq.max())
    # rounding of each distance (sqrt of the error of a squared distance from
    # a product), of the bounds carried over rounds and of the cumulative moves
    margin = (4 * np.sqrt(8 * eps * big) + 64 * eps * np.sqrt(big)
              + 64 * np.finfo(np.float64).eps * (float(total[0]) + float(drift.max())))
    keys = memory["keys"]
    todo = np.flatnonzero(keys <= np.take(drift + (total[0] + margin), labels))
    if todo.size > n // 3:
        return None
    own = np.take(labels, todo)
    Xt = np.take(X, todo, axis=0)
    xt_sq = np.take(x_sq, todo)
    new, upper, lower_t = _nearest_two(Xt, xt_sq, centres, hint=own)
    lower_t = lower_t.astype(np.float64) + total[0]  # (the bounds in float64)
    lower = memory["lower"].copy()
    lower[todo] = lower_t
    new_keys = lower_t + np.take(drift, new) - upper
    count, sums, sq = memory["count"], memory["sums"], memory["sq"]
    moved = np.flatnonzero(new != own)
    if moved.size:
        labels = labels.copy()
        labels[todo[moved]] = new[moved]
        old = own[moved]
        onehot = np.zeros((moved.size, k), dtype=X.dtype)
        onehot[np.arange(moved.size), new[moved]] += 1
        onehot[np.arange(moved.size), old] -= 1
        count = count + onehot.sum(axis=0)
        sums = sums + onehot.T @ Xt[moved]
        sq = sq + onehot.T @ xt_sq[moved]
    keys = keys.copy()
    keys[todo] = new_keys
    return labels, count, sums, sq, dict(lower=lower, keys=keys, drift=drift, total=total)


try:  # scikit-learn's private compiled Lloyd step (optional, for speed)
    from sklearn.cluster._k_means_lloyd import lloyd_iter_chunked_dense as _LLOYD
except ImportError:  # pragma: no cover
    _LLOYD = None


def _cluster_sums(X, labels, k, block=2**20):
    """Per-cluster sums of the rows (``k x d``): one-hot matrix products (BLAS),
    over blocks of rows whose one-hot matrix has at most ``block`` entries."""
    n = X.shape[0]
    rows = max(1, block // k)
    sums = np.zeros((k, X.shape[1]), dtype=X.dtype)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        onehot = np.zeros((stop - start, k), dtype=X.dtype)
        onehot[np.arange(stop - start), labels[start:stop]] = 1
        sums += onehot.T @ X[start:stop]
    return sums


def _client_rng(seed, X):
    """A client's initialization stream: the problem's seed and its own rows.

    ``init_statistic`` receives no generator; deriving the stream from the
    seed and a checksum of the client's rows keeps it deterministic, local
    (the server never learns it) and different from client to client.
    """
    # (of the rows in float32, so that a float32 and a float64 copy of the
    # same rows start alike)
    checksum = zlib.crc32(np.ascontiguousarray(X, dtype=np.float32).view(np.uint8))
    return np.random.default_rng([int(seed), checksum])


def local_kmeans_summary(X, n_clusters, rng, *, max_iter=10):
    """A client's k-means summary: local centres and the rows of each.

    k-means++ seeding then up to ``max_iter`` Lloyd steps
    (:class:`sklearn.cluster.KMeans`, one initialization) on the client's
    rows, with ``min(n_clusters, n_rows)`` clusters.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    n_clusters : int
    rng : numpy.random.Generator
    max_iter : int, default=10

    Returns
    -------
    centres : ndarray of shape (n_clusters, n_features)
        Padded with zero rows when the client has fewer rows than clusters.
    mass : ndarray of shape (n_clusters,)
        Fraction of the client's rows in each cluster (0 for padding).
    labels : ndarray of int of shape (n_rows,)
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    n, d = X.shape
    k = min(n_clusters, n)
    centres = np.zeros((n_clusters, d), dtype=X.dtype)
    mass = np.zeros(n_clusters, dtype=X.dtype)
    # one OpenMP thread: the engine runs the clients in parallel
    with warnings.catch_warnings(), threadpool_limits(1, user_api="openmp"):
        warnings.simplefilter("ignore")  # fewer distinct rows than clusters
        km = KMeans(
            n_clusters=k, n_init=1, max_iter=max_iter, algorithm="lloyd",
            random_state=int(rng.integers(np.iinfo(np.int32).max)),
        ).fit(X)
    labels = km.labels_
    centres[:k] = km.cluster_centers_
    mass[:k] = np.bincount(labels, minlength=k) / n
    return centres, mass, labels


def pooled_kmeans(points, weights, n_clusters, rng, *, lloyd=True, max_iter=300):
    """Weighted k-means of the pooled client centres, on the server.

    Parameters
    ----------
    points : ndarray of shape (n_points, n_features)
    weights : ndarray of shape (n_points,)
        Nonnegative masses; points of zero mass are ignored.
    n_clusters : int
    rng : numpy.random.Generator
    lloyd : bool, default=True
        Weighted k-means++ seeding followed by weighted Lloyd steps
        (:class:`sklearn.cluster.KMeans` with ``sample_weight``); False:
        the seeding only.
    max_iter : int, default=300

    Returns
    -------
    centres : ndarray of shape (n_clusters', n_features)
        ``n_clusters' = min(n_clusters, number of points of positive mass)``.
    labels : ndarray of int of shape (n_points,)
        The group of every point (-1 for points of zero mass).
    """
    from sklearn.cluster import KMeans, kmeans_plusplus
    from threadpoolctl import threadpool_limits

    keep = np.flatnonzero(weights > 0)
    P, w = points[keep], weights[keep]
    k = min(n_clusters, P.shape[0])
    seed = int(rng.integers(np.iinfo(np.int32).max))
    with warnings.catch_warnings(), threadpool_limits(1, user_api="openmp"):
        warnings.simplefilter("ignore")  # fewer distinct points than clusters
        if lloyd:
            km = KMeans(
                n_clusters=k, n_init=1, max_iter=max_iter, algorithm="lloyd", random_state=seed,
            ).fit(P, sample_weight=w)
            centres, lab = km.cluster_centers_, km.labels_
        else:
            centres, _ = kmeans_plusplus(P, k, sample_weight=w, random_state=seed)
            lab, _ = assign_clusters(P, centres)
    labels = np.full(points.shape[0], -1)
    labels[keep] = lab
    return centres.astype(points.dtype, copy=False), labels


def match_to(theta_new, theta_prev):
    """Permutation of ``theta_new``'s rows that best matches ``theta_prev``'s.

    The Hungarian algorithm (:func:`scipy.optimize.linear_sum_assignment`)
    on the squared distances between the rows (centres or means).

    Returns
    -------
    perm : ndarray of int of shape (k,)
        ``theta_new[perm][j]`` is the row matched with ``theta_prev[j]``.
    """
    cost = (
        np.einsum("ij,ij->i", theta_prev, theta_prev)[:, None]
        - 2 * theta_prev @ theta_new.T
        + np.einsum("ij,ij->i", theta_new, theta_new)[None, :]
    )
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=int)
    perm[rows] = cols
    return perm


class KMeansProblem(MMProblem):
    """k-means (Lloyd) for the FedMM engine (see the module docstring).

    The parameter is the ``(n_clusters, n_features)`` array of centres.

    Parameters
    ----------
    n_clusters : int
    init : {"k-means++", "random"} or ndarray of shape (n_clusters, n_features), default="k-means++"
        ``"k-means++"``: every client sends its local k-means centres and
        their masses (see :func:`local_kmeans_summary`); the server runs
        weighted k-means on the pooled centres. ``"random"``: every client
        sends its mean row and mean squared row (``2 d`` values); the server
        draws the centres from the Gaussian with that mean and diagonal
        variance. An array: the initial centres (clients then send only
        their mean and mean squared row, for the tolerance scale).
    random_seed : int, default=0
        Seeds the clients' local k-means and the server's draws.
    local_max_iter : int, default=10
        Lloyd steps of the clients' local k-means.
    match_components : bool, default=False
        Permute the result of every M-step so that its centres match the
        previous ones (Hungarian algorithm on the squared distances). For
        the parameter-averaging baseline, whose clients run local M-steps
        before the server averages the centres: it keeps centre ``j`` of
        every client the continuation of the broadcast centre ``j``. Never
        needed for surrogate aggregation (the M-step maps cluster ``j``'s
        statistic to centre ``j``).
    """

    # an exact first round: EM / Lloyd started from a noisy first M-step can
    # settle in a worse local optimum (measured on the tests' blobs)
    compress_first_round = False

    def __init__(self, n_clusters, *, init="k-means++", random_seed=0, local_max_iter=10,
                 match_components=False):
        self.n_clusters = n_clusters
        self.init = init
        self.random_seed = random_seed
        self.local_max_iter = local_max_iter
        self.match_components = match_components

    def _given_init(self):
        return not isinstance(self.init, str)

    # ----------------------------------------------------------- clients
    def init_statistic(self, X):
        # (float64: no n x d temporary; float32 keeps NumPy's pairwise sum)
        sq = (np.einsum("ij,ij->j", X, X) / X.shape[0] if X.dtype == np.float64
              else (X * X).mean(axis=0))
        stat = {"mean": X.mean(axis=0), "sq": sq}
        if not self._given_init() and self.init == "k-means++":
            centres, mass, _ = local_kmeans_summary(
                X, self.n_clusters, _client_rng(self.random_seed, X), max_iter=self.local_max_iter
            )
            stat.update(centres=centres, mass=mass)
        return stat

    def _coordinates(self):
        """The standardization of the statistic: shift and (scalar) scale."""
        return getattr(self, "shift_", 0.0), getattr(self, "scale_", 1.0)

    def local_statistic(self, X, theta):
        labels, count, sums = _lloyd_pass(X, theta)
        x_sq = np.einsum("ij,ij->i", X, X)
        sq = np.bincount(labels, weights=x_sq, minlength=theta.shape[0]).astype(X.dtype)
        return self._statistic(X.shape[0], theta, count, sums, sq)

    def client_cache(self, X):
        """An empty cache: :meth:`cached_statistic` fills it on full passes."""
        return {}

    def cached_statistic(self, X, theta, cache, rows):
        """:meth:`local_statistic`, with the client's labels and bounds on full passes.

        Minibatches (``rows`` not None) use :meth:`local_statistic` and keep
        the cache as it is; a pass over all rows uses and renews it (see
        :meth:`_remembered_statistic`).
        """
        if rows is not None:
            stat, loss = self.local_statistic(X[rows], theta)
            return stat, loss, cache
        return self._remembered_statistic(X, theta, cache if "labels" in cache else None)

    def _remembered_statistic(self, X, theta, memory):
        """The statistic from distance bounds kept since the client's last round.

        Once the assignments settle (at most one row in fifty changed
        cluster in a full pass), the client remembers each row's label and
        Hamerly's bounds (an upper bound on its distance to its centre, a
        lower bound on its distance to the others) with its per-cluster
        counts, sums and squared norms. When the centres move, a row whose
        bounds still separate its centre from the others (with a margin
        covering rounding) keeps its label, and only the other rows'
        distances are computed (and their bounds renewed); the statistic is
        updated by the rows that changed cluster. The labels are those of a
        full pass (Lloyd's assignments), so the statistic is the same to
        rounding, and the work per round falls with the number of rows near a
        boundary. When too many rows sit near a boundary for the bounds to
        pay (more than a third), the client returns to full passes (scikit-
        learn's compiled Lloyd step) and waits 1, 2, 4, ... rounds before
        trying the bounds again. The memory stays on the client.
        """
        n, k = X.shape[0], theta.shape[0]
        memory_in = memory if memory is not None else {}
        valid = (memory is not None and "x_sq_max" in memory and memory["labels"].shape == (n,)
                 and memory["centres"].shape == theta.shape and memory["sums"].dtype == X.dtype)
        found = None
        if valid and "keys" in memory:
            found = _bounded_pass(X, theta, memory)
        bounds = None
        if found is not None:
            labels, count, sums, sq, bounds = found
            x_sq = memory["x_sq"]
        else:
            labels, count, sums = _lloyd_pass(X, theta)
            labels = labels.astype(np.intp)
            x_sq = memory["x_sq"] if valid else np.einsum("ij,ij->i", X, X)
            sq = np.bincount(labels, weights=x_sq, minlength=k).astype(X.dtype)
            # rounds to wait before trying the bounds again, and the next wait
            # (doubled each time the bounds did not pay)
            wait, backoff = memory["wait"] if valid and "wait" in memory else (0, 1)
            if valid and "keys" in memory:  # the bounds did not pay this round
                wait, backoff = backoff, 2 * backoff
            elif wait > 0:
                wait -= 1
            elif valid and np.count_nonzero(labels != memory["labels"]) <= n // 50:
                # settled: the bounds may pay from the next round on
                bounds = _bounds_memory(X, x_sq, theta, labels)
        memory = dict(labels=labels, centres=np.array(theta, copy=True), x_sq=x_sq,
                      x_sq_max=memory["x_sq_max"] if valid else np.array([x_sq.max()]),
                      count=count, sums=sums, sq=sq)
        if found is None:
            memory["wait"] = np.array([wait, backoff])
        elif "wait" in memory_in:
            memory["wait"] = memory_in["wait"]
        if bounds is not None:
            memory.update(bounds)
        return (*self._statistic(n, theta, count, sums, sq), memory)

    def _statistic(self, n, theta, count, sums, sq):
        """The statistic and loss from raw per-cluster counts, sums and squared norms."""
        # the loss from the same sums: sum_j Q_j - 2 c_j . S_j + N_j ||c_j||^2
        loss = float(max(sq.sum() - 2 * np.einsum("ij,ij->", theta, sums)
                         + count @ np.einsum("ij,ij->i", theta, theta), 0.0) / n)
        shift, scale = self._coordinates()
        # the same statistic in standardized coordinates z = (x - shift) / scale
        # (exact algebra on the sums: no per-row pass)
        shifted = sums - np.outer(count, shift)
        # (einsum, not ``@``: the float32 product once raised a spurious
        # "invalid value" flag on finite numbers under load)
        sq = (sq - 2 * np.einsum("ij,j->i", sums, shift) + count * np.dot(shift, shift)) / scale**2
        stat = {"count": count / n, "sum": shifted / (scale * n), "sq": np.maximum(sq, 0) / n}
        return stat, loss

    def loss(self, X, theta):
        return float(np.mean(assign_clusters(X, theta)[1]))

    # ------------------------------------------------------------ server
    def combine_init_statistics(self, stats, weights):
        """Weighted means of the moments; the local centres side by side.

        Returns
        -------
        init_stat : dict of ndarray
            ``mean`` and ``sq`` (client-weighted means over all rows) and,
            for ``"k-means++"``, ``centres`` (all clients' local centres,
            stacked) with ``mass`` (each centre's share of the total
            weight: :math:`w_i` times its fraction of client :math:`i`'s
            rows).
        """
        out = {
            name: sum(w * s[name] for s, w in zip(stats, weights)) for name in ("mean", "sq")
        }
        if "centres" in stats[0]:
            out["centres"] = np.concatenate([s["centres"] for s in stats])
            out["mass"] = np.concatenate([w * s["mass"] for s, w in zip(stats, weights)])
        return out

    def prepare(self, init_stat):
        r"""A copy holding the pooled mean and scale of the rows.

        ``feature_variance_`` is the mean per-feature variance of the pooled
        rows (scikit-learn scales ``tol`` by it). The statistic is computed
        in standardized coordinates :math:`z = (x - m) / \sigma`, with
        ``shift_`` :math:`m` the pooled mean and ``scale_`` :math:`\sigma`
        the square root of ``feature_variance_`` (one scalar: distances keep
        their geometry). Masses, sums and squared norms then have comparable
        sizes, which matters when a norm-based compressor (QSGD) adds noise
        to the message as a whole; with exact rounds the centres are the
        same up to rounding.
        """
        prepared = copy.copy(self)
        mean = np.asarray(init_stat["mean"])
        var = np.maximum(np.asarray(init_stat["sq"]) - mean**2, 0)
        prepared.feature_variance_ = float(np.mean(var))
        prepared.shift_ = mean.copy()
        prepared.scale_ = float(np.sqrt(prepared.feature_variance_)) or 1.0
        return prepared

    def init_parameter(self, init_stat, rng):
        dtype = np.asarray(init_stat["mean"]).dtype
        if self._given_init():
            return np.array(self.init, dtype=dtype, copy=True)
        server_rng = np.random.default_rng([int(self.random_seed), 1])
        mean = np.asarray(init_stat["mean"])
        std = np.sqrt(np.maximum(np.asarray(init_stat["sq"]) - mean**2, 0))
        if self.init == "random":
            return (mean + std * server_rng.standard_normal((self.n_clusters, mean.size))).astype(dtype)
        centres, _ = pooled_kmeans(init_stat["centres"], init_stat["mass"], self.n_clusters, server_rng)
        extra = self.n_clusters - centres.shape[0]
        if extra > 0:  # fewer pooled centres than clusters: draws around the pooled mean
            centres = np.vstack([centres, mean + std * server_rng.standard_normal((extra, mean.size))])
        return centres.astype(dtype)

    @staticmethod
    def _empty(count):
        return count <= 0

    def minimize(self, stat, theta_prev, rng=None):
        count, sums = stat["count"], stat["sum"]
        shift, scale = self._coordinates()
        empty = self._empty(count)
        centres = np.array(theta_prev, copy=True)
        full = ~empty
        centres[full] = shift + scale * (sums[full] / count[full, None])
        if empty.any() and rng is not None:
            with np.errstate(all="ignore"):
                # within-cluster sum of squares (standardized units) per cluster
                sse = np.where(full, stat["sq"] - np.einsum("ij,ij->i", sums, sums) / count, -np.inf)
            donors = np.argsort(-sse, kind="stable")
            d = centres.shape[1]
            for t, j in enumerate(np.flatnonzero(empty)):
                donor = donors[t % max(int(full.sum()), 1)]
                if not full[donor]:
                    continue  # nothing assigned anywhere: leave the centre
                radius = scale * np.sqrt(max(float(sse[donor]), 0.0) / float(count[donor]))
                u = rng.standard_normal(d)
                u /= max(np.linalg.norm(u), np.finfo(float).tiny)
                centres[j] = centres[donor] + radius * u
        if self.match_components:
            centres = centres[match_to(centres, theta_prev)]
        return centres

    def restarted(self, stat, theta_prev, theta_new):
        """Whether an empty cluster was re-seeded in this M-step."""
        empty = self._empty(stat["count"])
        return bool(np.any(theta_new[empty] != theta_prev[empty]))

    def project(self, stat):
        r"""Nonnegative masses and squared norms, Cauchy-Schwarz-consistent sums.

        :math:`\|s^{(1)}_j\|^2 \le s^{(0)}_j s^{(2)}_j` holds for any
        cluster (Jensen); sums violating it (compression noise) are shrunk
        onto it, which bounds the centre by the cluster's root-mean-square
        norm. A cluster of zero mass has zero sums. A valid statistic is
        returned unchanged.
        """
        count = np.maximum(stat["count"], 0)
        sq = np.maximum(stat["sq"], 0)
        sums = stat["sum"]
        norm = np.sqrt(np.einsum("ij,ij->i", sums, sums))
        bound = np.sqrt(count * sq)
        with np.errstate(divide="ignore", invalid="ignore"):
            shrink = np.where(norm > bound, bound / np.where(norm > 0, norm, 1.0), 1.0)
        keep = count > 0
        return {
            "count": count,
            "sum": np.where(keep[:, None], sums * shrink[:, None], 0),
            "sq": np.where(keep, sq, 0),
        }
