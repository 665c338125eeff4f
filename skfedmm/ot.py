"""FederatedOTMap: an entropic optimal-transport map learned from clients' data."""

import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted

from ._base import FEDERATED_PARAMS_DOC, FederatedMixin
from ._params import Interval, StrOptions
from ._clients import check_clients, check_transform_input, is_client_list
from .problems.ot import EntropicOTProblem

__all__ = ["FederatedOTMap"]


def _reference_seed(random_state):
    """A seed for the reference sample, drawn from ``random_state``."""
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(np.iinfo(np.int32).max))
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


class FederatedOTMap(FederatedMixin, OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    # The docstring shares the federated parameters' block, so it is built by
    # concatenation (which a bare string literal in a class body cannot be).
    __doc__ = r"""Entropic optimal-transport map from data spread over clients, trained by FedMM.

    The source distribution :math:`\mu = \sum_i w_i \mu_i` is the pooled
    rows of all clients, who never send a row; the target
    :math:`\nu = \sum_j b_j \delta_{y_j}` is a known sample ``y``. The fit
    learns the dual potential :math:`g` of semi-discrete entropic optimal
    transport,

    .. math::

        \min_{g \in \mathbb{R}^m} \; -\langle b, g\rangle + \varepsilon
        \sum_i w_i \frac{1}{n_i} \sum_{x \in X_i} \log \sum_{j=1}^m b_j
        \exp\Big(\frac{g_j - \tfrac12 \|x - y_j\|^2}{\varepsilon}\Big),

    and :meth:`transform` applies the entropic (barycentric) map

    .. math::

        T_\varepsilon(x) = \sum_{j=1}^m \chi_j(x; g)\, y_j, \qquad
        \chi_j(x; g) = \frac{b_j e^{(g_j - \frac12\|x - y_j\|^2)/\varepsilon}}
        {\sum_k b_k e^{(g_k - \frac12\|x - y_k\|^2)/\varepsilon}},

    where:

    - :math:`X_i` holds the :math:`n_i` rows of client :math:`i` and
      :math:`w_i` its weight (``client_weights``);
    - :math:`y_j` are the ``m`` target points, :math:`b_j` their weights
      (``target_weights``, uniform by default);
    - :math:`\varepsilon` is the regularization in the units of the cost
      :math:`\tfrac12\|x - y\|^2`: ``epsilon`` times the mean transport cost
      :math:`\bar c = \mathbb{E}_{\mu\otimes\nu} \tfrac12\|x - y\|^2` with
      ``normalize_cost="mean"`` (so ``epsilon`` is scale-free), ``epsilon``
      itself with ``normalize_cost=None``;
    - :math:`\chi(x; g)` is the soft assignment of :math:`x` to the target
      points, computed by a stable log-sum-exp.

    :math:`T_\varepsilon` estimates the Monge map pushing :math:`\mu` onto
    :math:`\nu` (Pooladian and Niles-Weed, 2021); it tends to the optimal
    map as :math:`\varepsilon \to 0` and the samples grow.

    Sinkhorn's update of :math:`g` is an MM step whose statistic is the mean
    soft assignment :math:`\bar\chi_i = \frac{1}{n_i}\sum_{x\in X_i}
    \chi(x; g)` (the mass each client sends to each target point). Each
    round the active clients send those masses (through control variates
    and an optional compressor), the server aggregates them *exactly* and
    sets :math:`g \leftarrow g + \varepsilon \log(b / r)`, :math:`r` the
    aggregated masses (mixed with :math:`b` by the step size). With full
    participation, no compression and full batches this is exactly
    Sinkhorn's algorithm on the pooled rows, however the rows are split.
    Averaging the clients' own Sinkhorn potentials instead
    (``aggregation="parameter"``) is biased when clients differ.

    **Federated normalizing map.** With ``y=None`` the target is a seeded
    standard normal sample of ``n_reference`` points in the source
    dimension: the fitted map is then a multivariate normalizing (quantile)
    map of the pooled source distribution, learned without pooling the
    rows: ``transform`` sends the source to an approximately standard
    normal sample, for example to standardize features jointly across
    sites, or to compare sites in a common reference space.

    Parameters
    ----------
    epsilon : float, default=0.05
        Entropic regularization, > 0: relative to the mean transport cost
        with ``normalize_cost="mean"``, in the units of
        :math:`\tfrac12\|x - y\|^2` otherwise. Smaller values give a sharper
        map and need more rounds.
    normalize_cost : {"mean", None}, default="mean"
        ``"mean"``: divide the costs by the mean transport cost between the
        source and the target, which the initial round computes exactly
        (each client sends its mean squared distance to the target mean).
        ``None``: ``epsilon`` is absolute.
    max_iter : int, default=1000
        Maximum number of FedMM rounds after the initial round.
    tol : float, default=1e-4
        Stop when the marginal error :math:`\|\sum_i w_i \bar\chi_i - b\|_1`
        (measured by the round; an estimate with partial participation,
        compression or minibatches) is at most ``tol``. 0 runs ``max_iter``
        rounds.
    n_reference : int, default=1000
        Number of standard normal reference points when ``y`` is None.
    target_weights : array-like of shape (m,), default=None
        Positive weights of the target points (normalized to sum to 1);
        uniform when None. With ``y=None`` it has ``n_reference`` entries.
    n_jobs : int, default=None
        Clients run in parallel with joblib (any backend chosen with
        :func:`joblib.parallel_config`). Results do not depend on it.
    random_state : int, RandomState instance or None, default=None
        Seeds every draw: the reference sample, participation, minibatches,
        compression.
    verbose : int, default=0
        Report progress per round (a tqdm bar when tqdm is installed).
    callback : callable, default=None
        Called after every round with a dict (``round``, ``theta``,
        ``history``); returning True stops the fit.
    """ + FEDERATED_PARAMS_DOC + r"""
    Attributes
    ----------
    potential_ : ndarray of shape (m,)
        The dual potential :math:`g` on the target points, in the units of
        the cost, with mean zero (the gauge).
    target_ : ndarray of shape (m, `n_features_in_`)
        The target points (a copy of ``y``, or the reference sample).
    target_weights_ : ndarray of shape (m,)
        The target weights :math:`b`, summing to 1.
    epsilon_ : float
        The regularization :math:`\varepsilon` in cost units
        (``epsilon * cost_scale_``): POT's ``reg_e`` for the same problem is
        ``2 * epsilon_`` (POT's squared Euclidean cost has no 1/2).
    cost_scale_ : float
        The mean transport cost :math:`\bar c` (1 when ``normalize_cost`` is
        None).
    marginal_error_ : float
        :math:`\|\sum_i w_i \bar\chi_i - b\|_1` measured by the last round
        (at the potential before its last update; an estimate when rounds
        are noisy). With ``aggregation="parameter"``, or when no round ran,
        it is computed exactly on all clients at the end of the fit.
    n_iter_ : int
        Number of rounds run.
    n_clients_ : int
        Number of clients seen in ``fit``.
    history_ : History
        Per-round record (see :class:`skfedmm.History`); ``mean_field`` is
        the marginal error of each round.
    bits_up_, bits_down_ : int
        Total bits sent by the clients and by the server.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Defined when the clients are DataFrames with string column names.
    problem_ : EntropicOTProblem
        The MM problem the engine solved.
    fedmm_state_ : FedMMState
        The full training state (server statistic, control variates, random
        streams), used by ``warm_start``.

    See Also
    --------
    ot.da.SinkhornTransport : POT's centralized estimator; with
        ``out_of_sample_map="continuous"`` it maps new points the same way.
    FederatedDictionaryLearning : Dictionary learning, trained the same way.

    References
    ----------
    .. [1] M. Cuturi. Sinkhorn distances: lightspeed computation of optimal
       transport. NeurIPS 2013.
    .. [2] A. Genevay, M. Cuturi, G. Peyré, F. Bach. Stochastic optimization
       for large-scale optimal transport. NeurIPS 2016.
    .. [3] A.-A. Pooladian, J. Niles-Weed. Entropic estimation of optimal
       transport maps. arXiv:2109.12004, 2021.
    .. [4] A. Dieuleveut, G. Fort, M. Hegazy, H.-T. Wai. Federated
       Majorize-Minimization: Beyond Parameter Aggregation. arXiv:2507.17534,
       2025.
    .. [5] A. Dieuleveut, G. Fort, E. Moulines, G. Robin. Federated-EM with
       heterogeneity mitigation and variance reduction. NeurIPS 2021.

    Examples
    --------
    >>> import numpy as np
    >>> from skfedmm import FederatedOTMap
    >>> rng = np.random.default_rng(0)
    >>> clients = [rng.standard_normal((200, 2)) * 0.5 + i for i in range(3)]
    >>> target = rng.standard_normal((100, 2))
    >>> ot_map = FederatedOTMap(epsilon=0.05, random_state=0).fit(clients, target)
    >>> ot_map.transform(clients[0]).shape
    (200, 2)
    >>> bool(ot_map.marginal_error_ <= 1e-4)
    True

    A federated normalizing map (standard normal reference target):

    >>> Z = FederatedOTMap(n_reference=200, random_state=0).fit_transform(clients)
    >>> Z.shape
    (600, 2)
    """

    _parameter_constraints = {
        **FederatedMixin._parameter_constraints,
        "epsilon": [Interval(Real, 0, None, closed="neither")],
        "normalize_cost": [StrOptions({"mean"}), None],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "n_reference": [Interval(Integral, 1, None, closed="left")],
        "target_weights": ["array-like", None],
        "n_jobs": [Integral, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "callback": [callable, None],
    }

    _fixed_when_resuming = {
        "aggregation": "the training state of one aggregation is not that of the other",
    }

    def __init__(
        self,
        epsilon=0.05,
        *,
        normalize_cost="mean",
        max_iter=1000,
        tol=1e-4,
        n_reference=1000,
        target_weights=None,
        n_jobs=None,
        random_state=None,
        verbose=0,
        callback=None,
        aggregation="surrogate",
        participation=1.0,
        participation_scheme="bernoulli",
        compression=None,
        step_size="auto",
        cv_rate="auto",
        batch_size=None,
        local_steps=1,
        client_weights="proportional",
        eval_every=None,
        min_clients=1,
        client_timeout=None,
        warm_start=False,
    ):
        self.epsilon = epsilon
        self.normalize_cost = normalize_cost
        self.max_iter = max_iter
        self.tol = tol
        self.n_reference = n_reference
        self.target_weights = target_weights
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose
        self.callback = callback
        self.aggregation = aggregation
        self.participation = participation
        self.participation_scheme = participation_scheme
        self.compression = compression
        self.step_size = step_size
        self.cv_rate = cv_rate
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.client_weights = client_weights
        self.eval_every = eval_every
        self.min_clients = min_clients
        self.client_timeout = client_timeout
        self.warm_start = warm_start

    # ------------------------------------------------------------------ fit
    def _check_params(self):
        self._validate_params()

    def _check_target(self, y, n_features, dtype):
        """The target points and weights, validated, in the clients' dtype."""
        if y is None:
            rng = np.random.default_rng(_reference_seed(self.random_state))
            target = rng.standard_normal((self.n_reference, n_features)).astype(dtype)
        else:
            try:
                target = check_array(
                    y, ensure_2d=False, dtype=[np.float64, np.float32], input_name="y"
                )
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"y (the target sample): {exc}") from exc
            if target.ndim == 1:
                target = target.reshape(-1, 1)
            if target.ndim != 2:
                raise ValueError(
                    f"y (the target sample) must be 1-D (points on the line) or 2-D "
                    f"(m points x n_features), got shape {target.shape}."
                )
            if target.shape[1] != n_features:
                raise ValueError(
                    f"y (the target sample) has {target.shape[1]} feature(s) but the source "
                    f"X has {n_features}: the cost 1/2 ||x - y||^2 needs points of the same "
                    "dimension (a 1-D y is read as points on the line)."
                )
            target = np.array(target, dtype=dtype, copy=True)
        m = target.shape[0]
        if self.target_weights is None:
            weights = np.full(m, 1.0 / m)
        else:
            try:
                weights = check_array(
                    self.target_weights, ensure_2d=False, dtype=np.float64,
                    input_name="target_weights",
                )
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"target_weights: {exc}") from exc
            if weights.shape != (m,):
                raise ValueError(
                    f"target_weights has shape {weights.shape}; expected ({m},), one weight "
                    "per target point."
                )
            if np.any(weights <= 0):
                raise ValueError(
                    "target_weights must be strictly positive (drop the target points with "
                    "zero weight)."
                )
            weights = weights / weights.sum()
        return target, weights

    def _make_problem(self, target, weights):
        return EntropicOTProblem(
            target, weights, epsilon=self.epsilon, normalize_cost=self.normalize_cost,
        )

    def fit(self, X, y=None, *, client_ids=None):
        """Learn the potential of the map from the clients' rows onto ``y``.

        Parameters
        ----------
        X : list of array-like of shape (n_i, n_features), or array-like of shape (n_samples, n_features)
            The source: one array per client, or all rows (split by
            ``client_ids``; one client when it is None). Never modified.
        y : array-like of shape (m, n_features) or (m,), default=None
            The target sample (a 1-D ``y`` is ``m`` points on the line, for a
            source with one feature). None: a standard normal reference
            sample of ``n_reference`` points, drawn from ``random_state``
            (a federated normalizing map). With ``warm_start`` the previous
            fit's target is kept (``y`` must then be None or the same).
        client_ids : array-like of shape (n_samples,), default=None
            The client of each row when ``X`` is one array.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        resume = self.warm_start and self._can_resume()
        clients, _ = check_clients(self, X, client_ids, reset=not resume)
        self._fit_rounds(clients, y, self.max_iter, self.tol, resume)
        return self

    def partial_fit(self, X, y=None, *, client_ids=None):
        """Run one FedMM round on the given clients (streaming use).

        The first call initializes (the initial full round, with the target
        ``y``) and runs one round; later calls continue from the full
        training state, each client computing its masses on the rows it
        gives in that call. The number of clients and the target stay those
        of the first call.

        Parameters
        ----------
        X : list of array-like of shape (n_i, n_features), or array-like of shape (n_samples, n_features)
            The clients' current rows.
        y : array-like of shape (m, n_features) or (m,), default=None
            The target sample, used by the first call (None afterwards, or
            the same target).
        client_ids : array-like of shape (n_samples,), default=None
            The client of each row when ``X`` is one array.

        Returns
        -------
        self : object
        """
        resume = self._can_resume()
        clients, _ = check_clients(self, X, client_ids, reset=not resume)
        self._fit_rounds(clients, y, 1, 0.0, resume, warn=False)
        return self

    def _fit_rounds(self, clients, y, max_iter, tol, resume, warn=True):
        self._check_params()
        if resume:
            target, weights = self.target_, self.target_weights_
            if y is not None:
                new_target, _ = self._check_target(y, self.n_features_in_, target.dtype)
                if not np.array_equal(new_target, target):
                    raise ValueError(
                        "Training continues from the previous fit, whose target differs from "
                        "this y; fit a new estimator (or set warm_start=False) for a new target."
                    )
        else:
            target, weights = self._check_target(y, self.n_features_in_, clients[0].dtype)
        def record(state):
            self.potential_ = state.theta
            self.target_ = target
            self.target_weights_ = weights
            self.cost_scale_ = float(state.problem.cost_scale_)
            self.epsilon_ = float(state.problem.reg_)

        state = self._run_engine(
            clients,
            self._make_problem(target, weights),
            max_iter=max_iter, tol=tol, convergence="mean_field", resume=resume, record=record,
        )
        problem = self.problem_
        mean_field = np.asarray(state.history.mean_field, dtype=float)
        if self.aggregation == "surrogate" and state.round > 0:
            error = float(mean_field[-1])
        else:
            engine = self._make_engine(problem, max_iter=0, tol=0.0, convergence="mean_field")
            _, stat = engine.evaluate(clients, state.theta, state.weights, state=state)
            error = float(np.abs(stat["mass"].astype(np.float64) - weights).sum())
        self.marginal_error_ = error
        if warn and tol > 0 and not error <= tol:
            warnings.warn(
                f"FederatedOTMap did not reach tol={tol:g} in {self.n_iter_} rounds "
                f"(marginal error {error:.3g}); increase max_iter or epsilon.",
                ConvergenceWarning,
            )

    def fit_transform(self, X, y=None, *, client_ids=None):
        """Fit, then map the training rows.

        Parameters
        ----------
        X : list of array-like or array-like of shape (n_samples, n_features)
        y : array-like of shape (m, n_features) or (m,), default=None
        client_ids : array-like of shape (n_samples,), default=None

        Returns
        -------
        X_new : ndarray of shape (n_samples, n_features)
            The mapped rows, clients in order when ``X`` is a list.
        """
        self.fit(X, y, client_ids=client_ids)
        if is_client_list(X):
            return np.vstack([self.transform(Xi) for Xi in X])
        return self.transform(X)

    # ------------------------------------------------------------ transform
    def _fitted_problem(self, dtype):
        problem = EntropicOTProblem(
            self.target_.astype(dtype, copy=False), self.target_weights_,
            epsilon=self.epsilon_, normalize_cost=None,
        )
        return problem

    def transform(self, X):
        r"""Map rows with the entropic map :math:`T_\varepsilon(x) = \sum_j \chi_j(x; g) y_j`.

        Rows are processed in chunks (no ``n x m`` block over the memory
        budget).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        X_new : ndarray of shape (n_samples, n_features)
            The mapped rows, in the dtype of ``X`` (float32 or float64).
        """
        check_is_fitted(self)
        X = check_transform_input(self, X, dtype=[np.float64, np.float32])
        return self._fitted_problem(X.dtype).barycentric_map(X, self.potential_)

    def predict(self, X):
        """Alias of :meth:`transform`: the mapped rows.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        X_new : ndarray of shape (n_samples, n_features)
        """
        return self.transform(X)

    def soft_assignments(self, X):
        r"""The soft assignments :math:`\chi(x; g)` of rows to the target points.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        chi : ndarray of shape (n_samples, m)
            Rows sum to 1 (an ``n x m`` array: for moderate inputs).
        """
        check_is_fitted(self)
        X = check_transform_input(self, X, dtype=[np.float64, np.float32])
        return self._fitted_problem(X.dtype).soft_assignments(X, self.potential_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.target_tags.required = False
        return tags
