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

__all__ = ["MMProblem"]


class MMProblem(ABC):
    """Base class of the problems the FedMM engine can solve.

    A problem is a small object holding the problem's hyper-parameters
    (never client data). The engine calls, on the clients:

    - :meth:`init_statistic` (optional) once per client, to build
      :math:`\\theta_0` without raw rows on the server;
    - :meth:`local_statistic` on a batch of rows every round;

    and, on the server:

    - :meth:`init_parameter` once, with the aggregated init statistic;
    - :meth:`minimize`, the M-step :math:`T`, every round;
    - :meth:`project` on the updated statistic (after compression noise);
    - :meth:`project_parameter` for the parameter-averaging baseline;
    - :meth:`rescale` (optional) for problems whose statistics are stored in
      coordinates relative to the current parameter.

    Statistics are dictionaries of NumPy arrays with fixed names and shapes
    (for example ``{"A": (k, k), "B": (d, k)}``); parameters are NumPy
    arrays. All methods must be deterministic given their arguments; the
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
        theta : ndarray
        """

    @abstractmethod
    def local_statistic(self, X, theta):
        """Mean statistic and mean loss over a batch of rows.

        Parameters
        ----------
        X : ndarray of shape (n_rows, n_features)
            A batch of one client's rows.
        theta : ndarray
            The current parameter.

        Returns
        -------
        stat : dict of ndarray
            :math:`\\frac{1}{n} \\sum_{x} S(x; \\theta)` over the batch.
        loss : float
            :math:`\\frac{1}{n} \\sum_{x} \\ell(x, \\theta)` over the batch.
        """

    @abstractmethod
    def minimize(self, stat, theta_prev, rng=None):
        """The M-step :math:`T(s)`, warm-started at ``theta_prev``.

        Parameters
        ----------
        stat : dict of ndarray
            An aggregated statistic.
        theta_prev : ndarray
            The previous parameter (warm start; the coordinates ``stat`` is
            expressed in for problems that use :meth:`rescale`).
        rng : numpy.random.Generator, default=None
            Stream for any random draw the M-step needs (e.g. re-drawing an
            unused dictionary atom).

        Returns
        -------
        theta : ndarray
        """

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
        theta : ndarray

        Returns
        -------
        theta : ndarray
        """
        return theta

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
        theta_old, theta_new : ndarray

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
        theta : ndarray

        Returns
        -------
        loss : float
        """
        return self.local_statistic(X, theta)[1]
