r"""Semi-discrete entropic optimal transport as an MM problem (Sinkhorn as MM).

The source :math:`\mu = \sum_i w_i \mu_i` is spread over the clients (the
rows of :math:`X_i`), the target :math:`\nu = \sum_{j=1}^m b_j \delta_{y_j}`
is a known finite sample. The dual potential :math:`g \in \mathbb{R}^m`
minimizes the semi-dual objective

.. math::

    F(g) = -\langle b, g\rangle + \varepsilon\, \mathbb{E}_{x \sim \mu}
    \Big[\log \sum_{j=1}^m b_j
    \exp\Big(\frac{g_j - c(x, y_j)}{\varepsilon}\Big)\Big],
    \qquad c(x, y) = \tfrac12 \|x - y\|_2^2,

where:

- :math:`b \in \Delta_m` are the target weights (uniform by default);
- :math:`\varepsilon > 0` is the entropic regularization, in the units of
  the cost (``epsilon`` times the spread :math:`\sigma^2` of the two
  samples, see :class:`EntropicOTProblem`, with ``normalize_cost="spread"``);
- the per-row loss is the semi-dual integrand :math:`\ell(x, g) =
  -\langle b, g\rangle + \varepsilon \log \sum_j b_j e^{(g_j - c(x,
  y_j))/\varepsilon}`.

The soft assignment of a row to the target points is the softmax

.. math::

    \chi_j(x; g) = \frac{b_j \exp((g_j - c(x, y_j))/\varepsilon)}
    {\sum_k b_k \exp((g_k - c(x, y_k))/\varepsilon)}.

The tangent bound :math:`\log z \le \log z_0 + z / z_0 - 1` at the current
potential :math:`\tau` majorizes :math:`\ell(\cdot, g)` by
:math:`-\langle b, g\rangle + \varepsilon \sum_j S_j(x; \tau)
e^{g_j/\varepsilon}` + const, linear in the statistic
:math:`S_j(x; \tau) = \chi_j(x; \tau) e^{-\tau_j / \varepsilon}`, with
minimizer :math:`T(S) = \varepsilon \log(b / S)` (up to an additive
constant, the gauge). Batch MM is Sinkhorn's update of :math:`g`.

:math:`S` under- and overflows for small :math:`\varepsilon`, so the
statistic is stored in *mass coordinates* relative to the broadcast
potential: clients send the mean soft assignment
:math:`\bar\chi_i = \frac{1}{n_i}\sum_{x \in X_i} \chi(x; g_t)` (entries in
:math:`[0, 1]` summing to 1), the server statistic is exactly :math:`b` in
these coordinates, and the M-step reads

.. math::

    g_{t+1} = g_t + \varepsilon \log(b / r_t) - \mathrm{mean}(\cdot),
    \qquad r_t = (1 - \gamma_t) b + \gamma_t \textstyle\sum_i w_i
    \bar\chi_i \quad (+\text{control-variate and compression terms}).

After the step the engine multiplies stored statistics by :meth:`rescale`'s
factor :math:`b / r_t`, the change of mass coordinates from :math:`g_t` to
:math:`g_{t+1}` (the gauge constant cancels: soft assignments do not depend
on it).

Costs come from BLAS (:math:`\|x\|^2 - 2 x^\top y + \|y\|^2`, with both
sides centred at the target mean for accuracy) in row chunks: no
``(n, m, d)`` tensor and no ``n x m`` block above the memory budget is ever
built.

References
----------
.. [1] M. Cuturi. Sinkhorn distances: lightspeed computation of optimal
   transport. NeurIPS 2013.
.. [2] A. Genevay, M. Cuturi, G. Peyré, F. Bach. Stochastic optimization for
   large-scale optimal transport. NeurIPS 2016.
.. [3] A.-A. Pooladian, J. Niles-Weed. Entropic estimation of optimal
   transport maps. arXiv:2109.12004, 2021.
.. [4] A. Dieuleveut, G. Fort, M. Hegazy, H.-T. Wai. Federated
   Majorize-Minimization: Beyond Parameter Aggregation. arXiv:2507.17534,
   2025.
"""

import warnings
from numbers import Real

import copy

import numpy as np
from sklearn import get_config

from .base import MMProblem

__all__ = ["EntropicOTProblem"]


#: Default size (MiB) of one ``chunk x m`` block: small blocks stay in cache
#: and run faster than large ones (see ``benchmarks/bench_ot.py``).
DEFAULT_CHUNK_MIB = 1.0


def _chunk_rows(n_rows, row_bytes, working_memory):
    """Rows per chunk so that one chunk takes at most ``working_memory`` MiB."""
    if working_memory is None:
        working_memory = min(DEFAULT_CHUNK_MIB, get_config()["working_memory"])
    budget = int(working_memory * 2**20)
    rows = budget // max(int(row_bytes), 1)
    if rows < 1:
        warnings.warn(
            f"A single row of soft assignments needs {row_bytes / 2**20:.3g} MiB, over "
            f"the working_memory budget of {working_memory} MiB; using one row at a time.",
            RuntimeWarning,
            stacklevel=3,
        )
        rows = 1
    return int(max(1, min(rows, n_rows)))


