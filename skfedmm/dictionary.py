"""FederatedDictionaryLearning: a federated drop-in for sklearn's DictionaryLearning."""

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.decomposition import sparse_encode
from sklearn.utils.validation import check_array, check_is_fitted

from ._base import FEDERATED_PARAMS_DOC, FederatedMixin
from ._params import Interval, StrOptions
from ._clients import (
    check_clients,
    check_per_client_rows,
    check_sample_weight,
    check_transform_input,
    is_client_list,
)
from .problems.dictionary import DictionaryLearningProblem, lasso_objective

__all__ = ["FederatedDictionaryLearning"]


class FederatedDictionaryLearning(
    FederatedMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator
):
    # The docstring shares the federated parameters' block, so it is built by
    # concatenation (a bare string literal in a class body cannot be).
    __doc__ = r"""Dictionary learning on data spread over clients, trained by FedMM.

    Finds a dictionary :math:`D` (one atom per row) that sparsely codes the
    rows of all clients, without the clients sending any row:

    .. math::

        \min_{\|d_j\|_2 \le 1} \; \sum_i w_i \frac{1}{n_i} \sum_{x \in X_i}
        \min_h \tfrac12 \|x - h D\|_2^2 + \alpha \|h\|_1,

    where:

    - :math:`X_i` holds the :math:`n_i` rows of client :math:`i` and
      :math:`w_i` its weight (``client_weights``);
    - :math:`h` is a row's sparse code, :math:`\alpha` the sparsity penalty.

    Each round the active clients code their rows and send the surrogate
    statistics :math:`A_i = \overline{h^\top h}`, :math:`B_i =
    \overline{x^\top h}` (through control variates and an optional
    compressor); the server aggregates them exactly and updates :math:`D` by
    block coordinate descent (Mairal et al., 2010). The parameters shared with
    :class:`sklearn.decomposition.DictionaryLearning` keep their names and
    meanings, so the estimator is a drop-in; ``fit`` also takes a list of
    client arrays or ``client_ids``.

    Parameters
    ----------
    n_components : int, default=None
        Number of atoms; ``n_features`` when None.
    alpha : float, default=1.0
        Sparsity penalty.
    max_iter : int, default=1000
        Maximum number of FedMM rounds (after the initial round).
    tol : float, default=1e-8
        Stop when the exact objective decreases by less than ``tol`` times its
        value between two evaluated rounds (as scikit-learn).
    fit_algorithm : {"batch_cd", "cd", "lars"}, default="batch_cd"
        The clients' sparse coder during the fit: a batched solver over all
        rows at once (fast; coordinate descent, or, for overcomplete
        dictionaries, exact active-set solves; see
        :func:`~skfedmm.problems.dictionary.batch_lasso_cd`), or
        scikit-learn's ``sparse_encode`` with ``"lasso_cd"`` /
        ``"lasso_lars"`` (exactly scikit-learn's coders).
    transform_algorithm : {"lasso_lars", "lasso_cd", "lars", "omp", "threshold"}, default="omp"
        Coder of :meth:`transform`, through
        :func:`sklearn.decomposition.sparse_encode`.
    transform_n_nonzero_coefs : int, default=None
        Nonzeros per code for ``"lars"`` and ``"omp"``.
    transform_alpha : float, default=None
        Penalty of :meth:`transform`; ``alpha`` when None.
    n_jobs : int, default=None
        Clients run in parallel with joblib (any backend chosen with
        :func:`joblib.parallel_config`); also used by :meth:`transform`.
    code_init : ndarray of shape (n_samples, n_components) or list of such arrays, default=None
        Initial codes of the training rows: one array per client when
        ``fit`` gets a list of clients, else one array aligned with ``X``
        (split like ``X`` by ``client_ids``). MM gives them a natural
        meaning: each client computes the statistics :math:`A_i =
        \overline{h^\top h}`, :math:`B_i = \overline{x^\top h}` of its
        initial codes (the codes never leave it), and the initial
        dictionary is the M-step of the aggregated statistics, warm-started
        at ``dict_init`` (or the ``init`` rule). Used by a new fit, not by a
        continued one.
    dict_init : ndarray of shape (n_components, n_features), default=None
        Initial dictionary (rows projected onto the unit ball).
    callback : callable, default=None
        Called after every round, the initial one included, with a dict
        (``round``, ``theta``, ``history``); returning True stops the fit.
    verbose : int, default=0
        Report progress per round (a tqdm bar when tqdm is installed).
    split_sign : bool, default=False
        Split the codes of :meth:`transform` into positive and negative parts.
    random_state : int, RandomState instance or None, default=None
        Seeds every draw: initialization, participation, minibatches,
        compression. Results do not depend on ``n_jobs``.
    positive_code : bool, default=False
        Nonnegative codes.
    positive_dict : bool, default=False
        Nonnegative atoms.
    transform_max_iter : int, default=1000
        Maximum iterations of the ``"lasso_cd"`` / ``"lasso_lars"`` coders
        (at fit and transform time, as scikit-learn) and sweep cap of
        ``"batch_cd"`` (whose rows stop earlier when their code changes by
        at most 1e-4 of its largest entry in a sweep, or their duality gap
        is at most 1e-4 of their objective; see
        :func:`~skfedmm.problems.dictionary.batch_lasso_cd`).
    init : {"pca", "random"}, default="pca"
        Initialization when ``dict_init`` is None, with no raw row leaving a
        client: ``"pca"`` aggregates the clients' second-moment matrices and
        takes the top eigenvectors; ``"random"`` draws unit atoms.
    atom_restart : {"auto", "residual", "random"}, default="auto"
        Where the server moves a dead atom (one no code uses, or a duplicate
        of another atom), since it never sees a row. ``"residual"``: each
        client also sends its mean second moment :math:`\overline{x^\top
        x}` (``n_features x n_features``) once, before the first round
        (``init="pca"`` sends it anyway); the server then knows the second
        moment of the coding residual :math:`x - hD` and puts dead atoms on
        its leading directions, deterministically, and a round that moves
        an atom never counts as converged. ``"random"``: random unit atoms,
        nothing extra sent. ``"auto"``: ``"residual"`` with surrogate
        aggregation when the second moment is sent anyway or costs at most
        one round's statistic (``n_features**2 <= n_components**2 +
        n_features * n_components``), else ``"random"``.
    code_cache : {"auto", True, False}, default="auto"
        Warm-start each training row's code (``fit_algorithm="batch_cd"``)
        from its code at the previous round: each client keeps its rows'
        last codes (never sent) and the coder starts from them. A row starts
        only from its own last code, and only while the row is unchanged,
        so its code never depends on other rows; codes are still computed
        to the coder's tolerance, so the cache changes the model only within
        it. With minibatches a row starts from its code at the last round it
        was drawn. ``"auto"`` (the default): when a client's codes take at
        most 64 MiB and, with minibatches, ``batch_size`` is at least a
        sixteenth of the client's rows; ``True``: always; ``False``: every
        code starts at zero. The cache is part of the client's state and
        stays where the client's rows are (in memory in-process, next to
        the rows' file on process workers, on the worker with Dask, on the
        node with Flower). With more atoms than features there is no cache:
        the coder solves each row exactly on its active set, from zero
        (faster there than from a cached code).
    """ + FEDERATED_PARAMS_DOC + r"""
    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        The dictionary atoms.
    error_ : ndarray of shape (`n_iter_` + 1,)
        Objective (mean per row, weighted over clients) at the start of
        every round, initial round first (NaN for the initialization of
        ``aggregation="parameter"``, which exchanges no statistic).
        scikit-learn's ``error_`` is the sum over rows: multiply by
        ``n_samples`` to compare.
    n_iter_ : int
        Number of rounds run.
    n_clients_ : int
        Number of clients seen in ``fit``.
    history_ : History
        Per-round record: objective, update sizes, bits, active clients,
        time (see :class:`skfedmm.History`).
    bits_up_, bits_down_ : int
        Total bits sent by the clients and by the server.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Defined when the clients are DataFrames with string column names.
    problem_ : DictionaryLearningProblem
        The MM problem the engine solved.
    fedmm_state_ : FedMMState
        The full training state (server statistic, control variates, random
        streams), used by ``warm_start`` and :meth:`partial_fit`.

    See Also
    --------
    sklearn.decomposition.DictionaryLearning : The centralized estimator.
    FederatedOTMap : Entropic optimal transport, trained the same way.

    References
    ----------
    .. [1] A. Dieuleveut, G. Fort, M. Hegazy, H.-T. Wai. Federated
       Majorize-Minimization: Beyond Parameter Aggregation. arXiv:2507.17534.
    .. [2] J. Mairal, F. Bach, J. Ponce, G. Sapiro. Online learning for
       matrix factorization and sparse coding. JMLR 11, 2010.

    Examples
    --------
    >>> import numpy as np
    >>> from skfedmm import FederatedDictionaryLearning
    >>> rng = np.random.default_rng(0)
    >>> clients = [rng.standard_normal((50, 8)) for _ in range(3)]
    >>> dl = FederatedDictionaryLearning(n_components=5, alpha=0.5, max_iter=10,
    ...                                  random_state=0).fit(clients)
    >>> dl.components_.shape
    (5, 8)
    >>> dl.transform(clients[0]).shape
    (50, 5)
    """

    _parameter_constraints = {
        **FederatedMixin._parameter_constraints,
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "fit_algorithm": [StrOptions({"batch_cd", "cd", "lars"})],
        "transform_algorithm": [StrOptions({"lasso_lars", "lasso_cd", "lars", "omp", "threshold"})],
        "transform_n_nonzero_coefs": [Interval(Integral, 1, None, closed="left"), None],
        "transform_alpha": [Interval(Real, 0, None, closed="left"), None],
        "n_jobs": [Integral, None],
        "code_init": ["array-like", list, None],
        "dict_init": ["array-like", None],
        "callback": [callable, None],
        "verbose": ["verbose"],
        "split_sign": ["boolean"],
        "random_state": ["random_state"],
        "positive_code": ["boolean"],
        "positive_dict": ["boolean"],
        "transform_max_iter": [Interval(Integral, 0, None, closed="left")],
        "init": [StrOptions({"pca", "random"})],
        "atom_restart": [StrOptions({"auto", "residual", "random"})],
        "code_cache": [StrOptions({"auto"}), "boolean"],
    }

    _fixed_when_resuming = {
        "n_components": "the statistics' shapes depend on it",
        "init": "it sets the initial dictionary, which continued training is past",
        "dict_init": "it sets the initial dictionary, which continued training is past",
        "code_init": "it sets the initial dictionary, which continued training is past",
        "aggregation": "the training state of one aggregation is not that of the other",
    }

    def __init__(
        self,
        n_components=None,
        *,
        alpha=1.0,
        max_iter=1000,
        tol=1e-8,
        fit_algorithm="batch_cd",
        transform_algorithm="omp",
        transform_n_nonzero_coefs=None,
        transform_alpha=None,
        n_jobs=None,
        code_init=None,
        dict_init=None,
        callback=None,
        verbose=False,
        split_sign=False,
        random_state=None,
        positive_code=False,
        positive_dict=False,
        transform_max_iter=1000,
        init="pca",
        atom_restart="auto",
        code_cache="auto",
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
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.fit_algorithm = fit_algorithm
        self.transform_algorithm = transform_algorithm
        self.transform_n_nonzero_coefs = transform_n_nonzero_coefs
        self.transform_alpha = transform_alpha
        self.n_jobs = n_jobs
        self.code_init = code_init
        self.dict_init = dict_init
        self.callback = callback
        self.verbose = verbose
        self.split_sign = split_sign
        self.random_state = random_state
        self.positive_code = positive_code
        self.positive_dict = positive_dict
        self.transform_max_iter = transform_max_iter
        self.init = init
        self.atom_restart = atom_restart
        self.code_cache = code_cache
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
    def _check_params(self, n_features, dtype):
        """Checks that need the data (shapes, dtype); constraints are checked by ``fit``."""
        n_components = n_features if self.n_components is None else self.n_components
        dict_init = None
        if self.dict_init is not None:
            try:
                dict_init = check_array(self.dict_init, dtype=dtype, input_name="dict_init")
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"dict_init: {exc}") from exc
            if dict_init.shape != (n_components, n_features):
                raise ValueError(
                    f"dict_init has shape {dict_init.shape}; expected (n_components, "
                    f"n_features) = {(n_components, n_features)}."
                )
        return n_components, dict_init

    def _make_problem(self, n_features, dtype):
        n_components, dict_init = self._check_params(n_features, dtype)
        return DictionaryLearningProblem(
            n_components,
            self.alpha,
            n_features,
            fit_algorithm=self.fit_algorithm,
            positive_code=self.positive_code,
            positive_dict=self.positive_dict,
            init=self.init,
            dict_init=dict_init,
            coder_max_iter=max(self.transform_max_iter, 1),
            # the baseline's M-steps run on the clients, which re-draw at random
            atom_restart=(
                "random" if self.atom_restart == "auto" and self.aggregation == "parameter"
                else self.atom_restart
            ),
            code_cache=self.code_cache,
        )

    def fit(self, X, y=None, *, client_ids=None):
        """Learn the dictionary from the clients' data.

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
        self._fit_rounds(clients, self.max_iter, self.tol, resume, client_ids)
        return self

    def partial_fit(self, X, y=None, *, client_ids=None):
        """Run one FedMM round on the given clients (streaming use).

        The first call initializes (the initial full round) and runs one
        round; later calls continue from the full training state, each client
        computing its statistic on the rows it gives in that call. The number
        of clients must stay the same.

        Parameters
        ----------
        X : list of array-like of shape (n_i, n_features), or array-like of shape (n_samples, n_features)
            The clients' current rows.
        y : Ignored
            Not used, present for API consistency by convention.
        client_ids : array-like of shape (n_samples,), default=None
            The client of each row when ``X`` is one array.

        Returns
        -------
        self : object
        """
        self._validate_params()
        resume = self._can_resume()
        clients, _ = check_clients(self, X, client_ids, reset=not resume)
        self._fit_rounds(clients, 1, 0.0, resume, client_ids)
        return self

    def _fit_rounds(self, clients, max_iter, tol, resume, client_ids=None):
        problem = self._make_problem(self.n_features_in_, clients[0].dtype)
        codes = None
        if self.code_init is not None and not resume:
            codes = check_per_client_rows(
                "code_init", self.code_init, clients, client_ids,
                n_columns=problem.n_components, dtype=clients[0].dtype,
            )

        def record(state):
            self.components_ = state.theta
            self.error_ = state.history["objective"]

        self._run_engine(
            clients, problem,
            max_iter=max_iter, tol=tol, convergence="objective", resume=resume, record=record,
            client_init=codes,
        )

    def fit_transform(self, X, y=None, *, client_ids=None):
        """Fit, then return the codes of the training rows.

        The codes computed during the fit stay on the clients; these are
        computed by :meth:`transform` with the fitted dictionary.

        Parameters
        ----------
        X : list of array-like or array-like of shape (n_samples, n_features)
        y : Ignored
        client_ids : array-like of shape (n_samples,), default=None

        Returns
        -------
        X_new : ndarray of shape (n_samples, n_components)
            Codes of all rows, clients in order when ``X`` is a list.
        """
        self.fit(X, y, client_ids=client_ids)
        if is_client_list(X):
            return np.vstack([self.transform(Xi) for Xi in X])
        return self.transform(X)

    # ------------------------------------------------------------ transform
    def transform(self, X):
        """Encode the rows of ``X`` as sparse combinations of the atoms.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        X_new : ndarray of shape (n_samples, n_components) or (n_samples, 2 * n_components)
            The codes (split into positive and negative parts with
            ``split_sign``).
        """
        check_is_fitted(self)
        X = check_transform_input(self, X, dtype=[np.float64, np.float32])
        alpha = self.alpha if self.transform_alpha is None else self.transform_alpha
        code = sparse_encode(
            X,
            self.components_,
            algorithm=self.transform_algorithm,
            n_nonzero_coefs=self.transform_n_nonzero_coefs,
            alpha=alpha,
            max_iter=self.transform_max_iter,
            n_jobs=self.n_jobs,
            positive=self.positive_code,
        )
        if self.split_sign:
            code = np.hstack([np.maximum(code, 0), -np.minimum(code, 0)])
        return code

    def inverse_transform(self, X):
        """Map codes back to the data space.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components)
            Codes (``2 * n_components`` columns with ``split_sign``).

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        code = check_array(X, dtype=[np.float64, np.float32])
        k = self.components_.shape[0]
        expected = 2 * k if self.split_sign else k
        if code.shape[1] != expected:
            raise ValueError(
                f"The code's number of columns differs from the dictionary's number of "
                f"components: Expected {expected}, got {code.shape[1]}."
            )
        if self.split_sign:
            code = code[:, :k] - code[:, k:]
        return code @ self.components_

    def score(self, X, y=None, sample_weight=None):
        """Minus the mean objective per row at the fitted dictionary.

        .. math::

            -\\frac{1}{n} \\sum_x \\min_h \\tfrac12\\|x - hD\\|^2 + \\alpha\\|h\\|_1,

        with the fit-time coder, so that larger is better and model
        selection needs no custom scorer.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or list of such arrays
        y : Ignored
            Not used, present for API consistency by convention.
        sample_weight : array-like of shape (n_samples,), default=None
            Row weights of a weighted mean (rows of all clients in order).

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        parts = X if is_client_list(X) else [X]
        parts = [check_transform_input(self, Xi, dtype=[np.float64, np.float32]) for Xi in parts]
        problem = self._make_problem(self.n_features_in_, self.components_.dtype)
        objective = np.concatenate([
            lasso_objective(Xi, problem.encode(Xi, self.components_), self.components_, self.alpha)
            for Xi in parts
        ])
        if sample_weight is not None:
            sample_weight = check_sample_weight(sample_weight, objective.shape[0])
        return -float(np.average(objective, weights=sample_weight))

    @property
    def _n_features_out(self):
        # as many names as transform returns columns (2 per atom with split_sign)
        return self.components_.shape[0] * (2 if self.split_sign else 1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
