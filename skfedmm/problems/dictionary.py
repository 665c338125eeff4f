r"""Dictionary learning as an MM problem (Mairal, Bach, Ponce, Sapiro, 2010).

.. math::

    \min_{D \in \mathcal{C}} \; \sum_i w_i \frac{1}{n_i} \sum_{x \in X_i}
    \min_h \; \tfrac12 \|x - h D\|_2^2 + \alpha \|h\|_1,

where:

- :math:`D` (``n_components x n_features``) is the dictionary, one atom per
  row, in :math:`\mathcal{C} = \{D : \|d_j\|_2 \le 1\}` (and :math:`D \ge 0`
  when ``positive_dict``);
- :math:`h(x; D)` is the sparse code of row :math:`x` (:math:`h \ge 0` when
  ``positive_code``);
- :math:`\alpha` is the sparsity penalty.

Fixing the codes at the current dictionary gives a majorizer linear in the
statistic :math:`S = (A, B)`, :math:`A = \overline{h^\top h}` (``k x k``),
:math:`B = \overline{x^\top h}` (``d x k``):

.. math::

    \tfrac12 \|x - h D\|^2 = \tfrac12 \mathrm{tr}(D^\top h^\top h D)
    - \mathrm{tr}(D^\top h^\top x) + \tfrac12\|x\|^2,

and the M-step :math:`T(A, B) = \arg\min_{D \in \mathcal{C}} \tfrac12
\mathrm{tr}(D^\top A D) - \mathrm{tr}(D B)` is solved by block coordinate
descent over atoms, as scikit-learn's ``_update_dict``.

References
----------
.. [1] J. Mairal, F. Bach, J. Ponce, G. Sapiro. Online learning for matrix
   factorization and sparse coding. JMLR 11, 2010.
"""

import numpy as np
from sklearn.decomposition import sparse_encode

from .base import MMProblem

__all__ = ["DictionaryLearningProblem", "batch_lasso_cd", "lasso_objective", "update_dict"]


def lasso_objective(X, code, dictionary, alpha):
    """Per-row objective :math:`\\frac12\\|x - hD\\|^2 + \\alpha\\|h\\|_1`.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    code : ndarray of shape (n_samples, n_components)
    dictionary : ndarray of shape (n_components, n_features)
    alpha : float

    Returns
    -------
    objective : ndarray of shape (n_samples,)
    """
    residual = X - code @ dictionary
    return 0.5 * np.einsum("ij,ij->i", residual, residual) + alpha * np.abs(code).sum(axis=1)


