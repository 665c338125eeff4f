r"""Gaussian mixtures as an MM problem: EM.

.. math::

    \min_{\pi, \mu, \Sigma} \; - \sum_i w_i \frac{1}{n_i} \sum_{x \in X_i}
    \log \sum_{k=1}^K \pi_k \, \mathcal N(x; \mu_k, \Sigma_k),

where:

- :math:`\pi_k \ge 0`, :math:`\sum_k \pi_k = 1` are the mixture weights,
  :math:`\mu_k` the means and :math:`\Sigma_k` the covariances (full, one
  tied matrix, diagonal or spherical: ``covariance_type``);
- :math:`X_i` holds the :math:`n_i` rows of client :math:`i`, :math:`w_i`
  is its weight.

Jensen's inequality with the responsibilities at the current parameter
:math:`\tau`,
:math:`r_k(x) = \pi_k \mathcal N(x; \mu_k, \Sigma_k) / \sum_l \pi_l
\mathcal N(x; \mu_l, \Sigma_l)` (computed in log space with
:func:`log_responsibilities`, the log-sum-exp of
:func:`scipy.special.logsumexp`), gives a majorizer of the negative
log-likelihood that is linear in the statistic

.. math::

    S(x; \tau) = \big(r_k(x),\; r_k(x)\, x,\; r_k(x)\, x x^\top\big)_{k=1..K},

(the second moment in the form the covariance type needs: :math:`x
x^\top` per component for ``"full"``, :math:`\sum_k r_k x x^\top = x
x^\top` for ``"tied"``, :math:`x \odot x` per component for ``"diag"``,
:math:`\|x\|^2` per component for ``"spherical"``). Its minimizer is the EM
M-step, with :math:`s = (s^{(0)}, s^{(1)}, s^{(2)})` the aggregated means:

.. math::

    \pi_k = \frac{s^{(0)}_k}{\sum_l s^{(0)}_l}, \quad
    \mu_k = \frac{s^{(1)}_k}{s^{(0)}_k}, \quad
    \Sigma_k = \frac{s^{(2)}_k}{s^{(0)}_k} - \mu_k \mu_k^\top
    + \lambda I,

(:math:`\lambda` = ``reg_covar``, added as scikit-learn does), so batch MM is
EM exactly (FedEM, Dieuleveut et al. 2021, is this case). The parameter is
a dict of arrays: ``weights``, ``means``, ``covariances`` and
``precisions_cholesky`` (scikit-learn's shapes for the covariance type; the
server computes the Cholesky factors once per round, clients use them).

References
----------
.. [1] A. P. Dempster, N. M. Laird, D. B. Rubin. Maximum likelihood from
   incomplete data via the EM algorithm. JRSS B 39(1), 1977.
.. [2] A. Dieuleveut, G. Fort, E. Moulines, G. Robin. Federated-EM with
   heterogeneity mitigation and variance reduction. NeurIPS 2021.
"""

import copy
import math

import numpy as np
from scipy import linalg

from .base import MMProblem
from .kmeans import _client_rng, local_kmeans_summary, match_to, pooled_kmeans

__all__ = [
    "GaussianMixtureProblem",
    "compute_precision_cholesky",
    "estimate_log_gaussian_prob",
    "log_responsibilities",
    "precision_cholesky_from_precisions",
]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")

_ILL_DEFINED = (
    "Fitting the mixture model failed because some components have ill-defined "
    "empirical covariance (for instance caused by singleton or collapsed samples). "
    "Try to decrease the number of components, increase reg_covar, or scale the "
    "input data."
)


def compute_precision_cholesky(covariances, covariance_type):
    """Cholesky factors of the precisions, from the covariances (as scikit-learn).

    Parameters
    ----------
    covariances : ndarray
        ``(k, d, d)`` full, ``(d, d)`` tied, ``(k, d)`` diag, ``(k,)``
        spherical.
    covariance_type : {"full", "tied", "diag", "spherical"}

    Returns
    -------
    precisions_cholesky : ndarray of the same shape
        Upper-triangular :math:`U` with :math:`U U^\\top = \\Sigma^{-1}` (the
        inverse square roots for diag and spherical).

    Raises
    ------
    ValueError
        A covariance that is not positive definite (scikit-learn's message).
    """
    if covariance_type in ("full", "tied"):
        covs = covariances[None] if covariance_type == "tied" else covariances
        d = covs.shape[-1]
        out = np.empty_like(covs)
        eye = np.eye(d, dtype=covs.dtype)
        for k in range(covs.shape[0]):
            try:
                chol = linalg.cholesky(covs[k], lower=True)
            except linalg.LinAlgError:
                raise ValueError(_ILL_DEFINED) from None
            out[k] = linalg.solve_triangular(chol, eye, lower=True).T
        return out[0] if covariance_type == "tied" else out
    if np.any(covariances <= 0.0):
        raise ValueError(_ILL_DEFINED)
    return 1.0 / np.sqrt(covariances)