def _soft_assignment_chunks(X, kernel, center, working_memory=None):
    r"""Stable unnormalized soft assignments of the rows of ``X``, by chunks.

    For each chunk of rows yields ``(rows, E, zmax, rowsum, Xc)`` where

    .. math::

        E_{xj} = \exp(z_{xj} - \max_k z_{xk}), \qquad
        z_{xj} = \frac{\langle x - c, y_j - c\rangle}{\varepsilon}
        + \beta_j,

    so that :math:`\chi(x) = E_{x\cdot} / \sum_j E_{xj}` and
    :math:`\log \sum_j e^{z_{xj}} = \max_k z_{xk} + \log \sum_j E_{xj}`.
    The logits come from one matrix product (a column of ones carries
    :math:`\beta`) and the exponential is taken in place: one ``chunk x m``
    array, reused from chunk to chunk, sized by ``working_memory``.

    Parameters
    ----------
    X : ndarray of shape (n, d)
    kernel : ndarray of shape (d + 1, m)
        :math:`[(Y - c)^\top / \varepsilon;\ \beta]`.
    center : ndarray of shape (d,)
        The centre :math:`c` subtracted from the rows.
    working_memory : float, default=None
        Budget in MiB of the ``chunk x m`` block; when None,
        :data:`DEFAULT_CHUNK_MIB` or scikit-learn's ``working_memory``
        setting if that is smaller.

    Yields
    ------
    rows : slice
    E : ndarray of shape (chunk, m)
        Overwritten by the next chunk.
    zmax, rowsum : ndarray of shape (chunk,)
    Xc : ndarray of shape (chunk, d)
        The centred rows of the chunk (overwritten by the next chunk).
    """
    n, d = X.shape
    m = kernel.shape[1]
    dtype = kernel.dtype
    step = _chunk_rows(n, m * dtype.itemsize, working_memory)
    Xa = np.empty((step, d + 1), dtype=dtype)
    Xa[:, d] = 1
    buf = np.empty((step, m), dtype=dtype)
    for start in range(0, n, step):
        stop = min(start + step, n)
        k = stop - start
        xa = Xa[:k]
        np.subtract(X[start:stop], center, out=xa[:, :d], casting="same_kind")
        E = buf[:k]
        np.matmul(xa, kernel, out=E)
        zmax = E.max(axis=1)
        E -= zmax[:, None]
        np.exp(E, out=E)
        yield slice(start, stop), E, zmax, E.sum(axis=1), xa[:, :d]


