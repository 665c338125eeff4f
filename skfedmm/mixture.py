"""FederatedGaussianMixture: a federated drop-in for sklearn's GaussianMixture (EM)."""

import itertools
import math
import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted

from ._base import FEDERATED_PARAMS_DOC, FederatedMixin
from ._clients import check_clients, check_transform_input, is_client_list
from ._params import Interval, StrOptions
from .cluster import _MultiInitMixin, _per_row
from .problems.mixture import GaussianMixtureProblem, log_responsibilities, weighted_log_prob

__all__ = ["FederatedGaussianMixture"]


def _check_shape(param, shape, name):
    if param.shape != shape:
        raise ValueError(
            f"The parameter '{name}' should have the shape of {shape}, but got {param.shape}"
        )


class FederatedGaussianMixture(_MultiInitMixin, DensityMixin, BaseEstimator):
    __doc__ = r"""Gaussian mixture of data spread over clients, fitted by federated EM.

    Maximizes the likelihood of a mixture of Gaussians on the rows of all
    clients, without the clients sending any row:

    .. math::

        \max_{\pi, \mu, \Sigma} \; \sum_i w_i \frac{1}{n_i} \sum_{x \in X_i}
        \log \sum_{k=1}^K \pi_k \, \mathcal N(x; \mu_k, \Sigma_k),

    where:

    - :math:`X_i` holds the :math:`n_i` rows of client :math:`i` and
      :math:`w_i` its weight (``client_weights``);
    - :math:`\pi_k`, :math:`\mu_k`, :math:`\Sigma_k` are the weight, mean
      and covariance of component :math:`k` (``covariance_type``).

    EM is MM: each round the active clients compute their rows'
    responsibilities at the broadcast parameters (in log space) and send the
    per-component responsibility mass, first moment and second moment (in
    the covariance type's form), through control variates and an optional
    compressor; the server aggregates them exactly and runs the M-step. With
    every client active and no compression this is exactly
    :class:`sklearn.mixture.GaussianMixture`'s EM, however the rows are split
    (FedEM, Dieuleveut et al. 2021). The parameters shared with
    :class:`~sklearn.mixture.GaussianMixture` keep their names and meanings;
    ``fit`` also takes a list of client arrays or ``client_ids``.

    Parameters
    ----------
    n_components : int, default=1
        Number of mixture components.
    covariance_type : {"full", "tied", "diag", "spherical"}, default="full"
        One full covariance matrix per component, one shared full matrix,
        one diagonal matrix per component, or one variance per component.
    tol : float, default=1e-3
        Stop when the mean log-likelihood changes by less than ``tol``
        between two iterations (as scikit-learn; evaluated in exact rounds,
        or every ``eval_every`` rounds otherwise).
    reg_covar : float, default=1e-6
        Added to the diagonal of the covariances (positive definiteness).
    max_iter : int, default=100
        Maximum number of EM iterations (M-steps), the initial round
        included, as scikit-learn counts them. 0: the initial parameters
        (``n_iter_ = 0``, ``lower_bound_ = -inf``, no convergence warning).
    n_init : int, default=1
        Number of complete federated fits from different seeded
        initializations; the one with the largest lower bound is kept.
    init_params : {"kmeans", "k-means++", "random", "random_from_data"}, default="kmeans"
        Initialization when the initial parameters are not all given (see
        ``doc/what_leaves_a_client.md``). ``"kmeans"``: each client sends
        its local k-means summary (per local cluster: mass, centre,
        within-cluster second moment); the server groups the pooled local
        clusters by weighted k-means and combines their moments exactly.
        ``"k-means++"``: the same, grouped by weighted k-means++ seeding.
        ``"random"``: each client sends its mean and second moment; the
        means are drawn from the pooled Gaussian. ``"random_from_data"``:
        each client sends ``n_components`` of its rows, drawn at random;
        *rows leave the clients*.
    weights_init : array-like of shape (n_components,), default=None
        Initial weights.
    means_init : array-like of shape (n_components, n_features), default=None
        Initial means.
    precisions_init : array-like, default=None
        Initial precisions (inverse covariances), of shape
        ``(n_components,)`` spherical, ``(n_features, n_features)`` tied,
        ``(n_components, n_features)`` diag,
        ``(n_components, n_features, n_features)`` full. With all three
        given, the clients send nothing to initialize.
    random_state : int, RandomState instance or None, default=None
        Seeds every draw: initializations, participation, minibatches,
        compression, :meth:`sample`. Results do not depend on ``n_jobs``.
    verbose : int, default=0
        Report progress per round (a tqdm bar when tqdm is installed).
    verbose_interval : int, default=10
        Rounds between two progress reports when ``verbose`` is set.
    n_jobs : int, default=None
        Clients run in parallel with joblib (any backend chosen with
        :func:`joblib.parallel_config`).
    """ + FEDERATED_PARAMS_DOC + r"""
    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    covariances_ : ndarray
        Shape as ``precisions_init``.
    precisions_ : ndarray
        The inverse covariances.
    precisions_cholesky_ : ndarray
        Upper-triangular :math:`U` with :math:`U U^\top` the precision.
    converged_ : bool
        Whether the best run met ``tol``.
    n_iter_ : int
        Number of EM iterations (M-steps) of the best run in the last fit
        call.
    lower_bound_ : float
        Mean log-likelihood (weighted over clients) at the parameters of the
        last iteration's E-step, as scikit-learn's.
    lower_bounds_ : ndarray
        The lower bound of every iteration of the best run.
    n_clients_ : int
        Number of clients seen in ``fit``.
    history_ : History
        Per-round record: objective (the negative mean log-likelihood),
        update sizes, bits, active clients, time (see
        :class:`skfedmm.History`).
    bits_up_, bits_down_ : int
        Total bits sent by the clients and by the server.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Defined when the clients are DataFrames with string column names.
    problem_ : GaussianMixtureProblem
        The MM problem the engine solved.
    fedmm_state_ : FedMMState
        The full training state, used by ``warm_start``.

    See Also
    --------
    sklearn.mixture.GaussianMixture : The centralized estimator.
    FederatedKMeans : Hard clustering by federated Lloyd iterations.

    References
    ----------
    .. [1] A. Dieuleveut, G. Fort, M. Hegazy, H.-T. Wai. Federated
       Majorize-Minimization: Beyond Parameter Aggregation. arXiv:2507.17534.
    .. [2] A. Dieuleveut, G. Fort, E. Moulines, G. Robin. Federated-EM with
       heterogeneity mitigation and variance reduction. NeurIPS 2021.
    .. [3] A. P. Dempster, N. M. Laird, D. B. Rubin. Maximum likelihood from
       incomplete data via the EM algorithm. JRSS B 39(1), 1977.

    Examples
    --------
    >>> import numpy as np
    >>> from skfedmm import FederatedGaussianMixture
    >>> rng = np.random.default_rng(0)
    >>> clients = [rng.normal(4 * i, 1, size=(100, 2)) for i in range(3)]
    >>> gm = FederatedGaussianMixture(n_components=3, random_state=0).fit(clients)
    >>> gm.means_.shape
    (3, 2)
    >>> gm.predict(clients[0]).shape
    (100,)
    """

    _parameter_constraints = {
        **FederatedMixin._parameter_constraints,
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "covariance_type": [StrOptions({"full", "tied", "diag", "spherical"})],
        "tol": [Interval(Real, 0.0, None, closed="left")],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "init_params": [StrOptions({"kmeans", "k-means++", "random", "random_from_data"})],
        "weights_init": ["array-like", None],
        "means_init": ["array-like", None],
        "precisions_init": ["array-like", None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "verbose_interval": [Interval(Integral, 1, None, closed="left")],
        "n_jobs": [Integral, None],
    }

    _fixed_when_resuming = {
        "n_components": "the statistics' shapes depend on it",
        "covariance_type": "the statistics' shapes depend on it",
        "aggregation": "the training state of one aggregation is not that of the other",
        "init_params": "it sets the initial parameters, which continued training is past",
        "weights_init": "it sets the initial parameters, which continued training is past",
        "means_init": "it sets the initial parameters, which continued training is past",
        "precisions_init": "it sets the initial parameters, which continued training is past",
    }

    def __init__(
        self,
        n_components=1,
        *,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=None,
        verbose=0,
        verbose_interval=10,
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
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.verbose = verbose
        self.verbose_interval = verbose_interval
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
    def _check_initial_parameters(self, n_features, dtype):
        """Validated copies of the given initial parameters (the parameters stay as given)."""
        k, t = self.n_components, self.covariance_type
        out = {}
        if self.weights_init is not None:
            w = check_array(self.weights_init, dtype=dtype, ensure_2d=False, input_name="weights_init")
            _check_shape(w, (k,), "weights")
            if np.any(w < 0) or np.any(w > 1):
                raise ValueError(
                    "The parameter 'weights' should be in the range [0, 1], but got max value "
                    f"{w.max():.5f}, min value {w.min():.5f}"
                )
            if not np.allclose(abs(1.0 - w.sum()), 0.0, atol=1e-6 if dtype == np.float32 else 1e-8):
                raise ValueError(
                    f"The parameter 'weights' should be normalized, but got sum(weights) = {w.sum():.5f}"
                )
            out["weights_init"] = w
        if self.means_init is not None:
            m = check_array(self.means_init, dtype=dtype, ensure_2d=False, input_name="means_init")
            _check_shape(m, (k, n_features), "means")
            out["means_init"] = m
        if self.precisions_init is not None:
            p = check_array(self.precisions_init, dtype=dtype, ensure_2d=False,
                            allow_nd=t == "full", input_name="precisions_init")
            shape = {"full": (k, n_features, n_features), "tied": (n_features, n_features),
                     "diag": (k, n_features), "spherical": (k,)}[t]
            _check_shape(p, shape, f"{t} precision")
            if t in ("full", "tied"):
                for P in (p if t == "full" else p[None]):
                    if not (np.allclose(P, P.T) and np.all(np.linalg.eigvalsh(P) > 0)):
                        raise ValueError(f"'{t} precision' should be symmetric, positive-definite")
            elif np.any(p <= 0):
                raise ValueError(f"'{t} precision' should be positive")
            out["precisions_init"] = p
        return out

    def _make_problem(self, n_features, dtype, seed):
        return GaussianMixtureProblem(
            self.n_components, self.covariance_type, self.reg_covar,
            init_params=self.init_params, random_seed=seed,
            match_components=self.aggregation == "parameter",
            **self._check_initial_parameters(n_features, dtype),
        )

    def _set_theta(self, theta):
        self.weights_ = theta["weights"]
        self.means_ = theta["means"]
        self.covariances_ = theta["covariances"]
        U = theta["precisions_cholesky"]
        self.precisions_cholesky_ = U
        if self.covariance_type == "full":
            self.precisions_ = np.einsum("kij,klj->kil", U, U)
        elif self.covariance_type == "tied":
            self.precisions_ = U @ U.T
        else:
            self.precisions_ = U**2

    def _fit(self, X, client_ids):
        self._validate_params()
        resume = self.warm_start and self._can_resume()
        clients, _ = check_clients(self, X, client_ids, reset=not resume)
        n_samples = sum(Xi.shape[0] for Xi in clients)
        if n_samples < 2:
            raise ValueError(
                f"n_samples={n_samples}: a Gaussian mixture needs at least 2 samples."
            )
        if n_samples < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components but got "
                f"n_components = {self.n_components}, n_samples = {n_samples}"
            )
        dtype = clients[0].dtype
        start = self.fedmm_state_.round if resume else -1

        def record(state):
            self._set_theta(state.theta)
            history = state.history
            self.n_iter_ = state.round - start
            self.lower_bounds_ = -np.asarray(history.objective[start + 1:], dtype=float)
            self.lower_bound_ = float(self.lower_bounds_[-1])
            full = history.full_objective
            self.converged_ = bool(
                self.tol > 0 and len(full) >= 2 and np.isfinite(full[-1]) and np.isfinite(full[-2])
                and abs(full[-1] - full[-2]) < self.tol
            )

        def run(seed):
            self._run_engine(
                clients, self._make_problem(self.n_features_in_, dtype, seed),
                max_iter=self.max_iter if resume else max(self.max_iter - 1, 0),
                tol=self.tol, convergence="absolute", resume=resume, record=record,
                first_step=self.max_iter > 0,
            )
            if self.max_iter == 0:
                # as scikit-learn: the initial parameters, no EM iteration
                self.n_iter_, self.converged_ = 0, False
                self.lower_bound_, self.lower_bounds_ = -np.inf, np.array([])
                return next(runs)  # scikit-learn keeps the last initialization
            return self.lower_bound_

        runs = itertools.count()

        self._best_of(self._seeds(1 if resume else self.n_init), run, lambda a, b: a > b)
        if not self.converged_ and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return clients

    def fit(self, X, y=None, *, client_ids=None):
        """Estimate the mixture's parameters by federated EM.

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
        self._fit(X, client_ids)
        return self

    def fit_predict(self, X, y=None, *, client_ids=None):
        """Fit, then return the most probable component of every training row.

        Each client labels its own rows with the final parameters (as
        scikit-learn's final E-step, so that ``fit_predict(X)`` equals
        ``fit(X).predict(X)``).

        Parameters
        ----------
        X : list of array-like or array-like of shape (n_samples, n_features)
        y : Ignored
        client_ids : array-like of shape (n_samples,), default=None

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            Clients in order when ``X`` is a list.
        """
        clients = self._fit(X, client_ids)
        return _per_row(X, client_ids, clients, self._predict)

    # ------------------------------------------------------------- predict
    def _weighted_log_prob(self, X):
        theta = {
            "weights": self.weights_.astype(X.dtype, copy=False),
            "means": self.means_.astype(X.dtype, copy=False),
            "precisions_cholesky": self.precisions_cholesky_.astype(X.dtype, copy=False),
        }
        # in the rows' dtype, as scikit-learn (a float64 constant would promote float32)
        return weighted_log_prob(X, theta, self.covariance_type).astype(X.dtype, copy=False)

    def _predict(self, X):
        return np.argmax(self._weighted_log_prob(X), axis=1)

    def _check_X(self, X):
        check_is_fitted(self)
        return check_transform_input(self, X, dtype=[np.float64, np.float32])

    def score_samples(self, X):
        """Log-likelihood of every row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        log_prob : ndarray of shape (n_samples,)
        """
        return log_responsibilities(self._weighted_log_prob(self._check_X(X)))[0]

    def score(self, X, y=None):
        """Mean log-likelihood of the rows of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or list of such arrays
            A list of clients is scored on all their rows.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        log_likelihood : float
            A NumPy scalar of the rows' dtype (as scikit-learn's).
        """
        parts = X if is_client_list(X) else [X]
        # a scalar of the rows' dtype, as scikit-learn's
        return np.mean(np.concatenate([self.score_samples(Xi) for Xi in parts]))

    def predict(self, X):
        """Most probable component of every row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        return self._predict(self._check_X(X))

    def predict_proba(self, X):
        """Posterior probability of every component for every row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        resp : ndarray of shape (n_samples, n_components)
        """
        return log_responsibilities(self._weighted_log_prob(self._check_X(X)))[1]

    def sample(self, n_samples=1):
        """Draw rows from the fitted mixture.

        Parameters
        ----------
        n_samples : int, default=1

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,)
            The component of every row.
        """
        check_is_fitted(self)
        if n_samples < 1:
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples} . The sampling requires at "
                "least one sample."
            )
        _, d = self.means_.shape
        rng = check_random_state(self.random_state)
        counts = rng.multinomial(n_samples, self.weights_.astype(np.float64))
        if self.covariance_type == "full":
            X = np.vstack([rng.multivariate_normal(m, c, int(s))
                           for m, c, s in zip(self.means_, self.covariances_, counts)])
        elif self.covariance_type == "tied":
            X = np.vstack([rng.multivariate_normal(m, self.covariances_, int(s))
                           for m, s in zip(self.means_, counts)])
        else:
            X = np.vstack([m + rng.standard_normal(size=(s, d)) * np.sqrt(c)
                           for m, c, s in zip(self.means_, self.covariances_, counts)])
        y = np.concatenate([np.full(s, j, dtype=int) for j, s in enumerate(counts)])
        return X, y

    def _n_parameters(self):
        _, d = self.means_.shape
        k = self.n_components
        cov = {"full": k * d * (d + 1) / 2.0, "diag": k * d, "tied": d * (d + 1) / 2.0,
               "spherical": k}[self.covariance_type]
        return int(cov + d * k + k - 1)

    def bic(self, X):
        """Bayesian information criterion on ``X`` (lower is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        bic : float
        """
        n = np.shape(X)[0]
        return -2 * self.score(X) * n + self._n_parameters() * math.log(n)

    def aic(self, X):
        """Akaike information criterion on ``X`` (lower is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        aic : float
        """
        return -2 * self.score(X) * np.shape(X)[0] + 2 * self._n_parameters()