def precision_cholesky_from_precisions(precisions, covariance_type):
    """Cholesky factors from given precisions (scikit-learn's ``precisions_init``)."""
    if covariance_type in ("full", "tied"):
        P = precisions[None] if covariance_type == "tied" else precisions
        out = np.stack([np.flipud(np.fliplr(linalg.cholesky(P[k][::-1, ::-1], lower=True)))
                        for k in range(P.shape[0])])
        return out[0] if covariance_type == "tied" else out
    return np.sqrt(precisions)


def _covariances_from_cholesky(prec_chol, covariance_type):
    if covariance_type in ("full", "tied"):
        U = prec_chol[None] if covariance_type == "tied" else prec_chol
        eye = np.eye(U.shape[-1], dtype=U.dtype)
        # Sigma = (U U^T)^{-1} = U^{-T} U^{-1}
        out = np.stack([(lambda Ui: Ui.T @ Ui)(linalg.solve_triangular(U[k], eye, lower=False))
                        for k in range(U.shape[0])])
        return out[0] if covariance_type == "tied" else out
    return 1.0 / prec_chol**2


def estimate_log_gaussian_prob(X, means, precisions_cholesky, covariance_type):
    """:math:`\\log \\mathcal N(x; \\mu_k, \\Sigma_k)` for every row and component.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    means : ndarray of shape (n_components, n_features)
    precisions_cholesky : ndarray
        See :func:`compute_precision_cholesky`.
    covariance_type : {"full", "tied", "diag", "spherical"}

    Returns
    -------
    log_prob : ndarray of shape (n_samples, n_components)
    """
    n, d = X.shape
    k = means.shape[0]
    U = precisions_cholesky
    if covariance_type == "full":
        log_det = np.log(U.reshape(k, -1)[:, :: d + 1]).sum(axis=1)
        sq = np.empty((n, k), dtype=X.dtype)
        for j in range(k):
            y = X @ U[j] - means[j] @ U[j]
            sq[:, j] = np.einsum("ij,ij->i", y, y)
    elif covariance_type == "tied":
        log_det = np.log(np.diag(U)).sum()
        XU, MU = X @ U, means @ U
        sq = np.empty((n, k), dtype=X.dtype)
        for j in range(k):
            y = XU - MU[j]
            sq[:, j] = np.einsum("ij,ij->i", y, y)
    elif covariance_type == "diag":
        log_det = np.log(U).sum(axis=1)
        P = U**2
        sq = (means**2 * P).sum(axis=1) - 2.0 * (X @ (means * P).T) + (X**2 @ P.T)
    else:
        log_det = d * np.log(U)
        P = U**2
        sq = (
            (means**2).sum(axis=1) * P
            - 2 * (X @ means.T * P)
            + np.outer(np.einsum("ij,ij->i", X, X), P)
        )
    return -0.5 * (d * math.log(2 * math.pi) + sq) + log_det


def weighted_log_prob(X, theta, covariance_type):
    """:math:`\\log \\pi_k + \\log \\mathcal N(x; \\mu_k, \\Sigma_k)`, ``(n, k)``."""
    with np.errstate(divide="ignore"):
        log_w = np.log(theta["weights"])
    return estimate_log_gaussian_prob(
        X, theta["means"], theta["precisions_cholesky"], covariance_type
    ) + log_w


