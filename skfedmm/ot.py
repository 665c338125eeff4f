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

__all__ = ["FederatedOTMap", "TargetSample"]

#: ``epsilon_scaling="auto"`` scales epsilon when it is below this value
#: (relative to the spread with the default ``normalize_cost="spread"``)...
AUTO_SCALING_BELOW = 0.05
#: ... by this factor per round (see ``benchmarks/bench_ot_epsilon.py``).
AUTO_SCALING_FACTOR = 0.9
#: ``dual_step="auto"`` takes Newton steps for at most this many target points
#: (each client then sends m (m + 1) / 2 second moments per round).
AUTO_NEWTON_MAX_TARGETS = 1000
#: With Newton steps, ``epsilon_scaling="auto"`` multiplies epsilon by this
#: factor each time the marginal error at the current epsilon is at most
#: ``AUTO_NEWTON_SCALING_TOL`` (see ``benchmarks/bench_ot_epsilon.py``).
AUTO_NEWTON_SCALING_FACTOR = 0.2
AUTO_NEWTON_SCALING_TOL = 0.03


class TargetSample:
    """A target sample that cross-validation passes whole to every fit.

    scikit-learn's cross-validation tools (``cross_validate``,
    ``GridSearchCV``, ...) treat every fit parameter with as many rows as
    ``X`` as sample-aligned and cut it to each fold's training rows, and
    pass every other value whole. A target sample is not aligned with the
    source rows, so an array that happens to have as many rows as ``X``
    would be cut. This wrapper has no length, so it is never indexed: use
    it whenever :class:`FederatedOTMap`'s ``target`` is routed through
    cross-validation.

    Parameters
    ----------
    points : array-like of shape (m, n_features) or (m,)
        The target points, validated by :meth:`FederatedOTMap.fit`.

    Examples
    --------
    >>> import numpy as np
    >>> from skfedmm import FederatedOTMap, TargetSample
    >>> X = np.random.default_rng(0).standard_normal((50, 2))
    >>> Y = np.random.default_rng(1).standard_normal((50, 2)) + 3
    >>> ot_map = FederatedOTMap(random_state=0).fit(X, target=TargetSample(Y))
    >>> ot_map.target_.shape
    (50, 2)
    """

    def __init__(self, points):
        self.points = points

    def __repr__(self):
        shape = getattr(self.points, "shape", None)
        what = f"array of shape {shape}" if shape is not None else type(self.points).__name__
        return f"TargetSample(<{what}>)"


