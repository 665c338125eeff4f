"""FederatedKMeans: a federated drop-in for sklearn's KMeans (Lloyd's algorithm)."""

import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    ClusterMixin,
    TransformerMixin,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted

from ._base import FEDERATED_PARAMS_DOC, FederatedMixin
from ._clients import check_clients, check_sample_weight, check_transform_input, is_client_list
from ._params import Interval, StrOptions
from .federation.transport import RemoteClients
from .problems.kmeans import KMeansProblem, assign_clusters

__all__ = ["FederatedKMeans"]


def _per_row(X, client_ids, clients, fn):
    """``fn`` applied on every client's rows, returned in the order of the rows of ``X``.

    Each client computes on its own rows (labels stay on the clients in a
    deployment); for one array split by ``client_ids``, the results are put
    back in the array's row order.
    """
    parts = [fn(Xi) for Xi in clients]
    values = np.concatenate(parts)
    if is_client_list(X) or client_ids is None:
        return values
    _, inverse = np.unique(np.asarray(client_ids), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    out = np.empty_like(values)
    out[order] = values
    return out


class _MultiInitMixin(FederatedMixin):
    """Runs the whole federated fit from ``n_init`` seeded initializations, keeps the best.

    The seeds come from ``random_state``; each run is a complete FedMM fit
    (its own initialization round and rounds). The fitted attributes of the
    best run (including ``fedmm_state_``, which ``warm_start`` continues)
    are restored at the end.
    """

    #: The engine's ``callback`` slot, read by ``FederatedMixin._make_engine``;
    #: these estimators take no callback parameter and stop through
    #: :meth:`_stop_rule` instead.
    callback = None

    def _make_engine(self, problem, *, max_iter, tol, convergence):
        engine = super()._make_engine(problem, max_iter=max_iter, tol=tol, convergence=convergence)
        engine.callback = self._stop_rule
        return engine

    def _stop_rule(self, info):
        return False

    def _seeds(self, n_init):
        rs = check_random_state(self.random_state)
        return [int(s) for s in rs.randint(np.iinfo(np.int32).max, size=n_init)]

    def _best_of(self, seeds, run, better):
        """``run(seed)`` fits once and returns its score; keep the best run's attributes."""
        best_score, best = None, None
        for seed in seeds:
            score = run(seed)
            if len(seeds) == 1:
                return
            if best_score is None or better(score, best_score):
                best_score = score
                best = {k: v for k, v in vars(self).items() if k.endswith("_") or k == "_resume_params"}
        for k, v in best.items():
            setattr(self, k, v)


class FederatedKMeans(
    _MultiInitMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin, BaseEstimator
):
    __doc__ = r"""k-means clustering of data spread over clients, trained by FedMM.

    Finds ``n_clusters`` centres minimizing the within-cluster sum of
    squares of the rows of all clients, without the clients sending any
    row:

    .. math::

        \min_{c_1, \dots, c_K} \; \sum_i w_i \frac{1}{n_i} \sum_{x \in X_i}
        \min_j \|x - c_j\|_2^2,

    where:

    - :math:`X_i` holds the :math:`n_i` rows of client :math:`i` and
      :math:`w_i` its weight (``client_weights``; with the default
      ``"proportional"`` the objective is ``inertia / n_samples``);
    - :math:`c_j` is the centre of cluster :math:`j`.

    Lloyd's algorithm is MM: with every row's nearest centre fixed, the
    squared distance is majorized by a quadratic minimized by the cluster
    means. Each round the active clients assign their rows and send the
    per-cluster masses, sums and sums of squared norms (through control
    variates and an optional compressor); the server aggregates them exactly
    and sets each centre to its cluster's mean. With every client active and
    no compression this is exactly :class:`sklearn.cluster.KMeans` with
    ``algorithm="lloyd"``, however the rows are split. The parameters shared
    with :class:`~sklearn.cluster.KMeans` keep their names and meanings;
    ``fit`` also takes a list of client arrays or ``client_ids``.

    Parameters
    ----------
    n_clusters : int, default=8
        Number of clusters.
    init : {"k-means++", "random"} or array-like of shape (n_clusters, n_features), default="k-means++"
        Initialization, with no row leaving a client (see
        ``doc/what_leaves_a_client.md``). ``"k-means++"``: each client runs
        k-means++ and a few Lloyd steps on its own rows and sends its local
        centres and their masses; the server runs weighted k-means on the
        pooled centres (one-shot federated clustering). ``"random"``: each
        client sends its mean and mean squared row; the server draws the
        centres from the Gaussian with that mean and diagonal variance. An
        array: the initial centres.
    n_init : "auto" or int, default="auto"
        Number of complete federated fits from different seeded
        initializations; the one with the smallest inertia is kept.
        ``"auto"``: 1 for ``"k-means++"`` or an array, 10 for ``"random"``.
    max_iter : int, default=300
        Maximum number of Lloyd iterations (M-steps), the initial round
        included, as scikit-learn counts them.
    tol : float, default=1e-4
        Stop when the squared Frobenius norm of the change of the centres is
        at most ``tol`` times the mean per-feature variance of the pooled
        rows (computed from the clients' first and second moments), as
        scikit-learn.
    verbose : int, default=0
        Report progress per round (a tqdm bar when tqdm is installed).
    random_state : int, RandomState instance or None, default=None
        Seeds every draw: initializations, participation, minibatches,
        compression, empty-cluster re-seeding. Results do not depend on
        ``n_jobs``.
    copy_x : bool, default=True
        Accepted for compatibility: the clients' rows are never modified.
    algorithm : {"lloyd", "elkan"}, default="lloyd"
        Lloyd's algorithm (the MM algorithm FedMM federates). ``"elkan"``
        is accepted for compatibility and runs the same iterations (Elkan's
        algorithm gives Lloyd's centres; each client already skips the rows
        whose distance bounds settle their cluster).
    n_jobs : int, default=None
        Clients run in parallel with joblib (any backend chosen with
        :func:`joblib.parallel_config`).
    """ + FEDERATED_PARAMS_DOC + r"""
    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
        The centres.
    labels_ : ndarray of shape (n_samples,)
        The cluster of every training row at the final centres (rows of all
        clients, in order). In-process fits compute them on each client's
        rows; in a deployment (:meth:`fit_transport`) the labels stay on the
        clients and ``labels_`` is None.
    inertia_ : float
        Sum of squared distances of the training rows to their closest
        centre, at the final centres (each client sends one number).
    n_iter_ : int
        Number of Lloyd iterations (M-steps) run in the last fit call.
    n_clients_ : int
        Number of clients seen in ``fit``.
    history_ : History
        Per-round record: objective (``inertia / n`` with proportional
        weights, at the centres the round started from), update sizes, bits,
        active clients, time (see :class:`skfedmm.History`).
    bits_up_, bits_down_ : int
        Total bits sent by the clients and by the server.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Defined when the clients are DataFrames with string column names.
    problem_ : KMeansProblem
        The MM problem the engine solved.
    fedmm_state_ : FedMMState
        The full training state, used by ``warm_start``.

    See Also
    --------
    sklearn.cluster.KMeans : The centralized estimator.
    FederatedGaussianMixture : Soft clustering by federated EM.

    Notes
    -----
    Empty clusters: scikit-learn moves an empty cluster onto the rows
    farthest from their centres, which the server cannot see. Here the
    server re-seeds it next to the cluster with the largest within-cluster
    sum of squares (known from the aggregated statistics alone), at a random
    offset of that cluster's root-mean-square radius (see
    :class:`~skfedmm.problems.KMeansProblem`).

    References
    ----------
    .. [1] A. Dieuleveut, G. Fort, M. Hegazy, H.-T. Wai. Federated
       Majorize-Minimization: Beyond Parameter Aggregation. arXiv:2507.17534.
    .. [2] S. Lloyd. Least squares quantization in PCM. IEEE Trans. Inf.
       Theory 28(2), 1982.
    .. [3] D. Dennis, T. Li, V. Smith. Heterogeneity for the win: one-shot
       federated clustering. ICML 2021.

    Examples
    --------
    >>> import numpy as np
    >>> from skfedmm import FederatedKMeans
    >>> rng = np.random.default_rng(0)
    >>> clients = [rng.normal(3 * i, 1, size=(50, 2)) for i in range(3)]
    >>> km = FederatedKMeans(n_clusters=3, random_state=0).fit(clients)
    >>> km.cluster_centers_.shape
    (3, 2)
    >>> km.predict(clients[0]).shape
    (50,)
    """

    _parameter_constraints = {
        **FederatedMixin._parameter_constraints,
        "n_clusters": [Interval(Integral, 1, None, closed="left")],
        "init": [StrOptions({"k-means++", "random"}), "array-like"],
        "n_init": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "verbose": ["verbose"],
        "random_state": ["random_state"],
        "copy_x": ["boolean"],
        "algorithm": [StrOptions({"lloyd", "elkan"})],
        "n_jobs": [Integral, None],
    }

    _fixed_when_resuming = {
        "n_clusters": "the statistics' shapes depend on it",
        "aggregation": "the training state of one aggregation is not that of the other",
        "init": "it sets the initial centres, which continued training is past",
    }

    def __init__(
        self,
        n_clusters=8,
        *,
        init="k-means++",
        n_init="auto",
        max_iter=300,
        tol=1e-4,
        verbose=0,
        random_state=None,
        copy_x=True,
        algorithm="lloyd",
        n_jobs=None,
        aggregation="surrogate",
        participation=1.0,
        participation_scheme="bernoulli",
        compression=None,
        step_size="auto",
        cv_rate="auto",
        batch_size=None,
        local_steps=1,
        learning_rate="auto",
        mu=0.01,
        client_weights="proportional",
        eval_every=None,
        min_clients=1,
        client_timeout=None,
        warm_start=False,
    ):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.verbose = verbose
        self.random_state = random_state
        self.copy_x = copy_x
        self.algorithm = algorithm
        self.n_jobs = n_jobs
        self.aggregation = aggregation
        self.participation = participation
        self.participation_scheme = participation_scheme
        self.compression = compression
        self.step_size = step_size
        self.cv_rate = cv_rate
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.learning_rate = learning_rate
        self.mu = mu
        self.client_weights = client_weights
        self.eval_every = eval_every
        self.min_clients = min_clients
        self.client_timeout = client_timeout
        self.warm_start = warm_start

    # ------------------------------------------------------------------ fit
    def _check_init(self, n_features, dtype):
        if isinstance(self.init, str):
            return self.init
        try:
            init = check_array(self.init, dtype=dtype, input_name="init")
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"init: {exc}") from exc
        # scikit-learn's messages
        if init.shape[0] != self.n_clusters:
            raise ValueError(
                f"The shape of the initial centers {init.shape} does not match the number "
                f"of clusters {self.n_clusters}."
            )
        if init.shape[1] != n_features:
            raise ValueError(
                f"The shape of the initial centers {init.shape} does not match the number "
                f"of features of the data {n_features}."
            )
        return init

    def _n_init_resolved(self):
        if self.n_init == "auto":
            return 10 if isinstance(self.init, str) and self.init == "random" else 1
        if not isinstance(self.init, str) and self.n_init != 1:
            warnings.warn(
                "Explicit initial center position passed: performing only one init in "
                f"FederatedKMeans instead of n_init={self.n_init}.",
                RuntimeWarning,
                stacklevel=3,
            )
            return 1
        return self.n_init

    def _stop_rule(self, info):
        # scikit-learn's rule: squared centre shift at most tol * mean feature
        # variance, or no label changed ("strict convergence"): the centres
        # then move by rounding only (the server statistic is updated as
        # S + (S_new - S)), hence the relative 1e-13 floor. A round where no
        # client answered leaves the centres still: not a plateau.
        history = info["history"]
        change = history.param_change[-1]
        floor = 1e-13 * float(np.linalg.norm(info["theta"]))
        if history.n_active[-1] == 0:
            return False
        strict, within = change <= floor, change**2 <= self._tol_scaled
        if self.verbose and (strict or within):
            # scikit-learn's messages (iterations counted from 0)
            i = self.n_iter_ - 1
            if strict:
                print(f"Converged at iteration {i}: strict convergence.")
            else:
                print(f"Converged at iteration {i}: center shift {change**2} within tolerance "
                      f"{self._tol_scaled}.")
        return bool(strict or within)

    def _report(self, state, n_samples, resume):
        """scikit-learn's progress lines, printed when ``verbose`` is set."""
        if self.n_iter_ == 1 and not resume:
            print("Initialization complete")
        objective = state.history.objective[-1]
        if self.client_weights == "proportional":
            # the objective is inertia / n_samples at the centres the round started from
            print(f"Iteration {self.n_iter_ - 1}, inertia {objective * n_samples}.")
        else:
            print(f"Iteration {self.n_iter_ - 1}, objective {objective}.")

    def fit(self, X, y=None, *, client_ids=None):
        """Compute the k-means clustering of the clients' rows.

        Parameters
        ----------
        X : list of array-like of shape (n_i, n_features), or array-like of shape (n_samples, n_features)
            One array per client, or all rows (split by ``client_ids``; one
            client when it is None). Never modified.
        y : Ignored
            Not used, present for API consistency by convention.
        client_ids : array-like of shape (n_samples,), default=None
            The client of each row when ``X`` is one array. A sample-aligned
            fit parameter: route it with ``set_fit_request(client_ids=True)``
            in meta-estimators.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        self._validate_params()
        resume = self.warm_start and self._can_resume()
        clients, _ = check_clients(self, X, client_ids, reset=not resume)
        n_samples = sum(Xi.shape[0] for Xi in clients)
        if n_samples < self.n_clusters:
            raise ValueError(f"n_samples={n_samples} should be >= n_clusters={self.n_clusters}.")
        init = self._check_init(self.n_features_in_, clients[0].dtype)
        if self.algorithm == "elkan" and self.n_clusters == 1:
            warnings.warn(
                "algorithm='elkan' doesn't make sense for a single cluster. Using 'lloyd' instead.",
                RuntimeWarning,
                stacklevel=2,
            )
        start = self.fedmm_state_.round if resume else -1
        # the number of initializations run (scikit-learn's ``_n_init``)
        self._n_init = 1 if resume else self._n_init_resolved()

        def record(state):
            self.cluster_centers_ = state.theta
            self.n_iter_ = state.round - start
            self._tol_scaled = self.tol * state.problem.feature_variance_
            if self.verbose:
                self._report(state, n_samples, resume)

        def run(seed):
            problem = KMeansProblem(
                self.n_clusters, init=init, random_seed=seed,
                match_components=self.aggregation == "parameter",
            )
            self._run_engine(
                clients, problem, max_iter=self.max_iter - 1 if not resume else self.max_iter,
                tol=0.0, convergence="objective", resume=resume, record=record,
            )
            if isinstance(clients, RemoteClients):
                # deployed clients: each computes its mean squared distance on
                # its own rows; the labels stay on the clients
                losses = self._client_losses(clients, self.cluster_centers_)
                self.labels_ = None
                self.inertia_ = float(np.dot(losses, [Xi.shape[0] for Xi in clients]))
                return self.inertia_
            # the final E-step, on every client: its labels and its inertia
            final = [assign_clusters(Xi, self.cluster_centers_) for Xi in clients]
            self.labels_ = _per_row(X, client_ids, final, lambda f: f[0])
            self.inertia_ = float(sum(sq.sum() for _, sq in final))
            return self.inertia_

        self._best_of(self._seeds(self._n_init), run, lambda a, b: a < b)
        if self.labels_ is not None:
            distinct = np.count_nonzero(np.bincount(self.labels_, minlength=self.n_clusters))
            if distinct < self.n_clusters:
                warnings.warn(
                    f"Number of distinct clusters ({distinct}) found smaller than "
                    f"n_clusters ({self.n_clusters}). Possibly due to duplicate points in X.",
                    ConvergenceWarning,
                    stacklevel=2,
                )
        return self

    def _labels(self, X):
        return assign_clusters(X, self.cluster_centers_.astype(X.dtype, copy=False))[0]

    def fit_predict(self, X, y=None, *, client_ids=None):
        """Fit, then return the cluster of every training row.

        Parameters
        ----------
        X : list of array-like or array-like of shape (n_samples, n_features)
        y : Ignored
        client_ids : array-like of shape (n_samples,), default=None

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            ``labels_``: clients in order when ``X`` is a list.
        """
        return self.fit(X, client_ids=client_ids).labels_

    def predict(self, X):
        """The closest centre of every row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        X = check_transform_input(self, X, dtype=[np.float64, np.float32])
        return self._labels(X)

    def transform(self, X):
        """Distances of every row to every centre.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        X_new : ndarray of shape (n_samples, n_clusters)
        """
        check_is_fitted(self)
        X = check_transform_input(self, X, dtype=[np.float64, np.float32])
        return euclidean_distances(X, self.cluster_centers_.astype(X.dtype, copy=False))

    def fit_transform(self, X, y=None, *, client_ids=None):
        """Fit, then return the distances of the training rows to the centres.

        Parameters
        ----------
        X : list of array-like or array-like of shape (n_samples, n_features)
        y : Ignored
        client_ids : array-like of shape (n_samples,), default=None

        Returns
        -------
        X_new : ndarray of shape (n_samples, n_clusters)
        """
        self.fit(X, client_ids=client_ids)
        clients, _ = check_clients(self, X, client_ids, reset=False)
        return _per_row(X, client_ids, clients, self.transform)

    def score(self, X, y=None, sample_weight=None):
        """Opposite of the k-means objective (sum of squared distances) on ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or list of such arrays
        y : Ignored
            Not used, present for API consistency by convention.
        sample_weight : array-like of shape (n_samples,), default=None
            Row weights (rows of all clients in order).

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        parts = X if is_client_list(X) else [X]
        parts = [check_transform_input(self, Xi, dtype=[np.float64, np.float32]) for Xi in parts]
        sq = np.concatenate([
            assign_clusters(Xi, self.cluster_centers_.astype(Xi.dtype, copy=False))[1]
            for Xi in parts
        ])
        if sample_weight is not None:
            sq = sq * check_sample_weight(sample_weight, sq.shape[0])
        return -float(sq.sum())

    @property
    def _n_features_out(self):
        return self.cluster_centers_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