def log_responsibilities(weighted_log_prob):
    r"""Row-wise log-sum-exp and the responsibilities, in one pass of ``exp``.

    The computation of :func:`scipy.special.logsumexp` along rows (shift by
    the row maximum, so that nothing overflows; an all ``-inf`` row stays
    ``-inf``), also returning the normalized exponentials it computes on the
    way, which are the responsibilities: no second ``exp`` pass.

    Parameters
    ----------
    weighted_log_prob : ndarray of shape (n_samples, n_components)
        :math:`\log \pi_k + \log \mathcal N(x; \mu_k, \Sigma_k)`.

    Returns
    -------
    log_norm : ndarray of shape (n_samples,)
        :math:`\log \sum_k \pi_k \mathcal N(x; \mu_k, \Sigma_k)`.
    resp : ndarray of shape (n_samples, n_components)
        :math:`r_k(x)`, rows summing to 1.
    """
    top = np.max(weighted_log_prob, axis=1)
    top = np.where(np.isfinite(top), top, 0)
    with np.errstate(under="ignore", divide="ignore", invalid="ignore"):
        resp = np.exp(weighted_log_prob - top[:, None])
        total = resp.sum(axis=1)
        log_norm = np.log(total) + top
        resp /= total[:, None]
    return log_norm, resp


def _psd_part(C):
    """``C`` symmetrized, with negative eigenvalues clipped to 0 (unchanged if PSD)."""
    C = (C + C.T) / 2
    evals, evecs = np.linalg.eigh(C)
    if evals[0] >= 0:
        return C, False
    return (evecs * np.maximum(evals, 0)) @ evecs.T, True