class EntropicOTProblem(MMProblem):
    r"""Semi-discrete entropic OT from the clients' rows to a target sample.

    Learns the dual potential :math:`g` of

    .. math::

        \min_{g \in \mathbb{R}^m} F(g) = -\langle b, g\rangle
        + \varepsilon \sum_i w_i \frac{1}{n_i} \sum_{x \in X_i}
        \log \sum_{j=1}^m b_j \exp\Big(\frac{g_j - \tfrac12\|x -
        y_j\|^2}{\varepsilon}\Big),

    where:

    - :math:`y_j` are the target points (rows of ``target``) and :math:`b`
      their weights;
    - :math:`\varepsilon` is the regularization in cost units:
      :math:`\varepsilon = \epsilon\, \sigma^2` with ``normalize_cost="spread"``,
      :math:`\varepsilon = \epsilon` with ``normalize_cost=None``
      (:math:`\epsilon` is the ``epsilon`` parameter);
    - :math:`\sigma^2` is the spread of the two samples, the mean variance
      per coordinate of the source and the target, each around its own mean:

      .. math::

          \sigma^2 = \frac{1}{2d}\Big(\mathbb{E}_{x\sim\mu}\|x - \bar x\|^2
          + \sum_{j=1}^m b_j \|y_j - \bar y\|^2\Big),
          \qquad \bar x = \mathbb{E}_{x\sim\mu}\, x, \quad
          \bar y = \sum_{j=1}^m b_j y_j,

      with :math:`d` the number of features. Each client sends, once, the
      mean of its rows and their mean squared distance to that mean; the
      server combines them exactly (:meth:`combine_init_statistics`).

    :math:`\sigma^2` does not change when either sample is translated, and
    is multiplied by :math:`s^2` when both are scaled by :math:`s`. The
    entropic plan of the squared cost is itself invariant to translations
    of either sample (:math:`\tfrac12\|x + a - y\|^2` differs from
    :math:`\tfrac12\|x - y\|^2` by :math:`\langle a, x\rangle - \langle a,
    y\rangle + \tfrac12\|a\|^2`, absorbed by the potentials), so the fitted
    map is translation equivariant and scale equivariant. The Gibbs kernel
    :math:`e^{-\|x - y\|^2 / (2\varepsilon)}` is a Gaussian of standard
    deviation :math:`\sqrt{\epsilon}\,\sigma` per coordinate: ``epsilon`` is
    the squared blur in units of the data's spread, whatever the dimension.

    The statistic is ``{"mass": mean soft assignment}`` at the broadcast
    potential (see the module docstring for the mass coordinates), the
    M-step is :math:`g \leftarrow g + \varepsilon \log(b / r)` followed by
    the gauge :math:`\mathrm{mean}(g) = 0`, and :meth:`rescale` returns
    :math:`b / r`.

    Parameters
    ----------
    target : ndarray of shape (m, d)
        Target points, of the clients' dtype.
    target_weights : ndarray of shape (m,), default=None
        Positive weights :math:`b` (normalized to sum to 1); uniform when
        None.
    epsilon : float, default=0.05
        Regularization, relative to :math:`\sigma^2` or absolute (see
        ``normalize_cost``).
    normalize_cost : {"spread", None}, default="spread"
    working_memory : float, default=None
        Budget (MiB) of the ``chunk x m`` soft-assignment block; when None,
        1 MiB (cache-sized blocks are the fastest) or scikit-learn's
        ``working_memory`` setting if that is smaller.
    min_mass : float, default=None
        :meth:`project` keeps :math:`r \ge` ``min_mass`` :math:`\cdot b`
        (positivity, so that the potential step :math:`\varepsilon \log(b/r)`
        stays finite). None: the square root of the dtype's machine
        epsilon (1.5e-8 in float64), which leaves Sinkhorn's steps unchanged
        unless a target point receives almost no mass. The engine projects
        its estimate of the clients' masses before the step, so in noisy
        rounds (step size :math:`\gamma < 1`) the server's masses stay
        above :math:`(1 - \gamma) b`, which bounds the potential step by
        :math:`\varepsilon \log(1 / (1 - \gamma))`.
    epsilon_scaling : float in (0, 1), default=None
        Epsilon scaling: the parameter becomes ``{"potential": g,
        "epsilon_factor": [k]}``, the round at :math:`\theta_t` uses
        :math:`\varepsilon_t = k_t \varepsilon`, :math:`k_0`
        = :meth:`start_factor` (the schedule starts at the data's spread)
        and :math:`k_{t+1} = \max(1, q k_t)`, :math:`q` = ``epsilon_scaling``
        (:meth:`minimize` decides it, so the schedule travels with the
        broadcast parameter). :meth:`restarted` is True while
        :math:`k_t > 1`, so the engine does not stop before the requested
        :math:`\varepsilon`. Statistics keep their mass coordinates across a
        change of :math:`\varepsilon` (:meth:`rescale` is the potential's
        change only): a control variate is then a stale offset, like after
        any move of the parameter, and :math:`V = \sum_i w_i V_i` still
        holds. None: the parameter is the potential, every round at
        :math:`\varepsilon`.
    newton : bool, default=False
        Newton steps: the statistic also holds ``"second"``, the mean
        second moment :math:`\mathbb{E}[\chi\chi^\top]` of the soft
        assignments (packed upper triangle, :math:`m(m+1)/2` entries), so
        the server has the semi-dual's exact gradient and Hessian, and
        :meth:`minimize` takes a majorized Newton step: among the
        Levenberg-Marquardt steps and Sinkhorn's, the one with the lowest
        upper bound on the objective (a bound on the third derivative of
        the log-sum-exp), so the objective at the current
        :math:`\varepsilon` never increases in exact rounds. The second
        moments are aggregated like the masses and not rescaled when the
        potential moves (:meth:`rescale` returns 1 for them). For exact
        rounds (all clients, no compression, full batches): with noisy or
        stale Hessians the step is not safe.
    scaling_tol : float, default=None
        With ``epsilon_scaling``, an adaptive schedule: the epsilon factor
        shrinks only after a round whose marginal error
        :math:`\|r - b\|_1` at the current :math:`\varepsilon_t` is at
        most ``scaling_tol`` (:meth:`minimize` reads it from the aggregated
        masses). None: the factor shrinks every round.
    kernel_dtype : {None, "float32", "float64"}, default=None
        Precision of the ``chunk x m`` soft-assignment block (the logits'
        matrix product, the max, the exponentials); None: the data's dtype.
        ``"float32"`` on float64 data halves the memory traffic and
        doubles the SIMD width of the exponentials (about twice as fast);
        masses are still accumulated over chunks in float64. The logits
        :math:`\langle x - c, y_j - c\rangle / \varepsilon` then carry a
        rounding error of about :math:`2^{-24} |x - c| |y_j - c| /
        \varepsilon`, the relative error of the soft assignments.

    Attributes
    ----------
    cost_scale_ : float
        :math:`\sigma^2` (1 with ``normalize_cost=None``), set on the
        prepared copy that :meth:`prepare` returns (the server computes it
        and ships it to the clients with the problem).
    reg_ : float
        :math:`\varepsilon` in cost units: ``epsilon * cost_scale_``.

    Notes
    -----
    Stored statistics are multiplied by the cumulative factor
    :math:`e^{(g_t - g_s)/\varepsilon}`, which is huge for a target point
    whose potential keeps rising after the first round (small
    ``epsilon``). A running sum of the control variates would turn its
    float rounding into an O(1) bias; the engine therefore re-derives
    :math:`V = \sum_i w_i V_i` from its mirror of the clients' control
    variates after every change of coordinates.

    References
    ----------
    .. [1] M. Cuturi. Sinkhorn distances: lightspeed computation of optimal
       transport. NeurIPS 2013.
    .. [2] A. Genevay, M. Cuturi, G. Peyré, F. Bach. Stochastic optimization
       for large-scale optimal transport. NeurIPS 2016.
    .. [3] A.-A. Pooladian, J. Niles-Weed. Entropic estimation of optimal
       transport maps. arXiv:2109.12004, 2021.
    .. [4] A. Dieuleveut, G. Fort, M. Hegazy, H.-T. Wai. Federated
       Majorize-Minimization: Beyond Parameter Aggregation.
       arXiv:2507.17534, 2025.

    Examples
    --------
    >>> import numpy as np
    >>> from skfedmm import FedMM
    >>> from skfedmm.problems import EntropicOTProblem
    >>> rng = np.random.default_rng(0)
    >>> clients = [rng.standard_normal((100, 2)) + i for i in range(3)]
    >>> problem = EntropicOTProblem(rng.standard_normal((50, 2)), epsilon=0.1)
    >>> state = FedMM(problem, max_iter=200, tol=1e-6, convergence="mean_field").fit(clients)
    >>> bool(state.history["mean_field"][-1] <= 1e-6)
    True
    """

    def __init__(
        self, target, target_weights=None, *, epsilon=0.05, normalize_cost="spread",
        working_memory=None, min_mass=None, epsilon_scaling=None, kernel_dtype=None,
        newton=False, scaling_tol=None,
    ):
        target = np.asarray(target)
        if target.ndim != 2 or target.shape[0] == 0:
            raise ValueError(f"target must be a non-empty 2-D array, got shape {target.shape}.")
        if target.dtype not in (np.float32, np.float64):
            target = target.astype(np.float64)
        if not np.all(np.isfinite(target)):
            raise ValueError("target contains NaN or infinite values.")
        m = target.shape[0]
        if target_weights is None:
            b = np.full(m, 1.0 / m)
        else:
            b = np.asarray(target_weights, dtype=np.float64)
            if b.shape != (m,):
                raise ValueError(
                    f"target_weights has shape {b.shape}; expected ({m},), one weight per target point."
                )
            if not np.all(np.isfinite(b)) or np.any(b <= 0):
                raise ValueError("target_weights must be finite and strictly positive.")
            b = b / b.sum()
        if not isinstance(epsilon, Real) or isinstance(epsilon, bool) or not 0 < epsilon < np.inf:
            raise ValueError(f"epsilon must be a finite float > 0, got {epsilon!r}.")
        if normalize_cost not in ("spread", None):
            raise ValueError(f"normalize_cost must be 'spread' or None, got {normalize_cost!r}.")
        if epsilon_scaling is not None and (
            not isinstance(epsilon_scaling, Real) or isinstance(epsilon_scaling, bool)
            or not 0 < epsilon_scaling < 1
        ):
            raise ValueError(
                f"epsilon_scaling must be None or a float in (0, 1), got {epsilon_scaling!r}."
            )
        dtype = target.dtype
        self.target = target
        self.target_weights = target_weights  # as given (a deployment rebuilds the problem)
        self.dtype = dtype
        self.weights = b.astype(dtype)
        self.epsilon = float(epsilon)
        self.normalize_cost = normalize_cost
        self.working_memory = working_memory
        self.epsilon_scaling = None if epsilon_scaling is None else float(epsilon_scaling)
        if not isinstance(newton, (bool, np.bool_)):
            raise ValueError(f"newton must be True or False, got {newton!r}.")
        self.newton = bool(newton)
        if scaling_tol is not None and (
            not isinstance(scaling_tol, Real) or isinstance(scaling_tol, bool)
            or not 0 < scaling_tol < np.inf
        ):
            raise ValueError(f"scaling_tol must be None or a positive float, got {scaling_tol!r}.")
        self.scaling_tol = None if scaling_tol is None else float(scaling_tol)
        if kernel_dtype is not None and np.dtype(kernel_dtype) not in (np.float32, np.float64):
            raise ValueError(f"kernel_dtype must be None, float32 or float64, got {kernel_dtype!r}.")
        self.kernel_dtype = dtype if kernel_dtype is None else np.dtype(kernel_dtype)
        self.min_mass = float(np.sqrt(np.finfo(dtype).eps)) if min_mass is None else float(min_mass)
        # Centre of the costs: the b-weighted target mean (exact cancellation
        # of the cross term in the mean cost, and small norms in the BLAS
        # expansion of the costs).
        self.center = (b @ target.astype(np.float64)).astype(dtype)
        self._Yc = target - self.center
        self._y_sq = 0.5 * np.einsum("ij,ij->i", self._Yc, self._Yc, dtype=np.float64)
        self._log_b = np.log(b)
        self.cost_scale_ = 1.0

    # ----------------------------------------------------------- helpers
    @property
    def reg_(self):
        return self.epsilon * self.cost_scale_

    @staticmethod
    def _unpack(theta):
        """``(g, k)``: the potential and the epsilon factor (1 without scaling)."""
        if isinstance(theta, dict):
            return theta["potential"], float(np.asarray(theta["epsilon_factor"]).reshape(-1)[0])
        return theta, 1.0

    def _pack(self, g, factor, like):
        """A parameter of the same structure as ``like``."""
        if isinstance(like, dict):
            return {"potential": g, "epsilon_factor": np.array([factor], dtype=self.dtype)}
        return g

    def _reg_at(self, theta):
        """:math:`\\varepsilon_t` in cost units: ``reg_`` times the epsilon factor."""
        return self.reg_ * self._unpack(theta)[1]

    def start_factor(self, init_stat=None):
        r"""The first epsilon factor of the schedule, :math:`k_0 \ge 1`.

        The schedule starts at :math:`\varepsilon_0 = \sigma^2` (``epsilon``
        1, a blur of one standard deviation of the data) with
        ``normalize_cost="spread"``; with ``normalize_cost=None``, at the
        target's own spread (its mean variance per coordinate, which the
        server knows). Never below the requested :math:`\varepsilon`.
        """
        if self.normalize_cost == "spread":
            start = self.cost_scale_
        else:
            start = float(self.weights.astype(np.float64) @ (2 * self._y_sq)) / self.target.shape[1]
        if not (np.isfinite(start) and start > 0):
            return 1.0
        return max(1.0, start / self.reg_)

    def next_factor(self, factor, error=None):
        r"""The epsilon factor of the next round: :math:`\max(1, q k)`.

        :math:`q` is ``epsilon_scaling``; without scaling the factor is 1
        (a parameter that carries a factor jumps to the requested
        :math:`\varepsilon`). With ``scaling_tol``, the factor shrinks only
        when the round's marginal error ``error`` (at the current
        :math:`\varepsilon_t`) is at most ``scaling_tol``, and stays
        otherwise (an adaptive schedule).
        """
        if self.epsilon_scaling is None:
            return 1.0
        if self.scaling_tol is not None and error is not None and not error <= self.scaling_tol:
            return max(1.0, float(factor))
        return max(1.0, float(factor) * self.epsilon_scaling)

    def _triu(self):
        """Indices of the packed upper triangle of an ``m x m`` matrix."""
        return np.triu_indices(self.target.shape[0])

    def _unpack_second(self, packed):
        """The symmetric ``m x m`` second moment from its packed upper triangle."""
        m = self.target.shape[0]
        Q = np.zeros((m, m))
        Q[self._triu()] = np.asarray(packed, dtype=np.float64).reshape(-1)
        return Q + np.triu(Q, 1).T

    def _newton_step(self, r, second, reg):
        r"""The potential's step: a majorized Newton step, or Sinkhorn's.

        The semi-dual's gradient is :math:`r - b` and its Hessian
        :math:`H = \varepsilon^{-1}(\mathrm{diag}(r) - \mathbb{E}[\chi
        \chi^\top])`, both exact aggregates of the clients' statistics.
        Along a direction :math:`d`, the third derivative of each row's
        log-sum-exp is a third central moment of :math:`d` under the soft
        assignment, at most :math:`R = \mathrm{ptp}(d) / \varepsilon` times
        the second, so :math:`\varphi(t) = F(g + t d)` satisfies

        .. math::

            \varphi(t) \le \varphi(0) + t \nabla F^\top d
            + d^\top H d\, \frac{e^{tR} - tR - 1}{R^2},

        minimized at :math:`t = \log(1 + R a) / R`, :math:`a = -\nabla
        F^\top d / d^\top H d`. The candidates are the Levenberg-Marquardt
        directions :math:`(H + \lambda \varepsilon^{-1} \mathrm{diag}(b))^{-1}
        (b - r)` for :math:`\lambda` on a grid (0: Newton's direction), each
        with its own :math:`t`, and Sinkhorn's step (whose majorizer
        guarantees a decrease of :math:`\varepsilon\, \mathrm{KL}(b \| r)`);
        the step with the lowest bound is taken, so the semi-dual objective
        never increases in exact rounds (an MM step along the chosen line).
        The bound is gauge-free (:math:`\mathrm{ptp}` ignores constants).
        """
        b = self.weights.astype(np.float64)
        r = np.asarray(r, dtype=np.float64)
        sinkhorn = reg * (self._log_b - np.log(r))
        best, step = -reg * float(b @ (self._log_b - np.log(r))), sinkhorn
        sb = np.sqrt(b)
        Q = self._unpack_second(second)
        M = (np.diag(r) - Q) / sb[:, None] / sb[None, :]
        M = 0.5 * (M + M.T)
        if not np.all(np.isfinite(M)):
            return step
        w, V = np.linalg.eigh(M)
        w = np.clip(w, 0.0, None)
        grad = r - b
        gt = V.T @ (grad / sb)
        lams = np.r_[0.0, np.logspace(-8, 2, 41)]
        den = w[:, None] + lams[None, :]
        keep = den > 1e-12 * max(float(w.max()), 1e-300)
        Z = np.where(keep, -gt[:, None] / np.where(keep, den, 1.0), 0.0)
        D = reg * (V @ Z) / sb[:, None]
        gd = grad @ D
        dHd = reg * np.einsum("i,il->l", w, Z * Z)
        R = np.ptp(D, axis=0) / reg
        ok = (gd < 0) & (dHd > 0) & (R > 0) & np.isfinite(R)
        if np.any(ok):
            gd, dHd, R, D = gd[ok], dHd[ok], R[ok], D[:, ok]
            t = np.log1p(R * (-gd / dHd)) / R
            bound = t * gd + dHd * (np.expm1(t * R) - t * R) / R**2
            j = int(np.argmin(bound))
            if bound[j] < best:
                step = t[j] * D[:, j]
        return step

    def _kernel(self, g, eps=None):
        """``[(Y - c)^T / eps; (g - |y - c|^2 / 2) / eps + log b]``."""
        eps = self.reg_ if eps is None else eps
        Yc = self._Yc
        out = np.empty((Yc.shape[1] + 1, Yc.shape[0]), dtype=self.kernel_dtype)
        out[:-1] = Yc.T / eps
        out[-1] = (np.asarray(g, dtype=np.float64) - self._y_sq) / eps + self._log_b
        return out

    def _check_rows(self, X):
        if X.ndim != 2 or X.shape[1] != self.target.shape[1]:
            raise ValueError(
                f"The rows have {X.shape[-1] if X.ndim else 0} features but the target points "
                f"have {self.target.shape[1]}."
            )

    def _chunks(self, X, theta):
        self._check_rows(X)
        X = np.asarray(X, dtype=self.dtype)
        g, factor = self._unpack(theta)
        kernel = self._kernel(g, self.reg_ * factor)
        return _soft_assignment_chunks(X, kernel, self.center, self.working_memory)

    # --------------------------------------------------------- protocol
    def init_statistic(self, X):
        r"""The moments :math:`\sigma^2` needs (``normalize_cost="spread"`` only).

        Returns
        -------
        stat : dict or None
            ``{"mean": (d,), "var": (1,)}``: the mean of the client's rows
            minus the target mean :math:`\bar y`, and the mean squared
            distance of the rows to their own mean. None with
            ``normalize_cost=None`` (nothing leaves the client).
        """
        if self.normalize_cost is None:
            return None
        self._check_rows(X)
        n, d = X.shape
        step = _chunk_rows(n, d * 8, self.working_memory)
        total = np.zeros(d)
        for start in range(0, n, step):
            total += (X[start : start + step] - self.center).sum(axis=0, dtype=np.float64)
        mean = total / n
        # second pass around the client's own mean: no cancellation, however
        # far the rows are from the target
        sq = 0.0
        for start in range(0, n, step):
            D = (X[start : start + step] - self.center) - mean
            sq += float(np.einsum("ij,ij->", D, D, dtype=np.float64))
        return {"mean": mean, "var": np.array([sq / n])}

    def combine_init_statistics(self, stats, weights):
        r"""The pooled mean and spread, combined exactly (law of total variance).

        :math:`\bar x = \sum_i w_i \bar x_i` and
        :math:`\mathbb{E}\|x - \bar x\|^2 = \sum_i w_i (v_i + \|\bar x_i -
        \bar x\|^2)`, :math:`v_i` the clients' spreads around their own means.
        """
        means = np.array([np.asarray(st["mean"], dtype=np.float64) for st in stats])
        var = np.array([float(st["var"][0]) for st in stats])
        w = np.asarray(weights, dtype=np.float64)
        mean = w @ means
        between = np.einsum("ij,ij->i", means - mean, means - mean)
        return {"mean": mean, "var": np.array([float(w @ (var + between))])}

    def spread(self, init_stat):
        r"""The spread :math:`\sigma^2` from the combined init statistic."""
        source = float(init_stat["var"][0])
        target = float(self.weights.astype(np.float64) @ (2 * self._y_sq))
        return 0.5 * (source + target) / self.target.shape[1]

    def prepare(self, init_stat):
        """A copy of the problem with :attr:`cost_scale_` set from the init statistic.

        Raises
        ------
        ValueError
            With ``normalize_cost="spread"`` and no init statistic (a fit
            continued from one made with ``normalize_cost=None``, whose
            clients sent none).
        """
        prepared = copy.copy(self)
        if self.normalize_cost == "spread":
            if init_stat is None or "var" not in init_stat:
                raise ValueError(
                    "normalize_cost='spread' needs the clients' mean and spread, sent in the "
                    "initial round, and this training state has none (it was started with "
                    "normalize_cost=None); start a new fit to normalize the cost."
                )
            scale = self.spread(init_stat)
            # degenerate data (source and target one common point): any scale works
            prepared.cost_scale_ = scale if np.isfinite(scale) and scale > 0 else 1.0
        else:
            prepared.cost_scale_ = 1.0
        return prepared

    def init_parameter(self, init_stat, rng):
        r"""The potential of the translation that aligns the means, or 0.

        With the clients' moments (``normalize_cost="spread"``),
        :math:`g_{0,j} = \langle \bar y - \bar x, y_j - \bar y\rangle`
        (mean zero), the dual potential of the map :math:`x \mapsto x +
        \bar y - \bar x`. Translating the source by :math:`a` and the target
        by :math:`c` adds :math:`\langle c - a, y_j\rangle` + const to it,
        which is exactly how the potentials of the translated problem
        differ, so every iterate (not only the limit) is translation
        equivariant, and far-apart samples start from a sensible map.
        Without moments (``normalize_cost=None``), :math:`g_0 = 0`.
        """
        if init_stat is None or "mean" not in init_stat:
            g = np.zeros(self.target.shape[0], dtype=self.dtype)
        else:
            shift = -np.asarray(init_stat["mean"], dtype=np.float64)  # ybar - xbar
            g = self._Yc.astype(np.float64) @ shift
            g = (g - g.mean()).astype(self.dtype)
        if self.epsilon_scaling is None:
            return g
        return self._pack(g, self.start_factor(init_stat), {})

    def _rows_lse(self, zmax, rowsum, Xc, reg=None):
        r"""Sum over a chunk of :math:`(\ell(x, g) + \langle b, g\rangle) / \varepsilon`."""
        reg = self.reg_ if reg is None else reg
        return (
            float(np.sum(zmax, dtype=np.float64))
            + float(np.sum(np.log(rowsum), dtype=np.float64))
            - 0.5 * float(np.einsum("ij,ij->", Xc, Xc, dtype=np.float64)) / reg
        )

    def statistic_shapes(self, theta):
        r"""``{"mass": (m,)}``, one mass per target point (and ``"second"`` with Newton steps).

        With ``newton=True`` the statistic also holds the mean second
        moment of the soft assignments, :math:`\mathbb{E}[\chi\chi^\top]`,
        as its packed upper triangle of :math:`m(m+1)/2` entries.
        """
        m = self.target.shape[0]
        if self.newton:
            return {"mass": (m,), "second": (m * (m + 1) // 2,)}
        return {"mass": (m,)}

    def check_statistic(self, stat, theta, atol=0.0):
        """Masses are a mean of soft assignments: nonnegative, summing to one."""
        mass = np.asarray(stat["mass"], dtype=np.float64)
        if np.any(mass < -atol):
            return f"a negative mass ({mass.min():.3g})"
        coarse = max(np.finfo(self.dtype).eps, np.finfo(self.kernel_dtype).eps)
        slack = atol * mass.size + 1e3 * coarse
        if abs(mass.sum() - 1.0) > slack:
            return f"masses summing to {mass.sum():.6g}, not 1"
        if self.newton:
            second = np.asarray(stat["second"], dtype=np.float64)
            if np.any(second < -atol):
                return f"a negative second moment ({second.min():.3g})"
        return None

    def local_statistic(self, X, theta):
        """Mean soft assignment ``{"mass": (m,)}`` and mean semi-dual loss."""
        m = self.target.shape[0]
        mass = np.zeros(m, dtype=np.float64)
        second = np.zeros((m, m), dtype=np.float64) if self.newton else None
        total = 0.0
        reg = self._reg_at(theta)
        for _, E, zmax, rowsum, Xc in self._chunks(X, theta):
            total += self._rows_lse(zmax, rowsum, Xc, reg)
            if second is None:
                mass += E.T @ (1.0 / rowsum)
            else:
                E /= rowsum[:, None]  # the soft assignments (E is the chunk's buffer)
                mass += E.sum(axis=0, dtype=np.float64)
                second += E.T @ E
        n = X.shape[0]
        loss = reg * total / n - float(
            self.weights.astype(np.float64) @ np.asarray(self._unpack(theta)[0], dtype=np.float64)
        )
        stat = {"mass": (mass / n).astype(self.dtype)}
        if second is not None:
            stat["second"] = (second[self._triu()] / n).astype(self.dtype)
        return stat, loss

    def _floor(self, r):
        r = np.asarray(r, dtype=self.dtype)
        floor = self.min_mass * self.weights
        return np.where(r > floor, r, floor)

    def minimize(self, stat, theta_prev, rng=None):
        """:math:`g + \\varepsilon_t \\log(b / r)`, then the gauge (mean zero).

        With epsilon scaling the parameter is ``{"potential": g,
        "epsilon_factor": [k]}``: the step uses :math:`\\varepsilon_t = k`
        ``reg_`` (the regularization the masses were measured at), and the
        next factor is :meth:`next_factor` (the problem decides the next
        :math:`\\varepsilon`).
        """
        g_prev, factor = self._unpack(theta_prev)
        r = self._floor(stat["mass"])
        reg = self.reg_ * factor
        if self.newton:
            step = self._newton_step(r, stat["second"], reg)
        else:
            step = reg * (self._log_b - np.log(r.astype(np.float64)))
        g = np.asarray(g_prev, dtype=np.float64) + step
        g = (g - g.mean()).astype(self.dtype)
        error = None
        if self.scaling_tol is not None:
            error = float(np.abs(np.asarray(stat["mass"], dtype=np.float64) - self.weights).sum())
        return self._pack(g, self.next_factor(factor, error), theta_prev)

    def project(self, stat):
        """Keep the masses :math:`r \\ge` ``min_mass`` :math:`\\cdot b > 0`."""
        out = {"mass": self._floor(stat["mass"])}
        if self.newton:
            second = np.asarray(stat["second"])
            out["second"] = np.where(second > 0, second, 0).astype(second.dtype)
        return out

    def project_parameter(self, theta):
        """The gauge: :math:`\\mathrm{mean}(g) = 0` (and an epsilon factor :math:`\\ge 1`)."""
        g, factor = self._unpack(theta)
        g = np.asarray(g)
        g = g - g.mean(dtype=np.float64).astype(g.dtype)
        return self._pack(g, max(1.0, factor), theta)

    def mean_field_norm(self, field):
        r"""The marginal error read off the round: :math:`\|H_{\mathrm{mass}}\|_1`.

        The engine's convergence measure (``convergence="mean_field"``)
        for this problem: the L1 norm of the mass block of the round's
        estimate :math:`H` of :math:`\bar S(\theta_t) - \hat S_t` (in exact
        rounds the aggregated masses minus :math:`b`, since the server's
        masses are :math:`b`); the second moments of Newton steps, which
        change from round to round, do not count.
        """
        return float(np.abs(np.asarray(field["mass"], dtype=np.float64)).sum())

    def restarted(self, stat, theta_prev, theta_new):
        """True while epsilon is still being scaled: no convergence before the last value.

        The round's marginal error was measured at ``theta_prev``'s
        :math:`\\varepsilon`; it says whether the requested problem is
        solved only once that is the requested :math:`\\varepsilon`.
        """
        return self._unpack(theta_prev)[1] != 1.0

    def rescale(self, stat, theta_old, theta_new):
        """Change of mass coordinates :math:`b / r` (gauge-free)."""
        r = self._floor(stat["mass"])
        out = {"mass": (self.weights / r).astype(self.dtype)}
        if self.newton:  # (the second moments are kept as they are)
            out["second"] = np.ones(np.shape(stat["second"]), dtype=self.dtype)
        return out

    def gradient(self, X, theta):
        r"""The stochastic semi-dual gradient (Genevay, Cuturi, Peyré, Bach, 2016).

        :math:`\nabla_g \ell(x, g) = \chi(x; g) - b`, averaged over the
        rows: the mean soft assignment minus the target weights (zero at the
        optimum, where the masses match :math:`b`).

        Returns
        -------
        grad : ndarray of shape (m,)
        loss : float
        """
        stat, loss = self.local_statistic(X, theta)
        grad = stat["mass"].astype(np.float64) - self.weights.astype(np.float64)
        return grad.astype(self.dtype), loss

    def default_learning_rate(self, init_stat):
        r""":math:`\varepsilon / \max_j b_j`, the inverse curvature at the optimum.

        The Hessian of the semi-dual objective is :math:`\varepsilon^{-1}
        \mathbb{E}[\mathrm{diag}(\chi) - \chi\chi^\top]`, whose
        diagonal is about :math:`b / \varepsilon` where the masses match the
        target weights (a gradient step of this size then moves :math:`g_j`
        by :math:`\varepsilon (b_j - r_j) / b_j`, the first-order
        expansion of Sinkhorn's :math:`\varepsilon \log(b_j / r_j)`).
        Needs the prepared problem (:attr:`reg_`).
        """
        return float(self.reg_ / np.max(self.weights.astype(np.float64)))

    def loss(self, X, theta):
        r"""Mean semi-dual loss :math:`\ell(x, g)` over the rows."""
        total = 0.0
        reg = self._reg_at(theta)
        for _, _, zmax, rowsum, Xc in self._chunks(X, theta):
            total += self._rows_lse(zmax, rowsum, Xc, reg)
        return reg * total / X.shape[0] - float(
            self.weights.astype(np.float64) @ np.asarray(self._unpack(theta)[0], dtype=np.float64)
        )

    # ------------------------------------------------------- prediction
    def soft_assignments(self, X, theta):
        """The soft assignments :math:`\\chi(x; g)`, shape (n, m) (small inputs only)."""
        out = np.empty((X.shape[0], self.target.shape[0]), dtype=self.dtype)
        for rows, E, _, rowsum, _ in self._chunks(X, theta):
            out[rows] = E / rowsum[:, None]
        return out

    def barycentric_map(self, X, theta):
        r"""The entropic map :math:`T_\varepsilon(x) = \sum_j \chi_j(x; g) y_j`, chunked."""
        out = np.empty((X.shape[0], self.target.shape[1]), dtype=self.dtype)
        for rows, E, _, rowsum, _ in self._chunks(X, theta):
            out[rows] = (E @ self._Yc.astype(E.dtype, copy=False)) / rowsum[:, None]
        out += self.center
        return out