def batch_lasso_cd(
    X, dictionary, alpha, *, positive=False, tol=1e-4, max_iter=1000, gram=None, cov=None,
    block_size=32, gap_every=5,
):
    r"""Lasso codes of all rows at once by block coordinate descent.

    Solves, for every row :math:`x` of ``X`` independently,

    .. math::

        h(x) = \arg\min_h \tfrac12 \|x - h D\|_2^2 + \alpha \|h\|_1
        \quad (h \ge 0 \text{ if positive}),

    by cyclic coordinate descent on the Gram matrix :math:`G = D D^\top`,
    every coordinate update applied to all rows at once. Coordinates are
    visited in blocks whose residuals come from one matrix-matrix product
    (BLAS 3), corrected within the block. A row stops when the largest
    change of its code in a sweep is at most ``tol`` times its largest
    entry, or (checked every ``gap_every`` sweeps) when its duality gap is
    at most ``tol`` times its objective; the result of a row never
    depends on the other rows.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    dictionary : ndarray of shape (n_components, n_features)
    alpha : float
    positive : bool, default=False
    tol : float, default=1e-4
    max_iter : int, default=1000
        Maximum number of sweeps over the coordinates.
    gram : ndarray of shape (n_components, n_components), default=None
        Precomputed :math:`D D^\top`.
    cov : ndarray of shape (n_samples, n_components), default=None
        Precomputed :math:`X D^\top`.
    block_size : int, default=32
    gap_every : int, default=5
        Sweeps between duality-gap checks.

    Returns
    -------
    code : ndarray of shape (n_samples, n_components)
    """
    dtype = X.dtype
    G = dictionary @ dictionary.T if gram is None else gram
    C = X @ dictionary.T if cov is None else cov
    n, k = C.shape
    H = np.zeros((n, k), dtype=dtype)
    diag = np.diag(G).copy()
    usable = diag > 0
    inv_diag = np.where(usable, 1.0 / np.where(usable, diag, 1.0), 0.0).astype(dtype)
    alpha = dtype.type(alpha)
    blocks = [np.arange(s, min(s + block_size, k)) for s in range(0, k, block_size)]
    rows = np.arange(n)
    sweep = 0
    for _ in range(max_iter):
        if rows.size == 0:
            break
        Hs = np.asfortranarray(H[rows])
        Cs = C[rows]
        max_change = np.zeros(rows.size, dtype=dtype)
        for blk in blocks:
            # residual correlations r_j = C_j - sum_l H_l G_lj for the block,
            # from one product; then corrected for changes made in the block.
            R = Cs[:, blk] - Hs @ G[:, blk]
            changes = np.zeros((rows.size, blk.size), dtype=dtype, order="F")
            for jj, j in enumerate(blk):
                if not usable[j]:
                    continue
                old = Hs[:, j]
                r = R[:, jj] + diag[j] * old
                if jj:
                    r -= changes[:, :jj] @ G[blk[:jj], j]
                if positive:
                    new = np.maximum(r - alpha, 0) * inv_diag[j]
                else:
                    new = np.sign(r) * np.maximum(np.abs(r) - alpha, 0) * inv_diag[j]
                delta = new - old
                changes[:, jj] = delta
                Hs[:, j] = new
                np.maximum(max_change, np.abs(delta), out=max_change)
        H[rows] = Hs
        sweep += 1
        done = max_change <= tol * np.abs(Hs).max(axis=1)
        if sweep % gap_every == 0:
            done |= _lasso_gap_small(X[rows], Hs, dictionary, alpha, positive, tol)
        rows = rows[~done]
    return H


def _lasso_gap_small(X, H, D, alpha, positive, rtol):
    r"""Rows whose duality gap is at most ``rtol`` times their objective.

    The dual point is the residual scaled into the dual feasible set
    :math:`\{\theta : \|D \theta\|_\infty \le \alpha\}` (one-sided
    for positive codes); the gap bounds the objective's distance to its
    minimum, so a row stopped here is within ``rtol`` of optimal.
    """
    R = X - H @ D
    corr = R @ D.T
    bound = corr.max(axis=1) if positive else np.abs(corr).max(axis=1)
    s = np.minimum(1.0, alpha / np.maximum(bound, np.finfo(X.dtype).tiny))
    sq_res = np.einsum("ij,ij->i", R, R)
    primal = 0.5 * sq_res + alpha * np.abs(H).sum(axis=1)
    # dual objective <x, s r> - 1/2 ||s r||^2
    dual = s * np.einsum("ij,ij->i", X, R) - 0.5 * s**2 * sq_res
    return primal - dual <= rtol * primal