class GaussianMixtureProblem(MMProblem):
    """Gaussian mixture EM for the FedMM engine (see the module docstring).

    Parameters
    ----------
    n_components : int
    covariance_type : {"full", "tied", "diag", "spherical"}, default="full"
    reg_covar : float, default=1e-6
        Added to the covariances' diagonal after every M-step.
    init_params : {"kmeans", "k-means++", "random", "random_from_data"}, default="kmeans"
        What the clients send to initialize (``doc/what_leaves_a_client.md``):

        - ``"kmeans"``: each client's local k-means summary (k-means++ and
          ``local_max_iter`` Lloyd steps, ``n_components`` local clusters):
          per local cluster its mass, centre and within-cluster second
          moment in the covariance type's form. The server groups the
          pooled local clusters by weighted k-means of their centres and
          combines the moments of each group exactly (law of total
          variance): the parameters scikit-learn would compute from hard
          k-means labels, at the granularity of local clusters;
        - ``"k-means++"``: the same summaries, grouped by weighted k-means++
          seeding only (no Lloyd steps on the server);
        - ``"random"``: each client's mean row and mean second moment; the
          server draws the means from the Gaussian they define, uniform
          weights, the pooled covariance;
        - ``"random_from_data"``: each client sends ``n_components`` of its
          *rows*, drawn at random, with its mean and second moment; the
          server draws the means among the pooled rows. Rows leave the
          clients: never the default.
    weights_init, means_init, precisions_init : ndarray, default=None
        Given initial parameters (validated by the estimator); with all
        three, the clients send nothing to initialize.
    random_seed : int, default=0
        Seeds the clients' local draws and the server's.
    local_max_iter : int, default=10
    match_components : bool, default=False
        Permute every M-step's components to match the previous ones
        (Hungarian algorithm on the squared distances between means): for
        the parameter-averaging baseline, so that component ``k`` of every
        client's local model is the continuation of the broadcast component
        ``k`` when the server averages them (see :meth:`minimize`).
    """

    # an exact first round: EM / Lloyd started from a noisy first M-step can
    # settle in a worse local optimum (measured on the tests' blobs)
    compress_first_round = False

    def __init__(
        self,
        n_components,
        covariance_type="full",
        reg_covar=1e-6,
        *,
        init_params="kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_seed=0,
        local_max_iter=10,
        match_components=False,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.reg_covar = reg_covar
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_seed = random_seed
        self.local_max_iter = local_max_iter
        self.match_components = match_components

    def _all_given(self):
        return (
            self.weights_init is not None
            and self.means_init is not None
            and self.precisions_init is not None
        )

    # ----------------------------------------------------------- clients
    def _second_moment(self, X, resp=None):
        """Per-component second moment in the covariance type's form (sums, not means)."""
        t = self.covariance_type
        if t == "tied":
            return X.T @ X
        if resp is None:
            return {"full": X.T @ X, "diag": (X * X).sum(axis=0),
                    "spherical": np.einsum("ij,ij->", X, X)}[t]
        if t == "full":
            out = np.empty((resp.shape[1], X.shape[1], X.shape[1]), dtype=X.dtype)
            for k in range(resp.shape[1]):
                out[k] = (resp[:, k] * X.T) @ X
            return out
        if t == "diag":
            return resp.T @ (X * X)
        return resp.T @ np.einsum("ij,ij->i", X, X)

    def init_statistic(self, X):
        if self._all_given():
            return None
        n = X.shape[0]
        stat = {"mean": X.mean(axis=0), "second": self._second_moment(X) / n}
        rng = _client_rng(self.random_seed, X)
        if self.init_params in ("kmeans", "k-means++"):
            centres, mass, labels = local_kmeans_summary(
                X, self.n_components, rng, max_iter=self.local_max_iter
            )
            resp = np.zeros((n, self.n_components), dtype=X.dtype)
            resp[np.arange(n), labels] = 1
            s2 = self._second_moment(X, resp) / n
            # within-cluster moments: raw second moment minus the centre's part
            if self.covariance_type == "full":
                within = s2 - mass[:, None, None] * np.einsum("ki,kj->kij", centres, centres)
            elif self.covariance_type == "tied":
                within = s2 - (mass[:, None] * centres).T @ centres
            elif self.covariance_type == "diag":
                within = s2 - mass[:, None] * centres**2
            else:
                within = s2 - mass * np.einsum("ij,ij->i", centres, centres)
            stat.update(centres=centres, mass=mass, within=within)
        elif self.init_params == "random_from_data":
            k = self.n_components
            rows = np.zeros((k, X.shape[1]), dtype=X.dtype)
            take = min(k, n)
            rows[:take] = X[np.sort(rng.choice(n, size=take, replace=False))]
            present = np.zeros(k, dtype=X.dtype)
            present[:take] = 1.0 / take
            stat.update(rows=rows, present=present)
        return stat

    def _coordinates(self):
        """The standardization of the statistic: shift and (scalar) scale."""
        return getattr(self, "shift_", None), getattr(self, "scale_", 1.0)

    def local_statistic(self, X, theta):
        n = X.shape[0]
        wlp = weighted_log_prob(X, theta, self.covariance_type)
        log_norm, resp = log_responsibilities(wlp)
        shift, scale = self._coordinates()
        Z = X if shift is None else (X - shift) / scale
        stat = {
            "resp": resp.sum(axis=0) / n,
            "x": (resp.T @ Z) / n,
            "xx": self._second_moment(Z, resp) / n,
        }
        return stat, -float(np.mean(log_norm))

    def loss(self, X, theta):
        return -float(np.mean(log_responsibilities(weighted_log_prob(X, theta, self.covariance_type))[0]))

    # ------------------------------------------------------------ server
    def combine_init_statistics(self, stats, weights):
        """Weighted means of the moments; local summaries side by side.

        Returns
        -------
        init_stat : dict of ndarray
            ``mean`` and ``second`` (client-weighted means over all rows),
            and the stacked local summaries: ``centres``, ``mass``
            (:math:`w_i` times each local cluster's fraction of client
            :math:`i`'s rows) and ``within`` (scaled the same way), or
            ``rows`` and ``present``.
        """
        if stats is None or not stats:
            return None
        out = {name: sum(w * s[name] for s, w in zip(stats, weights)) for name in ("mean", "second")}
        if "centres" in stats[0]:
            out["centres"] = np.concatenate([s["centres"] for s in stats])
            out["mass"] = np.concatenate([w * s["mass"] for s, w in zip(stats, weights)])
            if self.covariance_type == "tied":
                out["within"] = sum(w * s["within"] for s, w in zip(stats, weights))
            else:
                out["within"] = np.concatenate([w * s["within"] for s, w in zip(stats, weights)])
        if "rows" in stats[0]:
            out["rows"] = np.concatenate([s["rows"] for s in stats])
            out["present"] = np.concatenate([w * s["present"] for s, w in zip(stats, weights)])
        return out

    def prepare(self, init_stat):
        r"""A copy holding the pooled mean and scale of the rows.

        The round statistic is computed in standardized coordinates
        :math:`z = (x - m) / \sigma`, with ``shift_`` :math:`m` the pooled
        mean and ``scale_`` :math:`\sigma` the root of the mean per-feature
        variance (one scalar), and the M-step maps back
        (:math:`\mu = m + \sigma \mu_z`, :math:`\Sigma = \sigma^2
        \Sigma_z + \lambda I`). Masses, first and second moments then have
        comparable sizes, which matters when a norm-based compressor adds
        noise to the message as a whole; with exact rounds the parameters
        are the same up to rounding. Without an initialization statistic
        (all initial parameters given) the coordinates are the data's own.
        """
        if init_stat is None:
            return self
        prepared = copy.copy(self)
        mean = np.asarray(init_stat["mean"])
        prepared.shift_ = mean.copy()
        var = self._pooled_variance(mean, np.asarray(init_stat["second"]))
        prepared.scale_ = float(np.sqrt(np.mean(var))) or 1.0
        return prepared

    def _pooled_variance(self, mean, second):
        """Per-feature variance of the pooled rows (from the moments)."""
        t = self.covariance_type
        if t in ("full", "tied"):
            return np.maximum(np.diag(second) - mean**2, 0)
        if t == "diag":
            return np.maximum(second - mean**2, 0)
        return np.full(mean.size, max(float(second) - float(mean @ mean), 0.0) / mean.size)

    def _pooled_covariance(self, mean, second):
        t = self.covariance_type
        if t in ("full", "tied"):
            cov = second - np.outer(mean, mean)
            cov = (cov + cov.T) / 2
            cov.flat[:: cov.shape[0] + 1] += self.reg_covar
            return cov if t == "tied" else np.repeat(cov[None], self.n_components, axis=0)
        if t == "diag":
            var = np.maximum(second - mean**2, 0) + self.reg_covar
            return np.repeat(var[None], self.n_components, axis=0)
        var = max(float(second) / mean.size - float(mean @ mean) / mean.size, 0.0) + self.reg_covar
        return np.full(self.n_components, var, dtype=mean.dtype)

    def _from_groups(self, init_stat, labels, n_groups):
        """Weights, means and covariances of groups of pooled local clusters."""
        C, m, W = init_stat["centres"], init_stat["mass"], init_stat["within"]
        k, d = self.n_components, C.shape[1]
        dtype = C.dtype
        R = np.zeros((C.shape[0], k), dtype=dtype)
        keep = labels >= 0
        R[np.flatnonzero(keep), labels[keep]] = 1
        mass = R.T @ m + 10 * np.finfo(dtype).eps
        means = (R.T @ (m[:, None] * C)) / mass[:, None]
        t = self.covariance_type
        if t == "full":
            # second moment of each group: within-cluster part + centres' part
            raw = np.einsum("ck,cij->kij", R, W) + np.einsum("ck,c,ci,cj->kij", R, m, C, C)
            cov = raw / mass[:, None, None] - np.einsum("ki,kj->kij", means, means)
            cov = (cov + np.swapaxes(cov, 1, 2)) / 2
            cov[:, np.arange(d), np.arange(d)] += self.reg_covar
        elif t == "tied":
            raw = W + (m[:, None] * C).T @ C
            cov = (raw - (mass[:, None] * means).T @ means) / mass.sum()
            cov = (cov + cov.T) / 2
            cov.flat[:: d + 1] += self.reg_covar
        elif t == "diag":
            raw = R.T @ W + R.T @ (m[:, None] * C**2)
            cov = np.maximum(raw / mass[:, None] - means**2, 0) + self.reg_covar
        else:
            raw = R.T @ W + R.T @ (m * np.einsum("ij,ij->i", C, C))
            cov = np.maximum((raw / mass - np.einsum("ij,ij->i", means, means)) / d, 0) + self.reg_covar
        return mass / mass.sum(), means, cov

    def init_parameter(self, init_stat, rng):
        k = self.n_components
        server_rng = np.random.default_rng([int(self.random_seed), 1])
        weights = means = covariances = None
        if init_stat is not None:
            dtype = np.asarray(init_stat["mean"]).dtype
            mean, second = np.asarray(init_stat["mean"]), np.asarray(init_stat["second"])
            if self.init_params in ("kmeans", "k-means++"):
                centres, labels = pooled_kmeans(
                    init_stat["centres"], init_stat["mass"], k, server_rng,
                    lloyd=self.init_params == "kmeans",
                )
                weights, means, covariances = self._from_groups(init_stat, labels, centres.shape[0])
                missing = np.zeros(k, dtype=bool)
                missing[centres.shape[0]:] = True
                if missing.any():  # fewer local clusters than components
                    var = self._pooled_variance(mean, second)
                    n_miss = int(missing.sum())
                    means[missing] = mean + np.sqrt(var) * server_rng.standard_normal((n_miss, mean.size))
                    if self.covariance_type != "tied":
                        covariances[missing] = self._pooled_covariance(mean, second)[missing]
                    weights = np.where(missing, 1.0 / k, weights)
                    weights = weights / weights.sum()
            else:
                covariances = self._pooled_covariance(mean, second)
                weights = np.full(k, 1.0 / k, dtype=dtype)
                if self.init_params == "random":
                    if self.covariance_type in ("full", "tied"):
                        cov = second - np.outer(mean, mean)
                        evals, evecs = np.linalg.eigh((cov + cov.T) / 2)
                        root = evecs * np.sqrt(np.maximum(evals, 0))
                        means = mean + server_rng.standard_normal((k, mean.size)) @ root.T
                    else:
                        var = self._pooled_variance(mean, second)
                        means = mean + np.sqrt(var) * server_rng.standard_normal((k, mean.size))
                else:  # random_from_data
                    p = init_stat["present"] / init_stat["present"].sum()
                    pick = server_rng.choice(p.size, size=k, replace=False, p=p) \
                        if np.count_nonzero(p) >= k else np.flatnonzero(p)[:k]
                    means = np.array(init_stat["rows"][pick])
                    if means.shape[0] < k:
                        means = np.vstack([means, np.repeat(mean[None], k - means.shape[0], axis=0)])
        if self.weights_init is not None:
            weights = np.asarray(self.weights_init)
        if self.means_init is not None:
            means = np.asarray(self.means_init)
        if self.precisions_init is not None:
            prec_chol = precision_cholesky_from_precisions(
                np.asarray(self.precisions_init), self.covariance_type
            )
            covariances = _covariances_from_cholesky(prec_chol, self.covariance_type)
        else:
            prec_chol = compute_precision_cholesky(covariances, self.covariance_type)
        dtype = means.dtype
        return {
            "weights": np.asarray(weights, dtype=dtype),
            "means": np.asarray(means, dtype=dtype),
            "covariances": np.asarray(covariances, dtype=dtype),
            "precisions_cholesky": np.asarray(prec_chol, dtype=dtype),
        }

    def minimize(self, stat, theta_prev, rng=None):
        """The EM M-step (scikit-learn's ``_estimate_gaussian_parameters``).

        With ``match_components``, the components are then permuted to match
        ``theta_prev``'s (the parameter-averaging baseline's label matching:
        a client's local M-steps may exchange two components, and averaging
        component ``k`` across clients is meaningful only if it is the same
        component everywhere).
        """
        dtype = stat["x"].dtype
        nk = stat["resp"] + 10 * np.finfo(dtype).eps
        means = stat["x"] / nk[:, None]
        s2 = stat["xx"]
        t = self.covariance_type
        d = means.shape[1]
        shift, scale = self._coordinates()
        if t == "full":
            cov = s2 / nk[:, None, None] - np.einsum("ki,kj->kij", means, means)
        elif t == "tied":
            cov = (s2 - (nk[:, None] * means).T @ means) / nk.sum()
        elif t == "diag":
            cov = s2 / nk[:, None] - means**2
        else:
            cov = (s2 / nk - np.einsum("ij,ij->i", means, means)) / d
        if shift is not None:  # back from standardized coordinates
            means = shift + scale * means
            cov = scale**2 * cov
        if t == "full":
            cov[:, np.arange(d), np.arange(d)] += self.reg_covar
        elif t == "tied":
            cov.flat[:: d + 1] += self.reg_covar
        else:
            cov = cov + self.reg_covar
        theta = {
            "weights": nk / nk.sum(),
            "means": means,
            "covariances": cov,
            "precisions_cholesky": compute_precision_cholesky(cov, t),
        }
        if self.match_components:
            perm = match_to(means, theta_prev["means"])
            theta = {name: (v if t == "tied" and name in ("covariances", "precisions_cholesky")
                            else v[perm]) for name, v in theta.items()}
        return theta

    def project(self, stat):
        r"""Positive masses and positive semi-definite moments.

        Under compression noise and partial participation the server's
        statistic can leave the valid set. Per component, the moment matrix
        :math:`\begin{pmatrix} s^{(0)}_k & s^{(1)\top}_k \\ s^{(1)}_k &
        s^{(2)}_k \end{pmatrix}` must be positive semi-definite (equivalently
        :math:`s^{(0)}_k \ge 0` and a PSD scatter :math:`s^{(2)}_k -
        s^{(1)}_k s^{(1)\top}_k / s^{(0)}_k`): for ``"full"`` its negative
        eigenvalues are clipped to 0; for ``"diag"`` and ``"spherical"`` the
        second moments are clipped at 0 and the first moments by
        Cauchy-Schwarz, :math:`|s^{(1)}_{kj}| \le (s^{(0)}_k
        s^{(2)}_{kj})^{1/2}`; for ``"tied"`` the pooled scatter's negative
        eigenvalues are clipped (second moments are symmetrized first). A
        component whose mass is below
        :math:`10^{-6} / K` of the total is restarted at the pooled mean and
        second moment with that mass (its mean would otherwise be a ratio
        of noise to noise). A valid statistic whose components all have
        more mass than that is returned unchanged (up to rounding).
        """
        s0 = np.array(stat["resp"], copy=True)
        s1 = np.array(stat["x"], copy=True)
        s2 = np.array(stat["xx"], copy=True)
        t = self.covariance_type
        k = s0.size
        if t in ("full", "tied"):  # (compression noise is not symmetric)
            s2 = (s2 + np.swapaxes(s2, -1, -2)) / 2
        pos = np.maximum(s0, 0)
        if t == "full":
            for j in range(k):
                M = np.empty((s1.shape[1] + 1,) * 2, dtype=s1.dtype)
                M[0, 0], M[0, 1:], M[1:, 0], M[1:, 1:] = s0[j], s1[j], s1[j], s2[j]
                M, changed = _psd_part(M)
                if changed:
                    s0[j], s1[j], s2[j] = M[0, 0], M[1:, 0], M[1:, 1:]
        elif t == "diag":
            s2 = np.maximum(s2, 0)
            bound = np.sqrt(pos[:, None] * s2)
            s1 = np.clip(s1, -bound, bound)
        elif t == "spherical":
            s2 = np.maximum(s2, 0)
            norm = np.sqrt(np.einsum("ij,ij->i", s1, s1))
            bound = np.sqrt(pos * s2)
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.where(norm > bound, bound / np.where(norm > 0, norm, 1), 1.0)
            s1 = s1 * scale[:, None]
        s0 = np.maximum(s0, 0)
        total = max(float(s0.sum()), np.finfo(s1.dtype).tiny)
        floor = 1e-6 * total / k
        low = s0 < floor
        if low.any():
            mean = s1.sum(axis=0) / total
            second = s2 / total if t == "tied" else s2.sum(axis=0) / total
            s0[low] = floor
            s1[low] = floor * mean
            if t != "tied":
                s2[low] = floor * second
        if t == "tied":
            outer = (s1 / s0[:, None]).T @ s1
            C, changed = _psd_part(s2 - outer)
            if changed:
                s2 = C + outer
        return {"resp": s0, "x": s1, "xx": s2}

    def project_parameter(self, theta):
        """Valid averaged parameters: normalized weights, PSD covariances.

        The baseline's server averages every array of the parameter; the
        Cholesky factors are then recomputed from the averaged covariances
        (whose eigenvalues are floored at ``reg_covar``), so the model the
        clients use is the averaged covariance's.
        """
        t = self.covariance_type
        weights = np.maximum(theta["weights"], 0)
        weights = weights / max(weights.sum(), np.finfo(weights.dtype).tiny)
        cov = np.array(theta["covariances"], copy=True)
        if t in ("full", "tied"):
            covs = cov[None] if t == "tied" else cov
            for k in range(covs.shape[0]):
                C = (covs[k] + covs[k].T) / 2
                evals, evecs = np.linalg.eigh(C)
                if evals[0] < self.reg_covar:
                    C = (evecs * np.maximum(evals, self.reg_covar)) @ evecs.T
                covs[k] = C
            cov = covs[0] if t == "tied" else covs
        else:
            cov = np.maximum(cov, self.reg_covar)
        return {
            "weights": weights,
            "means": theta["means"],
            "covariances": cov,
            "precisions_cholesky": compute_precision_cholesky(cov, t),
        }