def _standard_reference(rng, weights, n_features, dtype):
    """``n`` standard normal points, standardized exactly when ``n > n_features``.

    The weighted sample (weights ``b``) has mean 0 and covariance I exactly
    (the symmetric whitening, the smallest change of the draw); with
    ``n <= n_features`` it is only centred.
    """
    Y = rng.standard_normal((weights.shape[0], n_features))
    Y -= weights @ Y
    if weights.shape[0] > n_features:
        cov = (Y * weights[:, None]).T @ Y
        evals, evecs = np.linalg.eigh(cov)
        if evals.min() > 1e-12 * max(evals.max(), 1.0):
            Y = Y @ (evecs / np.sqrt(evals)) @ evecs.T
    return Y.astype(dtype)


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
    :math:`\nu = \sum_j b_j \delta_{y_j}` is a known sample ``target`` (a
    fit parameter). The fit
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
      :math:`\tfrac12\|x - y\|^2`: :math:`\varepsilon = \epsilon\,\sigma^2`
      with ``normalize_cost="spread"`` (the default), :math:`\varepsilon =
      \epsilon` with ``normalize_cost=None``, :math:`\epsilon` being the
      ``epsilon`` parameter;
    - :math:`\sigma^2` is the spread of the two samples, the mean variance
      per coordinate of the source and of the target, each around its own
      mean:

      .. math::

          \sigma^2 = \frac{1}{2d}\Big(\sum_i w_i \frac{1}{n_i}\sum_{x \in X_i}
          \|x - \bar x\|^2 + \sum_{j=1}^m b_j\|y_j - \bar y\|^2\Big),

      :math:`\bar x` and :math:`\bar y = \sum_j b_j y_j` the two means and
      :math:`d` the number of features (each client sends the mean of its
      rows and their mean squared distance to that mean once; the server
      combines them exactly, by the law of total variance);
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

    **Invariances.** With the squared cost the entropic plan does not change
    when either sample is translated (the cross terms are absorbed by the
    potentials), and :math:`\sigma^2` is computed around each sample's own
    mean, so it does not change either; the potential starts from the
    translation that aligns the two means, so every round is equivariant,
    not only the limit: mapping onto ``target + c`` gives
    ``transform(X) + c``, and translating the source rows does not change
    where they go. Scaling both samples by :math:`s` scales
    :math:`\sigma^2` by :math:`s^2` and the map by :math:`s`. ``epsilon``
    has a meaning of its own: the Gibbs kernel
    :math:`e^{-\|x - y\|^2 / (2\varepsilon)}` is a Gaussian blur of
    standard deviation :math:`\sqrt{\epsilon}\,\sigma` per coordinate, in
    any dimension (the default 0.05 blurs over about 0.22 of the data's
    standard deviation).

    **Entropic bias.** :math:`T_\varepsilon(x)` is the mean of the target
    points under the soft assignment, so the mapped sample is a little
    less spread than the target: between Gaussians of equal variance
    :math:`\sigma^2` per coordinate, the map shrinks variances by the factor
    :math:`\rho^2`, :math:`\rho = \sqrt{1 + \epsilon^2 / 4} - \epsilon / 2
    \approx 1 - \epsilon / 2`, about 0.95 at the default ``epsilon``.
    Lower ``epsilon`` for less bias (more rounds, and a noisier map from a
    small target sample); raise it for a smoother, lower-variance map. The
    blur is the same in every direction, so a coordinate whose scale is
    much smaller than :math:`\sigma` is blurred more: standardize the
    features first when their scales differ widely.

    **Federated normalizing map.** With ``target=None`` the target is a
    seeded sample of ``n_reference`` standard normal points in the source
    dimension, standardized exactly (mean 0 and covariance I under
    ``target_weights``) when ``n_reference > n_features``: the fitted map is
    then a multivariate normalizing (quantile) map of the pooled source
    distribution, learned without pooling the rows. ``transform`` sends the
    source to an approximately standard normal sample (covariance about
    :math:`0.95\,I` at the defaults, by the entropic bias above, for a
    source whose coordinates have comparable spreads; less along a
    coordinate much narrower than the others), for example to standardize
    features jointly across sites, or to compare sites in a common
    reference space.

    **Target, pipelines and cross-validation.** ``y`` is ignored, as in
    every unsupervised transformer, so the map can stand in front of a
    classifier in a :class:`~sklearn.pipeline.Pipeline`. The target sample
    is the keyword-only fit parameter ``target``; with metadata routing
    (``sklearn.set_config(enable_metadata_routing=True)``) request it with
    ``set_fit_request(target=True)``. Cross-validation tools cut every fit
    parameter that has as many rows as ``X`` to each fold's training rows
    (they take it for sample-aligned, like ``client_ids``) and pass others
    whole; a target sample is not aligned with the source rows, so pass
    ``target=TargetSample(Y)``, which every fold receives whole whatever
    its size (a plain array with as many rows as ``X`` would be cut).

    **Continued training.** With ``warm_start`` or :meth:`partial_fit`,
    ``epsilon`` and ``normalize_cost`` may change between calls, and the
    next round uses the new :math:`\varepsilon`. The potential :math:`g`
    is kept (it is in cost units), and so are the statistics, which are
    stored as masses relative to the potential rather than as
    :math:`S = \chi\, e^{-g/\varepsilon}`: the server's masses
    (:math:`b` once the potential has moved, whatever
    :math:`\varepsilon`) and the clients' control variates (offsets
    between a client's masses and the server's). Those were measured at the
    old :math:`\varepsilon`, so for a few rounds the control variates are
    stale offsets, which leaves the aggregate unbiased
    (:math:`V = \sum_i w_i V_i` still holds) and is corrected as clients
    take part. With exact rounds the result is Sinkhorn with an
    :math:`\varepsilon` schedule (for example epsilon-scaling: a few rounds
    at a large value, then the target value). The target, its weights and
    the reference sample (``n_reference``) cannot change: the potential
    and every statistic are indexed by the target points. Nor can
    ``normalize_cost`` go from None to ``"spread"``: the clients did not
    send the moments it needs.
    With epsilon scaling the schedule's factor is part of the parameter,
    relative to ``epsilon``: a continued fit resumes the schedule where it
    stopped (towards the new ``epsilon``), and ``epsilon_scaling=None``
    moves to ``epsilon`` at once; a fit started without scaling continues
    without it.

    **POT.** The numbers, not the interface, are those of POT's
    ``ot.da.SinkhornTransport(reg_e=2 * epsilon_)`` on the pooled rows
    (POT's squared Euclidean cost has no :math:`\tfrac12`) with uniform
    target weights: at convergence :meth:`transform` equals its continuous
    out-of-sample map (``out_of_sample_map="continuous"``, POT's default).
    The interface differs (``fit(X, target=...)`` instead of
    ``fit(Xs=..., Xt=...)``; no ``coupling_``, which would be an
    ``n x m`` matrix the server never sees; no ``inverse_transform``).

    Parameters
    ----------
    epsilon : float, default=0.05
        Entropic regularization, > 0: relative to the spread
        :math:`\sigma^2` with ``normalize_cost="spread"``, in the units of
        :math:`\tfrac12\|x - y\|^2` otherwise. Smaller values give a sharper,
        less biased map and need more rounds.
    normalize_cost : {"spread", None}, default="spread"
        ``"spread"``: :math:`\varepsilon = \epsilon\,\sigma^2`, which the
        server computes exactly before the initial round (each client sends
        the mean of its rows and their mean squared distance to that mean);
        the potential then starts from that of the translation aligning the
        two means, and the fit is translation and scale equivariant.
        ``None``: ``epsilon`` is absolute, the potential starts at 0 and the
        clients send nothing before the initial round (the map is then
        equivariant only up to ``tol``).
    epsilon_scaling : "auto", float in (0, 1) or None, default="auto"
        Epsilon scaling: the first round uses a large regularization, the
        data's spread (``epsilon`` 1; the target's spread with
        ``normalize_cost=None``), and each round multiplies it by this
        factor down to ``epsilon``; the potential of one value warm-starts
        the next, so small ``epsilon`` needs far fewer rounds (at
        ``epsilon=0.01``, 77 instead of 254 rounds to a marginal error of
        1e-2 on 4 clients x 300 rows in dimension 4). The schedule is part
        of the broadcast parameter (``fedmm_state_.theta`` is then
        ``{"potential", "epsilon_factor"}``): with exact rounds the fit is
        Sinkhorn with that schedule on the pooled rows, however the rows
        are split, and ``tol`` counts only rounds at ``epsilon``. "auto":
        0.9 when ``epsilon < 0.05`` and ``aggregation="surrogate"``, None
        otherwise (at 0.05 and above plain rounds converge about as fast).
        None: every round at ``epsilon``. Needs
        ``aggregation="surrogate"``. With Newton steps (``dual_step``),
        "auto" is adaptive: epsilon is multiplied by 0.2 each time the
        round's marginal error at the current value is at most 0.03 (the
        server knows it from the aggregated masses), and a float ``q``
        multiplies it by ``q`` every round.
    dual_step : {"auto", "sinkhorn", "newton"}, default="auto"
        How the server moves the potential each round. ``"sinkhorn"``:
        Sinkhorn's update :math:`g \leftarrow g + \varepsilon \log(b / r)`
        (the clients send their ``m`` masses). ``"newton"``: the clients
        also send the mean second moment of their soft assignments,
        :math:`\frac{1}{n_i}\sum_x \chi(x)\chi(x)^\top` (its upper
        triangle, :math:`m(m+1)/2` numbers, and :math:`m^2` operations per
        row), which gives the server the semi-dual's exact Hessian; the
        server then takes a majorized (Levenberg-Marquardt) Newton step
        whose length comes from a bound on the objective, or Sinkhorn's step
        when that one's bound is lower, so the objective at the current
        epsilon never increases in exact rounds, and with exact rounds the
        fit is still the same pooled solver however the rows are split.
        Needs exact rounds (``participation=1``, no ``compression``, full
        batches): with estimated gradients and Hessians the bound does not
        hold and the steps are not safe. Far fewer rounds at small
        ``epsilon`` (at ``epsilon=1e-3``, a marginal error of 1e-3 in 33
        rounds instead of more than 1000 on 4 clients x 300 rows in
        dimension 4, 300 target points), for larger messages and client
        work. ``"auto"``: ``"newton"`` when ``epsilon < 0.05``,
        ``aggregation="surrogate"``, rounds are exact (``participation=1``,
        no ``compression``, full batches) and there are at most 1000 target
        points; ``"sinkhorn"`` otherwise. A continued fit keeps the dual
        step of the fit it continues (the statistics' layout depends on it).
    kernel_dtype : {"float32", "float64"} or None, default=None
        Precision of the clients' soft-assignment blocks (logits and
        exponentials; masses are accumulated in float64). None: the data's
        dtype. ``"float32"`` on float64 data is about twice as fast; the
        soft assignments then carry a relative error of about
        :math:`2^{-24} \|x - \bar y\| \|y_j - \bar y\| / \varepsilon`
        and so does the map (measured: within 3e-5 of the data's standard
        deviation for 200,000 rows in dimension 10 at the default
        ``epsilon``; a round there took 1.5 s instead of 2.7 s on two
        shared cores).
    max_iter : int, default=1000
        Maximum number of FedMM rounds after the initial round.
    tol : float, default=1e-4
        Stop when the marginal error :math:`\|\sum_i w_i \bar\chi_i - b\|_1`
        (measured by the round; an estimate with partial participation,
        compression or minibatches) is at most ``tol``. 0 runs ``max_iter``
        rounds.
    n_reference : int, default=1000
        Number of standard normal reference points when ``target`` is None.
    target_weights : array-like of shape (m,), default=None
        Positive weights of the target points (normalized to sum to 1);
        uniform when None. With ``target=None`` it has ``n_reference``
        entries.
    n_jobs : int, default=None
        Clients run in parallel with joblib (any backend chosen with
        :func:`joblib.parallel_config`). Results do not depend on it.
    random_state : int, RandomState instance or None, default=None
        Seeds every draw: the reference sample, participation, minibatches,
        compression.
    verbose : int, default=0
        Report progress per round (a tqdm bar when tqdm is installed).
    callback : callable, default=None
        Called after every round, the initial one included, with a dict
        (``round``, ``theta``, ``history``); returning True stops the fit.
    """ + FEDERATED_PARAMS_DOC + r"""
    Attributes
    ----------
    potential_ : ndarray of shape (m,)
        The dual potential :math:`g` on the target points, in the units of
        the cost, with mean zero (the gauge).
    target_ : ndarray of shape (m, `n_features_in_`)
        The target points (a copy of ``target``, or the reference sample).
    target_weights_ : ndarray of shape (m,)
        The target weights :math:`b`, summing to 1.
    epsilon_ : float
        The regularization :math:`\varepsilon` in cost units
        (``epsilon * cost_scale_``): POT's ``reg_e`` for the same problem is
        ``2 * epsilon_`` (POT's squared Euclidean cost has no 1/2). Larger
        (with a ConvergenceWarning) if the fit stopped before epsilon
        scaling reached ``epsilon``: the value ``potential_`` belongs to.
    cost_scale_ : float
        The spread :math:`\sigma^2` (1 when ``normalize_cost`` is None).
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
    TargetSample : Wrap the target so that cross-validation passes it whole.
    ot.da.SinkhornTransport : POT's centralized estimator; with
        ``reg_e = 2 * epsilon_`` its continuous out-of-sample map gives the
        same numbers on the pooled rows.
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
    >>> ot_map = FederatedOTMap(epsilon=0.05, random_state=0).fit(clients, target=target)
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
        "normalize_cost": [StrOptions({"spread"}), None],
        "epsilon_scaling": [StrOptions({"auto"}), Interval(Real, 0, 1, closed="neither"), None],
        "dual_step": [StrOptions({"auto", "sinkhorn", "newton"})],
        "kernel_dtype": [StrOptions({"float32", "float64"}), None],
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
        "target_weights": (
            "the potential and the statistics are those of the target points with their "
            "weights"
        ),
    }

    def __init__(
        self,
        epsilon=0.05,
        *,
        normalize_cost="spread",
        epsilon_scaling="auto",
        dual_step="auto",
        kernel_dtype=None,
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
        learning_rate="auto",
        mu=0.01,
        client_weights="proportional",
        eval_every=None,
        min_clients=1,
        client_timeout=None,
        warm_start=False,
    ):
        self.epsilon = epsilon
        self.normalize_cost = normalize_cost
        self.epsilon_scaling = epsilon_scaling
        self.dual_step = dual_step
        self.kernel_dtype = kernel_dtype
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
        self.learning_rate = learning_rate
        self.mu = mu
        self.client_weights = client_weights
        self.eval_every = eval_every
        self.min_clients = min_clients
        self.client_timeout = client_timeout
        self.warm_start = warm_start

    # ------------------------------------------------------------------ fit
    def _check_params(self):
        self._validate_params()

    def _check_weights(self, m):
        """The target weights ``b``, validated and normalized."""
        if self.target_weights is None:
            return np.full(m, 1.0 / m)
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
        return weights / weights.sum()

    def _check_target(self, target, n_features, dtype):
        """The target points and weights, validated, in the clients' dtype."""
        if isinstance(target, TargetSample):
            target = target.points
        if target is None:
            weights = self._check_weights(self.n_reference)
            rng = np.random.default_rng(_reference_seed(self.random_state))
            return _standard_reference(rng, weights, n_features, dtype), weights
        try:
            points = check_array(
                target, ensure_2d=False, dtype=[np.float64, np.float32], input_name="target"
            )
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"target (the target sample): {exc}") from exc
        if points.ndim == 1:
            points = points.reshape(-1, 1)
        if points.ndim != 2:
            raise ValueError(
                f"target (the target sample) must be 1-D (points on the line) or 2-D "
                f"(m points x n_features), got shape {points.shape}."
            )
        if points.shape[1] != n_features:
            raise ValueError(
                f"target (the target sample) has {points.shape[1]} feature(s) but the source "
                f"X has {n_features}: the cost 1/2 ||x - y||^2 needs points of the same "
                "dimension (a 1-D target is read as points on the line)."
            )
        points = np.array(points, dtype=dtype, copy=True)
        return points, self._check_weights(points.shape[0])

    def _newton(self, m, resume=False):
        """Whether the server takes Newton steps (``dual_step`` resolved)."""
        if resume:  # the statistics' layout is that of the fit being continued
            return bool(getattr(self.fedmm_state_.problem, "newton", False))
        exact = (
            self.participation == 1 and self.compression is None and self.batch_size is None
        )
        if self.dual_step == "newton":
            if self.aggregation != "surrogate" or not exact:
                raise ValueError(
                    "dual_step='newton' needs aggregation='surrogate' and exact rounds "
                    "(participation=1, no compression, batch_size=None): the server's step "
                    "uses the exact Hessian of the aggregated statistics; use "
                    "dual_step='sinkhorn'."
                )
            return True
        if self.dual_step == "sinkhorn":
            return False
        return bool(
            self.aggregation == "surrogate" and self.epsilon < AUTO_SCALING_BELOW and exact
            and m <= AUTO_NEWTON_MAX_TARGETS
        )

    def _scaling_factor(self, newton=False):
        """The per-round factor of the epsilon schedule, or None (no scaling)."""
        scaling = self.epsilon_scaling
        if scaling == "auto":
            if self.aggregation != "surrogate" or self.epsilon >= AUTO_SCALING_BELOW:
                return None
            return AUTO_NEWTON_SCALING_FACTOR if newton else AUTO_SCALING_FACTOR
        if scaling is not None and self.aggregation != "surrogate":
            raise ValueError(
                "epsilon_scaling needs aggregation='surrogate': averaged local potentials "
                "would average their epsilon schedules too; use epsilon_scaling=None."
            )
        return scaling

    def _make_problem(self, target, weights, resume=False):
        newton = self._newton(target.shape[0], resume)
        adaptive = newton and self.epsilon_scaling == "auto"
        return EntropicOTProblem(
            target, weights, epsilon=self.epsilon, normalize_cost=self.normalize_cost,
            epsilon_scaling=self._scaling_factor(newton), kernel_dtype=self.kernel_dtype,
            newton=newton, scaling_tol=AUTO_NEWTON_SCALING_TOL if adaptive else None,
        )

    def fit(self, X, y=None, *, target=None, client_ids=None):
        """Learn the potential of the map from the clients' rows onto ``target``.

        Parameters
        ----------
        X : list of array-like of shape (n_i, n_features), or array-like of shape (n_samples, n_features)
            The source: one array per client, or all rows (split by
            ``client_ids``; one client when it is None). Never modified.
        y : None
            Ignored (present for API consistency: the map can precede a
            supervised estimator in a pipeline).
        target : array-like of shape (m, n_features) or (m,), or TargetSample, default=None
            The target sample (a 1-D ``target`` is ``m`` points on the
            line, for a source with one feature). None: a standard normal
            reference sample of ``n_reference`` points, drawn from
            ``random_state`` (a federated normalizing map). With
            ``warm_start`` the previous fit's target is kept (``target`` must
            then be None or the same). A routable fit parameter
            (``set_fit_request(target=True)``); wrap it in
            :class:`TargetSample` when it goes through cross-validation.
        client_ids : array-like of shape (n_samples,), default=None
            The client of each row when ``X`` is one array.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        resume = self.warm_start and self._can_resume()
        clients, _ = check_clients(self, X, client_ids, reset=not resume)
        self._fit_rounds(clients, target, self.max_iter, self.tol, resume)
        return self

    def partial_fit(self, X, y=None, *, target=None, client_ids=None):
        """Run one FedMM round on the given clients (streaming use).

        The first call initializes (the initial full round, with
        ``target``) and runs one round; later calls continue from the full
        training state, each client computing its masses on the rows it
        gives in that call. The number of clients and the target stay those
        of the first call; ``epsilon`` and ``normalize_cost`` may change
        (see "Continued training" above).

        Parameters
        ----------
        X : list of array-like of shape (n_i, n_features), or array-like of shape (n_samples, n_features)
            The clients' current rows.
        y : None
            Ignored.
        target : array-like of shape (m, n_features) or (m,), or TargetSample, default=None
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
        self._fit_rounds(clients, target, 1, 0.0, resume, warn=False)
        return self

    def _check_resumed_target(self, target):
        """The previous fit's target, after checking that the call keeps it."""
        previous = self.target_
        if target is not None:
            new, _ = self._check_target(target, self.n_features_in_, previous.dtype)
            if not np.array_equal(new, previous):
                raise ValueError(
                    "target differs from the target of the fit being continued: the potential "
                    "and every statistic are indexed by the target points, so the target "
                    "cannot change when training continues; set warm_start=False (or fit a new "
                    "estimator) to map onto a new target."
                )
        elif getattr(self, "_reference_size", None) is not None and self.n_reference != self._reference_size:
            raise ValueError(
                f"n_reference changed from {self._reference_size} to {self.n_reference} since "
                "the previous fit, but it cannot change when training continues (the potential "
                "and every statistic are indexed by the reference points); set "
                "warm_start=False (or fit a new estimator) to use a new reference sample."
            )
        if self.normalize_cost is not None and self.fedmm_state_.init_stat is None:
            raise ValueError(
                f"normalize_cost changed from None to {self.normalize_cost!r} since the previous "
                "fit, but it cannot when training continues: the clients sent no moments for "
                "the spread in the initial round; set warm_start=False (or fit a new estimator)."
            )
        return previous, self.target_weights_

    def _fit_rounds(self, clients, target, max_iter, tol, resume, warn=True):
        self._check_params()
        if resume:
            target, weights = self._check_resumed_target(target)
            reference_size = getattr(self, "_reference_size", None)
        else:
            reference_size = None if target is not None else self.n_reference
            target, weights = self._check_target(target, self.n_features_in_, clients[0].dtype)

        def record(state):
            self.potential_, factor = EntropicOTProblem._unpack(state.theta)
            self._epsilon_factor = factor
            self.target_ = target
            self.target_weights_ = weights
            self._reference_size = reference_size
            self.cost_scale_ = float(state.problem.cost_scale_)
            self.epsilon_ = float(state.problem.reg_) * factor

        state = self._run_engine(
            clients,
            self._make_problem(target, weights, resume),
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
        if self._epsilon_factor != 1.0:
            if warn:
                warnings.warn(
                    f"FederatedOTMap stopped after {self.n_iter_} rounds while epsilon was still "
                    f"being scaled down (epsilon_ is {self._epsilon_factor:.3g} times the "
                    "requested value); increase max_iter.",
                    ConvergenceWarning,
                )
        elif warn and tol > 0 and not error <= tol:
            warnings.warn(
                f"FederatedOTMap did not reach tol={tol:g} in {self.n_iter_} rounds "
                f"(marginal error {error:.3g}); increase max_iter or epsilon.",
                ConvergenceWarning,
            )

    def fit_transform(self, X, y=None, *, target=None, client_ids=None):
        """Fit, then map the training rows.

        Parameters
        ----------
        X : list of array-like or array-like of shape (n_samples, n_features)
        y : None
            Ignored.
        target : array-like of shape (m, n_features) or (m,), or TargetSample, default=None
        client_ids : array-like of shape (n_samples,), default=None

        Returns
        -------
        X_new : ndarray of shape (n_samples, n_features)
            The mapped rows, clients in order when ``X`` is a list.
        """
        self.fit(X, target=target, client_ids=client_ids)
        if is_client_list(X):
            return np.vstack([self.transform(Xi) for Xi in X])
        return self.transform(X)

    # ------------------------------------------------------------ transform
    def _fitted_problem(self, dtype):
        problem = EntropicOTProblem(
            self.target_.astype(dtype, copy=False), self.target_weights_,
            epsilon=self.epsilon_, normalize_cost=None, kernel_dtype=self.kernel_dtype,
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
