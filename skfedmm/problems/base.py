r"""The contract between the FedMM engine and an MM problem.

An MM problem minimizes :math:`W(\theta) = \sum_i w_i f_i(\theta) + g(\theta)`
with a surrogate that is *linear in a statistic*: at the current point
:math:`\tau`, every per-row loss is majorized by

.. math::

    \ell(x, \theta) \le \psi(\theta) - \langle S(x; \tau), \phi(\theta)\rangle
    + \mathrm{const}(x, \tau),

with equality at :math:`\theta = \tau`, where:

- :math:`S(x; \tau)` is the statistic, a small set of named arrays;
- :math:`T(s) = \arg\min_\theta \psi(\theta) - \langle s, \phi(\theta)\rangle
  + g(\theta)` is the M-step, a map from statistics to parameters.

Because the surrogate is linear in :math:`S`, the server can aggregate the
clients' mean statistics *exactly* (a weighted mean), which is what FedMM
does instead of averaging parameters.
"""

from abc import ABC, abstractmethod

import numpy as np

__all__ = ["MMProblem"]


class MMProblem(ABC):
    """Base class of the problems the FedMM engine can solve.

    A problem is a small object holding the problem's hyper-parameters
    (never client data). The engine calls, on the clients:

    - :meth:`init_statistic` (optional) once per client, to build
      :math:`\\theta_0` without raw rows on the server;
    - :meth:`local_statistic` on a batch of rows every round (or, for a
      problem with a :meth:`client_cache`, :meth:`cached_statistic`);

    and, on the server:

    - :meth:`combine_init_statistics` (optional) once, to combine the
      clients' init statistics (default: their weighted mean);
    - :meth:`prepare` (optional) once, with the aggregated init statistic,
      for constants computed at fit time;
    - :meth:`init_parameter` once, with the aggregated init statistic;
    - :meth:`minimize`, the M-step :math:`T`, every round;
    - :meth:`project` on the updated statistic (after compression noise);
    - :meth:`project_parameter` for the parameter-averaging baseline;
    - :meth:`rescale` (optional) for problems whose statistics are stored in
      coordinates relative to the current parameter;
    - :meth:`restarted` (optional) after each M-step, to tell a restart
      (e.g. a re-placed unused atom) from convergence.

    Statistics are dictionaries of NumPy arrays with fixed names and shapes
    (for example ``{"A": (k, k), "B": (d, k)}``); a parameter is a NumPy
    array or, for problems with several parameter blocks, a dictionary of
    arrays (for example a mixture's weights, means and covariances). All methods must be deterministic given their arguments; the
    only randomness comes from the ``rng`` arguments.

    Examples
    --------
    The federated weighted mean: :math:`\\ell(x, \\theta) = \\frac12\\|x -
    \\theta\\|^2`, statistic :math:`S(x) = x`, :math:`T(s) = s`.

    >>> import numpy as np
    >>> from skfedmm.problems import MMProblem
    >>> class Mean(MMProblem):
    ...     def init_parameter(self, init_stat, rng):
    ...         return np.zeros(2)
    ...     def local_statistic(self, X, theta):
    ...         loss = 0.5 * np.mean(np.sum((X - theta) ** 2, axis=1))
    ...         return {"mean": X.mean(axis=0)}, loss
    ...     def minimize(self, stat, theta_prev, rng=None):
    ...         return stat["mean"].copy()
    """

    #: Whether a fit that compresses its messages (``compression=...``) may
    #: compress the clients' :meth:`init_statistic` too. False (the
    #: default) for statistics that set the problem's constants (a scale, a
    #: standardization), which then travel exactly; True for statistics
    #: that only seed :math:`\theta_0`.
    compress_init_statistic = False

    #: Whether a compressed fit compresses the initial full round of
    #: statistics (at :math:`\theta_0`) too. True by default; False for
    #: problems whose first M-step from a noisy statistic can land in a
    #: worse local optimum that later rounds do not leave (mixtures).
    compress_first_round = True

    def init_statistic(self, X):
        """Statistic a client sends once to initialize :math:`\\theta_0`.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features)
            All rows of one client.

        Returns
        -------
        stat : dict of ndarray or None
            Mean statistic over the rows, aggregated by the server as a
            weighted mean. ``None`` (the default) when the initialization
            needs nothing from the clients.
        """
        return None

    def combine_init_statistics(self, stats, weights):
        """Server-side combination of the clients' :meth:`init_statistic`.

        The default is the weighted mean, which is right for statistics that
        are means over rows (second moments, histograms). A problem whose
        clients send *summaries* that do not average, such as local cluster
        centres with their masses (one-shot federated clustering), keeps
        them side by side instead.

        Parameters
        ----------
        stats : list of dict of ndarray
            The answering clients' init statistics, in client order (all of
            the same names and shapes).
        weights : ndarray of shape (len(stats),)
            Their client weights :math:`w_i`, normalized to sum to 1.

        Returns
        -------
        init_stat : dict of ndarray
            What :meth:`prepare` and :meth:`init_parameter` receive (and what
            a continued fit keeps).
        """
        out = {}
        for name in stats[0]:
            total = np.zeros(np.shape(stats[0][name]), dtype=np.asarray(stats[0][name]).dtype)
            for stat, w in zip(stats, weights):
                total += w * stat[name]
            out[name] = total
        return out

    def prepare(self, init_stat):
        """The problem with the constants it computes at fit time.

        Some problems need constants that depend on the clients' data, such
        as a cost scale computed from the aggregated initialization
        statistic. They return a new problem holding those constants; the
        engine stores it in its state (``FedMMState.problem``) and uses it
        for the whole run. The problem object itself is never modified
        during a fit, like an estimator's parameters.

        Parameters
        ----------
        init_stat : dict of ndarray or None
            The weighted mean of the clients' :meth:`init_statistic`.

        Returns
        -------
        problem : MMProblem
            ``self`` (the default) or a new, prepared problem.
        """
        return self

    @abstractmethod
    def init_parameter(self, init_stat, rng):
        """Initial parameter :math:`\\theta_0`, computed on the server.

        Parameters
        ----------
        init_stat : dict of ndarray or None
            The weighted mean of the clients' :meth:`init_statistic`.
        rng : numpy.random.Generator
            The server's initialization stream.

        Returns
        -------
        theta : ndarray or dict of ndarray
        """

    @abstractmethod
    def local_statistic(self, X, theta):
        """Mean statistic and mean loss over a batch of rows.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features)
            A batch of one client's rows.
        theta : ndarray or dict of ndarray
            The current parameter.

        Returns
        -------
        stat : dict of ndarray
            :math:`\\frac{1}{n} \\sum_{x} S(x; \\theta)` over the batch.
        loss : float
            :math:`\\frac{1}{n} \\sum_{x} \\ell(x, \\theta)` over the batch.
        """

    def client_cache(self, X):
        """A client's cache, kept on the client between rounds (optional).

        Some problems can reuse per-row work from one round to the next
        (for example each row's last sparse code, a warm start for the
        next one). A client asks for a cache once, with all its rows, when
        it has none; while it holds one it calls :meth:`cached_statistic`
        instead of :meth:`local_statistic`, and keeps the cache that call
        returns (in its ``ClientState``, across rounds and continued fits;
        it never leaves the client). The cache must not make a row's
        result depend on another row, and the returned cache must be a new
        object (the given one is not modified), so that a failed round
        leaves the client as it was.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features)
            All rows of one client.

        Returns
        -------
        cache : dict of ndarray or None
            A (possibly empty) dictionary of named arrays, which a
            deployment can store with the client's state; ``None`` (the
            default) for no cache.
        """
        return None

    def cached_statistic(self, X, theta, cache, rows):
        """:meth:`local_statistic` on a batch, with the client's cache.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features)
            All rows of one client.
        theta : ndarray or dict of ndarray
        cache : dict of ndarray
            The client's cache (from :meth:`client_cache` or the previous
            call); not modified.
        rows : ndarray of int or None
            The batch's sorted row indices, None for all rows.

        Returns
        -------
        stat : dict of ndarray
        loss : float
            As :meth:`local_statistic` on ``X[rows]``.
        cache : dict of ndarray
            The client's next cache (the default: ``cache`` unchanged).
        """
        batch = X if rows is None else X[rows]
        stat, loss = self.local_statistic(batch, theta)
        return stat, loss, cache

    @abstractmethod
    def minimize(self, stat, theta_prev, rng=None):
        """The M-step :math:`T(s)`, warm-started at ``theta_prev``.

        Parameters
        ----------
        stat : dict of ndarray
            An aggregated statistic.
        theta_prev : ndarray or dict of ndarray
            The previous parameter (warm start; the coordinates ``stat`` is
            expressed in for problems that use :meth:`rescale`).
        rng : numpy.random.Generator, default=None
            Stream for any random draw the M-step needs (e.g. re-drawing an
            unused dictionary atom).

        Returns
        -------
        theta : ndarray or dict of ndarray
        """

    def statistic_shapes(self, theta):
        """The names and shapes of the statistic at ``theta`` (optional).

        The server checks every client's message against this layout. A
        problem that does not declare it (the default, None) gets the layout
        most clients send in the initial round.

        Parameters
        ----------
        theta : ndarray or dict of ndarray

        Returns
        -------
        shapes : dict of str to tuple, or None
        """
        return None

    def check_statistic(self, stat, theta, atol=0.0):
        """Why a client's statistic is outside its valid set, or None (optional).

        Called by the server on every statistic it can reconstruct exactly
        (the initial round, and every round without compression), so that a
        faulty or malicious client is rejected (a failure of that client in
        that round) instead of silently corrupting the model. For example:
        masses must be nonnegative, a second moment's diagonal too.

        Parameters
        ----------
        stat : dict of ndarray
            The client's mean statistic over its batch.
        theta : ndarray or dict of ndarray
            The parameter it was computed at.
        atol : float, default=0.0
            Rounding slack of a reconstructed statistic, in its units.

        Returns
        -------
        reason : str or None
            None when the statistic is valid (the default accepts anything
            finite).
        """
        return None

    def project(self, stat):
        """Put a statistic back into its valid set (default: unchanged).

        Parameters
        ----------
        stat : dict of ndarray

        Returns
        -------
        stat : dict of ndarray
        """
        return stat

    def project_parameter(self, theta):
        """Put a parameter back into its constraint set (default: unchanged).

        Used by the parameter-averaging baseline.

        Parameters
        ----------
        theta : ndarray or dict of ndarray

        Returns
        -------
        theta : ndarray or dict of ndarray
        """
        return theta

    def restarted(self, stat, theta_prev, theta_new):
        """Whether the M-step restarted part of the parameter.

        Some M-steps re-place a part of the parameter that the data leave
        undetermined (a dictionary atom no code uses). The objective at
        ``theta_new`` then says nothing yet about that part, so the engine
        does not declare convergence in such a round (it is recorded in
        ``history.restarted``). Must be a function of the arguments only;
        the engine calls it on the server after every M-step of surrogate
        aggregation.

        Parameters
        ----------
        stat : dict of ndarray
            The statistic given to :meth:`minimize`.
        theta_prev : ndarray
            Its warm start.
        theta_new : ndarray
            Its result.

        Returns
        -------
        restarted : bool
            False (the default): nothing is ever restarted.
        """
        return False

    def rescale(self, stat, theta_old, theta_new):
        """Change of coordinates of statistics when the parameter moves.

        Problems whose statistics are stored relative to the broadcast
        parameter (entropic OT stores soft-assignment masses) return the
        elementwise factor that maps a statistic expressed at ``theta_old``
        to the same statistic expressed at ``theta_new``. The engine applies
        it to the server statistic and control variates, and clients apply
        the cumulative factor to a stale control variate.

        Parameters
        ----------
        stat : dict of ndarray
            The updated server statistic, at ``theta_old``'s coordinates.
        theta_old, theta_new : ndarray or dict of ndarray

        Returns
        -------
        factor : dict of ndarray or None
            ``None`` (the default) when statistics do not depend on the
            parameter's coordinates.
        """
        return None

    def loss(self, X, theta):
        """Mean loss over rows (default: from :meth:`local_statistic`).

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features)
        theta : ndarray or dict of ndarray

        Returns
        -------
        loss : float
        """
        return self.local_statistic(X, theta)[1]

    def gradient(self, X, theta):
        """Gradient of the mean loss over rows (optional; the gradient baselines).

        Problems that provide it can be trained by the gradient baselines
        (``aggregation="fedavg"``, ``"fedprox"``, ``"scaffold"``); the
        default raises :class:`NotImplementedError`, and the engine refuses
        those aggregations for such a problem before any round.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features)
            A batch of one client's rows.
        theta : ndarray or dict of ndarray
            The current parameter.

        Returns
        -------
        grad : ndarray or dict of ndarray
            :math:`\\nabla_\\theta \\frac{1}{n} \\sum_x \\ell(x, \\theta)`,
            structured as ``theta``.
        loss : float
            :math:`\\frac{1}{n} \\sum_{x} \\ell(x, \\theta)` over the batch.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not provide the gradient of its loss."
        )

    def default_learning_rate(self, init_stat):
        """The learning rate of the gradient baselines with ``learning_rate="auto"``.

        Parameters
        ----------
        init_stat : dict of ndarray or None
            The aggregated :meth:`init_statistic`.

        Returns
        -------
        learning_rate : float or None
            A step of the order of the inverse curvature of the loss; None
            (the default) when the problem proposes none (a float
            ``learning_rate`` is then needed).
        """
        return None