def update_dict(dictionary, A, B, *, positive=False, max_sweeps=10, tol=1e-6, rng=None):
    r"""The dictionary M-step from the statistics :math:`(A, B)`.

    Block coordinate descent on :math:`\tfrac12 \mathrm{tr}(D^\top A D) -
    \mathrm{tr}(D B)` over atoms, warm-started at ``dictionary``:

    .. math::

        d_j \leftarrow \Pi\Big(d_j + \frac{B_{:, j} - D^\top A_{j}}{A_{jj}}\Big),

    where :math:`\Pi` projects onto the unit ball (and the nonnegative
    orthant when ``positive``). Sweeps stop when the relative change of
    :math:`D` is below ``tol`` or after ``max_sweeps``. An atom whose
    :math:`A_{jj}` is negligible is unused by every client's codes; the
    server never sees data, so it redraws it as a random unit vector from
    ``rng`` (or leaves it when ``rng`` is None).

    Parameters
    ----------
    dictionary : ndarray of shape (n_components, n_features)
        Not modified.
    A : ndarray of shape (n_components, n_components)
    B : ndarray of shape (n_features, n_components)
    positive : bool, default=False
    max_sweeps : int, default=10
    tol : float, default=1e-6
    rng : numpy.random.Generator, default=None

    Returns
    -------
    dictionary : ndarray of shape (n_components, n_features)
    """
    D = np.array(dictionary, copy=True)
    k = D.shape[0]
    diag = np.diag(A)
    threshold = 1e-10 * max(float(diag.max(initial=0.0)), np.finfo(D.dtype).tiny)
    unused = diag <= threshold
    if rng is not None and unused.any():
        for j in np.flatnonzero(unused):
            atom = rng.standard_normal(D.shape[1])
            if positive:
                atom = np.abs(atom)
            D[j] = atom / np.linalg.norm(atom)
    for _ in range(max_sweeps):
        previous = D.copy()
        for j in range(k):
            if unused[j]:
                continue
            D[j] += (B[:, j] - A[j] @ D) / A[j, j]
            if positive:
                np.maximum(D[j], 0, out=D[j])
            D[j] /= max(np.linalg.norm(D[j]), 1.0)
        change = np.linalg.norm(D - previous)
        if change <= tol * max(np.linalg.norm(previous), np.finfo(D.dtype).tiny):
            break
    return D


def _project_atoms(D, positive):
    D = np.array(D, copy=True)
    if positive:
        np.maximum(D, 0, out=D)
    norms = np.linalg.norm(D, axis=1, keepdims=True)
    D /= np.maximum(norms, 1.0)
    return D


class DictionaryLearningProblem(MMProblem):
    """Dictionary learning for the FedMM engine (see the module docstring).

    Parameters
    ----------
    n_components : int
        Number of atoms :math:`k`.
    alpha : float
        Sparsity penalty.
    n_features : int
        Dimension of the rows.
    fit_algorithm : {"batch_cd", "cd", "lars"}, default="batch_cd"
        The clients' sparse coder: :func:`batch_lasso_cd` (all rows at once),
        or scikit-learn's :func:`~sklearn.decomposition.sparse_encode` with
        ``"lasso_cd"`` / ``"lasso_lars"``.
    positive_code, positive_dict : bool, default=False
    init : {"pca", "random"}, default="pca"
        ``"pca"``: clients send their mean second-moment matrix
        :math:`\\overline{x^\\top x}` (exactly aggregated); the atoms are its
        top eigenvectors (random unit vectors beyond ``n_features``).
        ``"random"``: random unit vectors from the seeded stream.
    dict_init : ndarray of shape (n_components, n_features), default=None
        Initial dictionary (rows projected onto the unit ball); overrides
        ``init``.
    coder_tol : float, default=1e-4
        Relative tolerance of the sparse coder.
    coder_max_iter : int, default=1000
    dict_max_sweeps : int, default=10
        Sweep cap of the dictionary M-step.
    dict_tol : float, default=1e-6
    """

    def __init__(
        self,
        n_components,
        alpha,
        n_features,
        *,
        fit_algorithm="batch_cd",
        positive_code=False,
        positive_dict=False,
        init="pca",
        dict_init=None,
        coder_tol=1e-4,
        coder_max_iter=1000,
        dict_max_sweeps=10,
        dict_tol=1e-6,
    ):
        self.n_components = n_components
        self.alpha = alpha
        self.n_features = n_features
        self.fit_algorithm = fit_algorithm
        self.positive_code = positive_code
        self.positive_dict = positive_dict
        self.init = init
        self.dict_init = dict_init
        self.coder_tol = coder_tol
        self.coder_max_iter = coder_max_iter
        self.dict_max_sweeps = dict_max_sweeps
        self.dict_tol = dict_tol

    # ----------------------------------------------------------- clients
    def encode(self, X, dictionary):
        """Sparse codes of the rows of ``X`` with the fit-time coder."""
        if self.fit_algorithm == "batch_cd":
            return batch_lasso_cd(
                X, dictionary, self.alpha, positive=self.positive_code,
                tol=self.coder_tol, max_iter=self.coder_max_iter,
            )
        algorithm = {"cd": "lasso_cd", "lars": "lasso_lars"}[self.fit_algorithm]
        code = sparse_encode(
            X, dictionary, algorithm=algorithm, alpha=self.alpha,
            positive=self.positive_code, max_iter=self.coder_max_iter, n_jobs=1,
        )
        return code.astype(X.dtype, copy=False)

    def init_statistic(self, X):
        if self.dict_init is None and self.init == "pca":
            return {"M": (X.T @ X) / X.shape[0]}
        return None

    def local_statistic(self, X, theta):
        code = self.encode(X, theta)
        n = X.shape[0]
        stat = {"A": (code.T @ code) / n, "B": (X.T @ code) / n}
        loss = float(np.mean(lasso_objective(X, code, theta, self.alpha)))
        return stat, loss

    def loss(self, X, theta):
        code = self.encode(X, theta)
        return float(np.mean(lasso_objective(X, code, theta, self.alpha)))

    # ------------------------------------------------------------ server
    def init_parameter(self, init_stat, rng):
        k = self.n_components
        if self.dict_init is not None:
            return _project_atoms(self.dict_init, self.positive_dict)
        if init_stat is not None:
            M = init_stat["M"]
            d = M.shape[0]
            evals, evecs = np.linalg.eigh((M + M.T) / 2)
            top = evecs[:, ::-1][:, : min(k, d)].T
            # deterministic signs, as sklearn's svd_flip
            signs = np.sign(top[np.arange(top.shape[0]), np.argmax(np.abs(top), axis=1)])
            top = top * np.where(signs == 0, 1, signs)[:, None]
            D = np.zeros((k, d), dtype=M.dtype)
            D[: top.shape[0]] = top
            extra = k - top.shape[0]
            if extra > 0:
                D[top.shape[0] :] = rng.standard_normal((extra, d))
            return _project_atoms_unit(D, self.positive_dict)
        if self.init == "random":
            return random_dictionary(k, self.n_features, rng, self.positive_dict)
        raise ValueError(f"init must be 'pca' or 'random', got {self.init!r}.")

    def minimize(self, stat, theta_prev, rng=None):
        return update_dict(
            theta_prev, stat["A"], stat["B"], positive=self.positive_dict,
            max_sweeps=self.dict_max_sweeps, tol=self.dict_tol, rng=rng,
        )

    def project(self, stat):
        A = (stat["A"] + stat["A"].T) / 2
        idx = np.diag_indices_from(A)
        A[idx] = np.maximum(A[idx], 0)
        return {"A": A, "B": stat["B"]}

    def project_parameter(self, theta):
        return _project_atoms(theta, self.positive_dict)


def _project_atoms_unit(D, positive):
    """Atoms scaled to unit norm (zero atoms left as they are)."""
    if positive:
        D = np.abs(D)
    norms = np.linalg.norm(D, axis=1, keepdims=True)
    return D / np.where(norms > 0, norms, 1.0)


def random_dictionary(n_components, n_features, rng, positive=False, dtype=np.float64):
    """Random unit-norm atoms from ``rng``."""
    D = rng.standard_normal((n_components, n_features))
    return _project_atoms_unit(D, positive).astype(dtype)
