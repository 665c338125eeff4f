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

import copy

import numpy as np
from sklearn.decomposition import sparse_encode

from .base import MMProblem

__all__ = [
    "DictionaryLearningProblem",
    "batch_lasso_cd",
    "dead_atoms",
    "lasso_objective",
    "residual_second_moment",
    "update_dict",
]


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
    block_size=8, gap_every=5, code_init=None, solver="auto",
):
    r"""Lasso codes of all rows at once, by coordinate descent or active sets.

    Solves, for every row :math:`x` of ``X`` independently,

    .. math::

        h(x) = \arg\min_h \tfrac12 \|x - h D\|_2^2 + \alpha \|h\|_1
        \quad (h \ge 0 \text{ if positive}),

    by cyclic coordinate descent on the Gram matrix :math:`G = D D^\top`,
    every coordinate update applied to all rows at once (the codes are
    held transposed, atoms x rows, so that one atom's entries are
    contiguous). Coordinates are visited in blocks of ``block_size`` whose
    residuals come from one matrix-matrix product (BLAS 3), corrected
    within the block.

    Stopping rules (``tol`` semantics), per row: the largest change of the
    row's code in a sweep is at most ``tol`` times its largest entry; or
    (checked every ``gap_every`` sweeps, from the residual correlations of
    the sweep's start, which bound the gap at its end) its duality gap is at
    most ``tol`` times its objective; or ``max_iter`` sweeps. The result of
    a row never depends on the other rows (up to the rounding of the
    products with the rows, which BLAS may sum in another order for another
    batch).

    With ``solver="active_set"`` the rows are solved exactly instead, on
    their active set (support and signs), as a homotopy or LARS solver
    would but vectorized over rows: every row whose solution has one atom
    is found at once (the atom of largest
    correlation, accepted when the lasso's optimality conditions hold),
    and the other rows are finished by feature-sign search (Lee, Battle,
    Raina, Ng, 2007: exact solves on the support, batched over rows of
    equal support size; the most violating atom joins, an atom whose sign
    flips leaves at the first zero crossing, so that the objective
    decreases at every step). ``code_init`` is then not used (the solves
    are exact, so a start would not change the codes, and measured slower
    on image patches). A row is only accepted at the lasso's
    optimality conditions (violations at most ``tol`` times ``alpha``),
    so its code is at least as accurate as coordinate descent's; a row the
    search cannot finish (a singular restricted system: duplicated atoms,
    or as many atoms as features) returns to coordinate descent. On image
    patches (100 atoms in dimension 64) this is several times faster than
    coordinate descent, which crawls on the coherent atoms of an
    overcomplete dictionary while the codes stay sparse; on
    undercomplete dictionaries with dense codes coordinate descent is
    faster. ``"auto"`` picks ``"active_set"`` when the dictionary has more
    atoms than features, ``"cd"`` otherwise: the choice depends on the
    dictionary's shape only, never on the rows.

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
    block_size : int, default=8
    gap_every : int, default=5
        Sweeps between duality-gap checks.
    code_init : ndarray of shape (n_samples, n_components), default=None
        Starting codes (a warm start, e.g. each row's code at the previous
        dictionary; projected onto the nonnegative orthant when
        ``positive``); zeros when None. Not modified. The codes are still
        computed to ``tol``, so the start changes them only within it.
        Coordinate descent only (see ``solver``), or when ``max_iter`` is 0.
    solver : {"auto", "cd", "active_set"}, default="auto"
        See above.

    Returns
    -------
    code : ndarray of shape (n_samples, n_components)
    """
    if code_init is not None:
        code_init = np.asarray(code_init)
        if code_init.shape != (X.shape[0], dictionary.shape[0]):
            raise ValueError(
                f"code_init has shape {code_init.shape}; expected {(X.shape[0], dictionary.shape[0])}."
            )
        code_init = code_init.T
    code_t = _lasso_codes_t(
        X, dictionary, alpha, positive=positive, tol=tol, max_iter=max_iter, gram=gram,
        cov_t=None if cov is None else cov.T, block_size=block_size, gap_every=gap_every,
        init_t=code_init, solver=solver,
    )
    return np.ascontiguousarray(code_t.T)


def _lasso_codes_t(X, dictionary, alpha, *, positive, tol, max_iter, gram=None, cov_t=None,
                   block_size=8, gap_every=5, init_t=None, solver="auto", sq_norms=None):
    """:func:`batch_lasso_cd` on transposed codes: ``init_t`` and the
    result are ``n_components x n_samples`` (C-contiguous), the layout the
    coordinate descent works in, so that no transposed copy is made;
    ``sq_norms``: the rows' squared norms, when the caller has them."""
    dtype = X.dtype
    G = dictionary @ dictionary.T if gram is None else gram
    # correlations X D^T, transposed (atoms x rows)
    Ct = dictionary @ X.T if cov_t is None else np.ascontiguousarray(cov_t)
    k, n = Ct.shape
    if init_t is None:
        Ht = np.zeros((k, n), dtype=dtype)
    else:
        Ht = np.array(init_t, dtype=dtype, order="C", copy=True)
        if positive:
            np.maximum(Ht, 0, out=Ht)
    diag = np.diag(G).copy()
    usable = diag > 0
    Ht[~usable] = 0
    inv_diag = np.where(usable, 1.0 / np.where(usable, diag, 1.0), 0.0).astype(dtype)
    alpha = dtype.type(alpha)
    if sq_norms is None:
        sq_norms = np.einsum("ij,ij->i", X, X)
    if solver == "auto":
        solver = "active_set" if k > X.shape[1] else "cd"
    if solver not in ("cd", "active_set"):
        raise ValueError(f"solver must be 'auto', 'cd' or 'active_set', got {solver!r}.")
    if max_iter <= 0:
        return Ht
    if solver == "active_set":
        # exact solves from zero: a start would not change the codes, and
        # measured slower (coordinate descent from it, then the search)
        C = np.ascontiguousarray(Ct.T)
        H = np.zeros((n, k), dtype=dtype)
        rows = np.arange(n)
        rows = rows[~_greedy_active_set(C, G, alpha, positive, tol, 1, usable, H)]
        if rows.size:
            Hx, finished = _feature_sign(C[rows], G, H[rows], alpha, positive, tol, max_steps=4 * k + 10)
            H[rows] = Hx  # what is left (singular restricted systems): coordinate descent from there
            rows = rows[~finished]
        Ht = np.ascontiguousarray(H.T)
        if rows.size:
            Ht[:, rows] = _coordinate_descent(
                Ct[:, rows], Ht[:, rows], G, alpha, positive, tol, max_iter, sq_norms[rows],
                inv_diag, block_size, gap_every,
            )
        return Ht
    return _coordinate_descent(
        Ct, Ht, G, alpha, positive, tol, max_iter, sq_norms, inv_diag, block_size, gap_every,
    )


def _coordinate_descent(Ct, Ht, G, alpha, positive, tol, max_iter, sq_norms, inv_diag, block_size,
                        gap_every):
    """Cyclic coordinate descent of :func:`batch_lasso_cd` on transposed
    correlations ``Ct`` (``D X^T``) from transposed codes ``Ht`` (both
    atoms x rows, C-contiguous, owned: modified).

    Returns the transposed codes. A row stops at the end of a sweep by its
    own numbers only; its code is final then, and its later updates (while
    it still sits in the arrays, until enough rows have stopped to make
    dropping them worth a copy) are discarded.
    """
    k, n = Ct.shape
    dtype = Ct.dtype
    out = Ht  # columns of stopped rows are final once the arrays are compacted
    rows = None  # None: the arrays hold every row, in order
    sq = sq_norms
    finished = np.zeros(n, dtype=bool)  # stopped, still in the arrays
    blocks = [(s, min(s + block_size, k)) for s in range(0, k, block_size)]
    # atoms of (numerically) unit norm need no rescaling
    one = np.abs(inv_diag - 1) <= 4 * np.finfo(dtype).eps
    scale = [None if one[j] else inv_diag[j] for j in range(k)]
    diag = np.diag(G)
    diag_blocks = [None if one[s:e].all() else diag[s:e, None] for s, e in blocks]
    bounds = np.full((2, n), alpha, dtype=dtype)
    bounds[0] *= -1
    work = np.empty(n, dtype=dtype)
    # scratch for the blocks' correlations and changes and for |H|, reused
    # every sweep (fresh large arrays would be page-faulted in each time)
    scratch = np.empty((2 * block_size + k) * n, dtype=dtype)
    saved = None  # final columns of stopped rows while they stay in the arrays
    sweep = 0
    m = n
    while m and sweep < max_iter:
        lo, hi, tmp = bounds[0, :m], bounds[1, :m], work[:m]
        size = block_size * m
        check = (sweep + 1) % gap_every == 0
        # the residual correlations C - HG at the sweep's start give the
        # duality gap there, which bounds the gap at its end
        corr = Ct - G @ Ht if check and len(blocks) > 1 else None
        start = Ht.copy() if check else None
        max_change = None
        for (s, e), dg in zip(blocks, diag_blocks):
            # residual correlations r_j = C_j - sum_{l != j} H_l G_lj for the
            # block, from one product; then corrected for changes made in
            # the block
            R = np.matmul(G[s:e], Ht, out=scratch[:(e - s) * m].reshape(e - s, m))
            np.subtract(Ct[s:e], R, out=R)
            if check and corr is None:
                corr = R.copy()
            if dg is None:
                R += Ht[s:e]
            else:
                R += dg * Ht[s:e]
            changes = scratch[size:size + (e - s) * m].reshape(e - s, m)
            for jj in range(e - s):
                j = s + jj
                r = R[jj]
                if jj:
                    r -= G[j, s:j] @ changes[:jj]
                if positive:
                    np.subtract(r, hi, out=tmp)
                    np.maximum(tmp, 0, out=tmp)
                else:  # soft thresholding: r - clip(r, -alpha, alpha)
                    np.maximum(r, lo, out=tmp)
                    np.minimum(tmp, hi, out=tmp)
                    np.subtract(r, tmp, out=tmp)
                if scale[j] is not None:
                    tmp *= scale[j]
                np.subtract(tmp, Ht[j], out=changes[jj])
                Ht[j] = tmp
            np.abs(changes, out=changes)
            change = changes.max(axis=0)
            max_change = change if max_change is None else np.maximum(max_change, change, out=max_change)
        sweep += 1
        done = max_change <= tol * np.abs(Ht, out=scratch[2 * size:2 * size + k * m].reshape(k, m)).max(axis=0)
        if check:
            done |= _gap_from_corr(sq, Ct, start, corr, alpha, positive, tol)
        done &= ~finished
        if not done.any():
            continue
        idx = np.flatnonzero(done) if rows is None else rows[done]
        finished |= done
        # drop the stopped rows once they are a quarter of the arrays
        if 4 * np.count_nonzero(finished) >= m:
            if rows is None:  # first compaction: ``out`` becomes a copy
                out = Ht.copy()
                rows = np.arange(n)
            else:
                out[:, rows[finished]] = Ht[:, finished]
            keep = ~finished
            if saved is not None:
                out[:, saved[0]] = saved[1]
                saved = None
            rows, Ht, Ct, sq = rows[keep], Ht[:, keep], Ct[:, keep], sq[keep]
            finished = finished[keep]
            m = rows.size
        else:
            vals = Ht[:, done]
            saved = (idx, vals) if saved is None else (
                np.concatenate([saved[0], idx]), np.concatenate([saved[1], vals], axis=1))
    if rows is None:
        out = Ht
        if saved is not None:
            out[:, saved[0]] = saved[1]
    else:
        live = ~finished
        out[:, rows[live]] = Ht[:, live]
        if saved is not None:
            out[:, saved[0]] = saved[1]
    return out


def _greedy_active_set(C, G, alpha, positive, tol, steps, usable, H):
    r"""Rows whose lasso solution has at most ``steps`` atoms, found greedily.

    From the zero code, each step adds to every unfinished row's support
    the atom of largest residual correlation :math:`|\rho_j|` (with the
    sign of :math:`\rho_j`), solves the lasso restricted to that support
    and those signs exactly (:math:`h_S = G_{SS}^{-1}(c_S - \alpha
    \sigma)`), and accepts the row when the signs agree and every other
    atom has :math:`|\rho_j| \le \alpha (1 + \mathrm{tol})`: the
    optimality conditions of the lasso, so the code is the row's solution
    (up to a change of the objective below :math:`(\mathrm{tol}\,
    \alpha)^2 / 2` per atom). The other rows are left to
    :func:`_feature_sign` (a row whose signs disagree stops at once).
    Accepted codes are written to ``H``.

    Returns
    -------
    done : ndarray of bool of shape (n_samples,)
    """
    n, k = C.shape
    done = np.zeros(n, dtype=bool)
    live = np.arange(n)
    corr = C
    idx = np.empty((n, 0), dtype=np.intp)
    sign = np.empty((n, 0), dtype=C.dtype)
    h = sign
    bound = alpha * (1 + tol)
    Gflat = G.ravel()
    for step in range(steps + 1):
        score = corr if positive else np.abs(corr)
        if step or not usable.all():
            score = score.copy()
            score[:, ~usable] = -np.inf
            np.put_along_axis(score, idx, -np.inf, axis=1)
        j = np.argmax(score, axis=1)
        ok = np.take_along_axis(score, j[:, None], axis=1)[:, 0] <= bound
        if ok.any():
            done[live[ok]] = True
            if step:
                H[live[ok]] = _scatter(idx[ok], h[ok], k, H.dtype)
        if step == steps:
            break
        keep = ~ok
        live, idx, sign, corr, j = live[keep], idx[keep], sign[keep], corr[keep], j[keep]
        if not live.size:
            break
        s = np.take_along_axis(corr, j[:, None], axis=1)
        s = np.ones_like(s) if positive else np.sign(s)
        idx = np.concatenate([idx, j[:, None]], axis=1)
        sign = np.concatenate([sign, s], axis=1)
        m = step + 1
        rhs = np.take_along_axis(C[live], idx, axis=1) - alpha * sign
        if m == 1:
            h = rhs / Gflat.take(idx * (k + 1))
        else:
            try:
                h = np.linalg.solve(Gflat.take(idx[:, :, None] * k + idx[:, None, :]), rhs[..., None])[..., 0]
            except np.linalg.LinAlgError:
                break
        consistent = np.all(h * sign > 0, axis=1)
        live, idx, sign, h = live[consistent], idx[consistent], sign[consistent], h[consistent]
        if not live.size:
            break
        corr = C[live] - np.einsum("nm,nmk->nk", h, G[idx])
    return done


def _scatter(idx, values, k, dtype):
    out = np.zeros((idx.shape[0], k), dtype=dtype)
    np.put_along_axis(out, idx, values, axis=1)
    return out


def _feature_sign(C, G, H, alpha, positive, tol, max_steps):
    r"""Exact lasso solutions of a few rows by feature-sign search.

    Lee, Battle, Raina, Ng, Efficient sparse coding algorithms (NIPS
    2007), vectorized over rows: each row keeps
    a support :math:`S` and signs :math:`\sigma` (from its start code
    ``H``, row-major, not modified). A step solves the lasso restricted to
    :math:`(S, \sigma)` exactly; when a sign flips, the row moves from its
    code towards that solution only until the first coordinate reaches
    zero, and drops it (the objective decreases along the way, since it is
    the restricted quadratic there); when the signs agree, the row is
    optimal on :math:`S`, and either every other atom has :math:`|\rho_j|
    \le \alpha (1 + \mathrm{tol})` (done: the lasso's optimality
    conditions) or the most violating atom joins :math:`S`. Rows of equal
    support size are solved together; a row's steps use only its own data.

    Returns
    -------
    H : ndarray of shape (n, k)
        The codes (each no worse than its start).
    done : ndarray of bool of shape (n,)
        Rows that reached the optimality conditions within ``max_steps``.
    """
    n, k = C.shape
    H = np.array(H, copy=True, order="C")
    sign = np.sign(H)
    if positive:
        sign = (H > 0).astype(H.dtype)
    # flat views for gathers and scatters by (row * k + atom)
    C_flat = np.ascontiguousarray(C).ravel()
    H_flat, sign_flat = H.ravel(), sign.ravel()
    done = np.zeros(n, dtype=bool)
    live = np.arange(n)
    bound = alpha * (1 + tol)
    Gflat = G.ravel()
    optimal = np.zeros(n, dtype=bool)  # optimal on its support: check the others
    for _ in range(max_steps):
        if not live.size:
            break
        # 1. rows optimal on their support: the optimality conditions off it
        chk = live[optimal[live]]
        if chk.size:
            corr = C[chk] - H[chk] @ G
            score = corr if positive else np.abs(corr)
            score = np.where(sign[chk] != 0, -np.inf, score)
            j = np.argmax(score, axis=1)
            ok = score[np.arange(chk.size), j] <= bound
            done[chk[ok]] = True
            # the most violating atom joins the support
            add = chk[~ok]
            ja = j[~ok]
            sign[add, ja] = 1.0 if positive else np.sign(corr[~ok, ja])
            optimal[add] = False
            live = live[~done[live]]
            if not live.size:
                break
        # 2. the restricted solve of every live row, rows grouped by their
        # support size; entries gathered by flat index (row * k + atom)
        S = sign[live] != 0
        counts = S.sum(axis=1)
        optimal[live[counts == 0]] = True
        failed = []
        for m in np.unique(counts[counts > 0]):
            sel = np.flatnonzero(counts == m)
            rows = live[sel]
            idx = np.nonzero(S[sel])[1].reshape(-1, m)
            flat = rows[:, None] * k + idx
            sg = sign_flat.take(flat)
            c_s = C_flat.take(flat)
            Gs = Gflat.take(idx[:, :, None] * k + idx[:, None, :])
            try:
                hn = np.linalg.solve(Gs, (c_s - alpha * sg)[..., None])[..., 0]
            except np.linalg.LinAlgError:
                failed.append(rows)
                continue
            ho = H_flat.take(flat)
            flip = hn * sg <= 0
            good = ~flip.any(axis=1)
            # consistent: take the solution
            if good.any():
                H[rows[good]] = 0
                H_flat[flat[good]] = hn[good]
                optimal[rows[good]] = True
            bad = ~good
            if bad.any():
                ho, hn, fl, sb = ho[bad], hn[bad], flip[bad], sg[bad]
                # first zero crossing along ho -> hn (ho has the signs sg or is 0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    t = np.where(fl & (ho * sb > 0), ho / (ho - hn), np.inf)
                jt = np.argmin(t, axis=1)
                tt = t[np.arange(t.shape[0]), jt]
                tt = np.where(np.isfinite(tt), tt, 0.0)[:, None]
                hm = ho + tt * (hn - ho)
                hm[np.arange(hm.shape[0]), jt] = 0
                # a coordinate that would leave its orthant at once is dropped
                hm[hm * sb <= 0] = 0
                # the move decreases the objective (restricted to the
                # support, where both codes live) unless the restricted
                # system was singular: such rows stop here
                Gb, cb = Gs[bad], c_s[bad]
                worse = ~(_restricted_objective(hm, Gb, cb, alpha)
                          <= _restricted_objective(ho, Gb, cb, alpha))
                keep = ~worse
                if worse.any():
                    failed.append(rows[bad][worse])
                fb = flat[bad][keep]
                H_flat[fb] = hm[keep]
                sign_flat[fb] = np.where(hm[keep] != 0, sb[keep], 0)
                optimal[rows[bad][keep]] = False
        if failed:
            live = np.setdiff1d(live, np.concatenate(failed))
    return H, done


def _restricted_objective(h, Gs, c, alpha):
    """The lasso objective of codes on their supports, up to the rows'
    constant: :math:`\\tfrac12 h G_{SS} h - c_S h + \\alpha\\|h\\|_1`."""
    return (np.einsum("ri,rij,rj->r", h, Gs, h) / 2 - np.einsum("ri,ri->r", h, c)
            + alpha * np.abs(h).sum(axis=1))


def _gap_from_corr(sq_norms, C, H, corr, alpha, positive, tol):
    r"""Rows whose duality gap, from the residual correlations, is small.

    ``C``, ``H`` and ``corr`` are transposed, atoms x rows.

    With :math:`c = x D^\top`, the residual correlations :math:`\rho = c -
    hG = (x - hD) D^\top` and the dual point :math:`\theta = s (x - hD)`,
    :math:`s = \min(1, \alpha / \|\rho\|_\infty)` (the positive part of
    :math:`\rho` for positive codes), the gap is

    .. math::

        \tfrac12 (1 - s)^2 \|r\|^2 + \alpha \|h\|_1 - s \langle h, \rho\rangle,
        \qquad \|r\|^2 = \|x\|^2 - \langle h, c\rangle - \langle h, \rho\rangle,

    with no product with the rows. A row passes when its gap is at most
    ``tol * (1 - tol)`` times its objective: then a coordinate-descent
    sweep from this point, which lowers the objective and keeps the dual
    point, ends within ``tol`` of optimal.
    """
    hc = np.einsum("ij,ij->j", H, C)
    hr = np.einsum("ij,ij->j", H, corr)
    bound = corr.max(axis=0) if positive else np.abs(corr).max(axis=0)
    s = np.minimum(1.0, alpha / np.maximum(bound, np.finfo(C.dtype).tiny))
    sq_res = np.maximum(sq_norms - hc - hr, 0)
    l1 = np.abs(H).sum(axis=0)
    primal = 0.5 * sq_res + alpha * l1
    gap = 0.5 * (1 - s) ** 2 * sq_res + alpha * l1 - s * hr
    return gap <= tol * (1 - tol) * primal


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


def dead_atoms(A, dictionary, *, unused_tol=1e-10, duplicate_tol=1e-6):
    r"""Atoms the codes do not use, or that duplicate another atom.

    An atom is *unused* when :math:`A_{jj} \le` ``unused_tol`` times the
    largest diagonal entry of :math:`A` (no row's code uses it). Two atoms
    are *duplicates* when :math:`|\cos(d_i, d_j)| \ge 1 -` ``duplicate_tol``;
    of each such pair the less used one (smaller :math:`A_{jj}`, then the
    later index) is dead, and its codes are merged into its twin: with
    :math:`s = \mathrm{sign}\langle d_i, d_j\rangle`, the code
    :math:`h_i + s h_j` on :math:`d_i` reproduces :math:`h_i d_i + h_j d_j`
    up to :math:`|h_j| \|d_j - s d_i\|` and has no larger
    :math:`\ell_1` norm, so the merged statistics

    .. math::

        A' = P^\top A P, \quad B' = B P, \qquad
        P = I \text{ with row } j \text{ replaced by } s e_i^\top

    describe (almost) the same surrogate with atom :math:`j` free.

    Parameters
    ----------
    A : ndarray of shape (n_components, n_components)
    dictionary : ndarray of shape (n_components, n_features)
        The dictionary the codes were computed with.
    unused_tol : float, default=1e-10
    duplicate_tol : float, default=1e-6

    Returns
    -------
    dead : ndarray of bool of shape (n_components,)
    merge : ndarray of shape (n_components, n_components) or None
        The matrix :math:`P` when some used atom is a duplicate, else None.
    """
    D = dictionary
    k = D.shape[0]
    diag = np.diag(A)
    threshold = unused_tol * max(float(diag.max(initial=0.0)), np.finfo(D.dtype).tiny)
    dead = diag <= threshold
    norms = np.linalg.norm(D, axis=1)
    live = np.flatnonzero(~dead & (norms > 0))
    if live.size < 2:
        return dead, None
    U = D[live] / norms[live, None]
    cos = U @ U.T
    if not np.any(np.abs(np.triu(cos, 1)) >= 1 - duplicate_tol):
        return dead, None
    merge = None
    kept = []
    # most used first: a duplicate is merged into an atom used more than it
    for a in np.argsort(-diag[live], kind="stable"):
        twins = [b for b in kept if abs(cos[a, b]) >= 1 - duplicate_tol]
        if not twins:
            kept.append(a)
            continue
        i, j = live[twins[0]], live[a]
        if merge is None:
            merge = np.eye(k, dtype=A.dtype)
        merge[j, j] = 0
        merge[j, i] = np.sign(cos[a, twins[0]])
        dead[j] = True
    return dead, merge


def residual_second_moment(M, A, B, dictionary):
    r"""Second moment of the coding residual, from the statistics alone.

    .. math::

        R = \overline{(x - hD)^\top (x - hD)}
          = M - D^\top B^\top - B D + D^\top A D,

    with :math:`M = \overline{x^\top x}` (``d x d``), :math:`B =
    \overline{x^\top h}` (``d x k``) and :math:`A = \overline{h^\top h}`:
    the server computes it without any row.

    Parameters
    ----------
    M : ndarray of shape (n_features, n_features)
    A : ndarray of shape (n_components, n_components)
    B : ndarray of shape (n_features, n_components)
    dictionary : ndarray of shape (n_components, n_features)

    Returns
    -------
    R : ndarray of shape (n_features, n_features)
        Symmetric.
    """
    D = dictionary
    BD = B @ D
    R = M - BD - BD.T + D.T @ (A @ D)
    return (R + R.T) / 2


def _residual_directions(R, n_atoms, positive, floor):
    r"""Up to ``n_atoms`` unit directions of largest residual energy.

    Unconstrained: the leading eigenvectors of ``R`` (the deflated
    sequence), signed as scikit-learn's ``svd_flip``. Nonnegative atoms:
    for each, the leading eigenvector's better-signed nonnegative part,
    refined by projected power iterations, then ``R`` is deflated. A
    direction whose energy :math:`u^\top R u` is at most ``floor`` is
    dropped (None): nothing is left to explain there.
    """
    out = []
    if not positive:
        evals, evecs = np.linalg.eigh(R)
        for t in range(n_atoms):
            if t >= evals.size or evals[-1 - t] <= floor:
                out.append(None)
                continue
            u = evecs[:, -1 - t]
            out.append(u * (1.0 if u[np.argmax(np.abs(u))] >= 0 else -1.0))
        return out
    R = R.copy()
    for _ in range(n_atoms):
        evals, evecs = np.linalg.eigh(R)
        v = evecs[:, -1]
        if np.linalg.norm(np.maximum(v, 0)) < np.linalg.norm(np.minimum(v, 0)):
            v = -v
        u = np.maximum(v, 0)
        # projected power iterations on R + shift I (positive semidefinite)
        shift = max(0.0, -float(evals[0]))
        for _ in range(30):
            w = np.maximum(R @ u + shift * u, 0)
            norm = np.linalg.norm(w)
            if norm == 0:
                break
            w /= norm
            done = np.linalg.norm(w - u) <= 1e-10
            u = w
            if done:
                break
        norm = np.linalg.norm(u)
        if norm == 0 or u @ R @ u / norm**2 <= floor:
            out.append(None)
            continue
        u = u / norm
        out.append(u)
        Q = np.eye(R.shape[0]) - np.outer(u, u)
        R = Q @ R @ Q
    return out


def update_dict(
    dictionary, A, B, *, positive=False, max_sweeps=10, tol=1e-6, rng=None, M=None,
):
    r"""The dictionary M-step from the statistics :math:`(A, B)`.

    Block coordinate descent on :math:`\tfrac12 \mathrm{tr}(D^\top A D) -
    \mathrm{tr}(D B)` over atoms, warm-started at ``dictionary``:

    .. math::

        d_j \leftarrow \Pi\Big(d_j + \frac{B_{:, j} - D^\top A_{j}}{A_{jj}}\Big),

    where :math:`\Pi` projects onto the unit ball (and the nonnegative
    orthant when ``positive``). Sweeps stop when the relative change of
    :math:`D` is below ``tol`` or after ``max_sweeps``.

    Dead atoms (see :func:`dead_atoms`: unused by every client's codes, or
    duplicating another atom, whose codes are then merged into its twin)
    are re-placed; the server never sees a row:

    - with the second moment ``M``, on the leading directions of the
      residual second moment :math:`R` (:func:`residual_second_moment`) at
      the updated dictionary, one direction per dead atom in order of
      decreasing residual energy (eigenvectors of :math:`R`; deflated
      projected power iterations for nonnegative atoms). A row's code uses
      the new atom :math:`u` as soon as :math:`|\langle r, u\rangle| >
      \alpha` for its residual :math:`r`, which holds for some row whenever
      :math:`u^\top R u > \alpha^2`. An atom is left where it is when
      :math:`R` has no energy left (at most ``1e-12`` times
      :math:`\mathrm{tr}\, M`). Deterministic, and a function of the
      aggregated statistics only;
    - without ``M``, as random unit vectors from ``rng`` (left as they are
      when ``rng`` is None).

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
    M : ndarray of shape (n_features, n_features), default=None
        Mean second moment :math:`\overline{x^\top x}` of the rows coded in
        ``A`` and ``B``.

    Returns
    -------
    dictionary : ndarray of shape (n_components, n_features)
    """
    D = np.array(dictionary, copy=True)
    k = D.shape[0]
    dead, merge = dead_atoms(A, D)
    if merge is not None:
        A = merge.T @ A @ merge
        B = B @ merge
    if M is None and rng is not None and dead.any():
        for j in np.flatnonzero(dead):
            atom = rng.standard_normal(D.shape[1])
            if positive:
                atom = np.abs(atom)
            D[j] = atom / np.linalg.norm(atom)
    for _ in range(max_sweeps):
        previous = D.copy()
        for j in range(k):
            if dead[j]:
                continue
            D[j] += (B[:, j] - A[j] @ D) / A[j, j]
            if positive:
                np.maximum(D[j], 0, out=D[j])
            D[j] /= max(np.sqrt(D[j] @ D[j]), 1.0)
        change = np.linalg.norm(D - previous)
        if change <= tol * max(np.linalg.norm(previous), np.finfo(D.dtype).tiny):
            break
    if M is not None and dead.any():
        live = np.where(dead[:, None], 0, D)
        R = residual_second_moment(M, A, B, live)
        floor = 1e-12 * max(float(np.trace(M)), np.finfo(D.dtype).tiny)
        directions = _residual_directions(R, int(dead.sum()), positive, floor)
        for j, u in zip(np.flatnonzero(dead), directions):
            if u is not None:
                D[j] = u
    return D


#: ``code_cache="auto"`` keeps a client's codes up to this size.
_AUTO_CACHE_BYTES = 64 * 2**20
#: ... and with minibatches, when a batch is at least this fraction (1/n) of the rows.
_AUTO_MIN_DRAWN = 16
#: Size of the coder's row chunks (see ``DictionaryLearningProblem._chunk_rows``).
_CHUNK_BYTES = 4 * 2**20


def _fingerprint(X):
    r"""One number per row, :math:`\langle x, v\rangle` for a fixed vector
    :math:`v`: a changed row gets a different one (almost surely)."""
    v = np.cos(np.arange(1, X.shape[1] + 1) * 0.7390851332151607) + 1.4142135623730951
    return X @ v.astype(X.dtype)


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
        The clients' sparse coder: :func:`batch_lasso_cd` (all rows at once;
        coordinate descent, or exact active-set solves for overcomplete
        dictionaries),
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
    code_cache : {"auto", True, False}, default="auto"
        Warm-start each row's code from its code at the previous round
        (``"batch_cd"`` only): the client keeps its rows' last codes
        (:meth:`client_cache`, ``n_rows x n_components`` values, transposed,
        plus one fingerprint per row, never sent). A row is warm-started
        only from its own last code, and only while its fingerprint
        (:math:`\\langle x, v\\rangle` for a fixed vector :math:`v`) is
        unchanged, so its code never depends on other rows; each code is
        still computed to the coder's tolerance, so warm starts change
        codes only within it. With minibatches a row starts from its code
        at the last round it was drawn, and the client copies its codes
        every round. ``"auto"``: when the client's codes take at most 64
        MiB, and, with minibatches, a batch is at least a sixteenth of the
        client's rows (rows come back often enough, and the copy costs at
        most 16 batches' codes); ``True``: always; ``False``: never. With
        more atoms than features there is no cache: :func:`batch_lasso_cd`'s
        exact active-set solver starts from zero, and cached codes would
        change nothing.
    atom_restart : {"auto", "residual", "random"}, default="auto"
        Where the server re-places dead atoms (unused, or duplicating
        another atom; see :func:`update_dict`). ``"residual"``: clients add
        their mean second moment :math:`M = \\overline{x^\\top x}` (``d x d``)
        to the initialization statistic (once, before the first round; the
        ``"pca"`` initialization sends it anyway), :meth:`prepare` keeps the
        aggregate, and dead atoms go to the leading directions of the
        residual second moment; a round that moves one does not count as
        converged (:meth:`restarted`). ``"random"``: random unit vectors
        from the M-step stream, nothing extra sent. ``"auto"``:
        ``"residual"`` when :math:`M` is sent anyway (``init="pca"``
        without ``dict_init``) or costs at most one round's statistic
        :math:`(A, B)`, ``n_features**2 <= n_components**2 + n_features *
        n_components``; ``"random"`` otherwise.
    """

    # the second moment M only seeds the dictionary (PCA) and the
    # residual rule's directions: compressed when the messages are
    compress_init_statistic = True

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
        atom_restart="auto",
        code_cache="auto",
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
        self.atom_restart = atom_restart
        self.code_cache = code_cache

    def _pca_init(self):
        return self.dict_init is None and self.init == "pca"

    def uses_residual_rule(self):
        """Whether dead atoms follow the residual rule (``atom_restart``)."""
        if self.atom_restart == "auto":
            d, k = self.n_features, self.n_components
            return self._pca_init() or d * d <= k * k + d * k
        if self.atom_restart in ("residual", "random"):
            return self.atom_restart == "residual"
        raise ValueError(
            f"atom_restart must be 'auto', 'residual' or 'random', got {self.atom_restart!r}."
        )

    # ----------------------------------------------------------- clients
    def encode(self, X, dictionary, code_init=None):
        """Sparse codes of the rows of ``X`` with the fit-time coder
        (``"batch_cd"`` starts from ``code_init`` when given)."""
        if self.fit_algorithm == "batch_cd":
            init_t = None if code_init is None else np.asarray(code_init).T
            return np.ascontiguousarray(self._encode_t(X, dictionary, init_t).T)
        algorithm = {"cd": "lasso_cd", "lars": "lasso_lars"}[self.fit_algorithm]
        code = sparse_encode(
            X, dictionary, algorithm=algorithm, alpha=self.alpha,
            positive=self.positive_code, max_iter=self.coder_max_iter, n_jobs=1,
        )
        return code.astype(X.dtype, copy=False)

    def _encode_t(self, X, dictionary, init_t=None, sq_norms=None):
        """:meth:`encode`'s codes transposed (atoms x rows), from transposed
        starting codes ``init_t`` (and the rows' squared norms, when known);
        for ``"batch_cd"`` no transposed copy is made."""
        if self.fit_algorithm == "batch_cd":
            return _lasso_codes_t(
                X, dictionary, self.alpha, positive=self.positive_code,
                tol=self.coder_tol, max_iter=self.coder_max_iter, init_t=init_t,
                sq_norms=sq_norms,
            )
        return self.encode(X, dictionary).T

    def client_cache(self, X):
        """An empty code cache when ``code_cache`` is on for ``X``, else None."""
        if self.fit_algorithm != "batch_cd" or self.code_cache is False:
            return None
        if self.n_components > X.shape[1]:  # the exact active-set solver: no use for starts
            return None
        if self.code_cache == "auto":
            size = X.shape[0] * self.n_components * X.dtype.itemsize
            return {} if size <= _AUTO_CACHE_BYTES else None
        if self.code_cache is True:
            return {}
        raise ValueError(f"code_cache must be 'auto', True or False, got {self.code_cache!r}.")

    def cached_statistic(self, X, theta, cache, rows):
        """:meth:`local_statistic` on ``X[rows]``, each row warm-started at
        its last code in ``cache`` (see ``code_cache``); the next cache."""
        n, k = X.shape[0], self.n_components
        if self.client_cache(X) is None:  # the cache was switched off: drop it
            stat, loss = self.local_statistic(X if rows is None else X[rows], theta)
            return stat, loss, None
        if rows is not None and self.code_cache == "auto" and rows.size * _AUTO_MIN_DRAWN < n:
            stat, loss = self.local_statistic(X[rows], theta)
            return stat, loss, cache
        # the codes are kept transposed (atoms x rows), the coder's layout
        codes, marks = cache.get("codes_t"), cache.get("fingerprint")
        if codes is None or codes.shape != (k, n) or marks.shape != (n,):
            codes = marks = None
        batch = X if rows is None else X[rows]
        mark = _fingerprint(batch)
        init = None
        if codes is not None:
            same = marks if rows is None else marks[rows]
            same = same == mark
            if same.any():
                init = codes if rows is None else codes[:, rows]
                if not same.all():
                    init = np.where(same, init, 0).astype(X.dtype, copy=False)
        stat, loss, code = self._coded_statistic(batch, theta, init, keep_codes=True)
        if rows is None:
            return stat, loss, {"codes_t": code, "fingerprint": mark}
        codes = np.zeros((k, n), dtype=X.dtype) if codes is None else codes.copy()
        # unseen rows: zero codes, so a matching zero mark is a cold start
        marks = np.zeros(n, dtype=X.dtype) if marks is None else marks.copy()
        codes[:, rows] = code
        marks[rows] = mark
        return stat, loss, {"codes_t": codes, "fingerprint": marks}

    def init_statistic(self, X, code=None):
        """The client's second moment ``M`` (PCA init, residual rule) and,
        given initial codes ``code`` (``code_init``, which stay with the
        client), their statistics ``A0 = mean h h^T``, ``B0 = mean x^T h``."""
        stat = {}
        if self._pca_init() or self.uses_residual_rule():
            stat["M"] = (X.T @ X) / X.shape[0]
        if code is not None:
            code = np.asarray(code, dtype=X.dtype)
            stat["A0"] = (code.T @ code) / X.shape[0]
            stat["B0"] = (X.T @ code) / X.shape[0]
        return stat or None

    def prepare(self, init_stat):
        """A copy holding the aggregated second moment, for the residual rule.

        Parameters
        ----------
        init_stat : dict of ndarray or None
            The aggregated :meth:`init_statistic`.

        Returns
        -------
        problem : DictionaryLearningProblem
            ``self`` when the residual rule is off; otherwise a copy whose
            ``second_moment_`` is the clients' weighted mean
            :math:`\\overline{x^\\top x}` (symmetrized).
        """
        if init_stat is None or "M" not in init_stat or not self.uses_residual_rule():
            return self
        prepared = copy.copy(self)
        M = np.asarray(init_stat["M"])
        prepared.second_moment_ = (M + M.T) / 2
        return prepared

    def check_statistic(self, stat, theta, atol=0.0):
        """``A`` (and ``M``) are second moments: nonnegative diagonals, Cauchy-Schwarz."""
        A = stat["A"]
        diag = np.diagonal(A)
        if np.any(diag < -atol):
            return f"A has a negative diagonal entry ({diag.min():.3g})"
        # an error atol on a diagonal entry allows sqrt(atol * A_ll) on the
        # off-diagonal ones: an atom used by one row with a tiny code has
        # A_jj ~ h^2 lost to rounding while A_jl ~ h stays visible
        root = np.sqrt(np.maximum(diag, 0) + atol)
        slack = 1 + 64 * np.finfo(A.dtype).eps  # rounding of the products
        if np.any(np.abs(A) > np.outer(root, root) * slack + atol):
            return "A is not a second moment (|A_jl| > sqrt(A_jj A_ll))"
        if "M" in stat and np.any(np.diagonal(stat["M"]) < -atol):
            return "M has a negative diagonal entry"
        return None

    def local_statistic(self, X, theta):
        stat, loss, _ = self._coded_statistic(X, theta)
        return stat, loss

    def _coded_statistic(self, X, theta, code_init=None, keep_codes=False):
        r"""Statistic and mean loss of ``X``'s codes, coded in chunks of rows.

        Rows are coded ``_chunk_rows`` at a time (a row's code does not
        depend on the others), so that the coder's temporaries stay small
        however many rows a client has; the codes (transposed, atoms x rows,
        as ``code_init``) are kept only when ``keep_codes``.

        The loss of float64 rows comes from the statistic,
        :math:`\tfrac12 \overline{\|x\|^2} - \langle B, D^\top\rangle +
        \tfrac12 \langle A, D D^\top\rangle + \alpha \overline{\|h\|_1}`, with
        no residual formed; float32 rows, whose statistic is rounded to
        float32, sum the rows' residuals instead.
        """
        n, k = X.shape[0], self.n_components
        step = self._chunk_rows(X)
        A = np.zeros((k, k), dtype=X.dtype)
        B = np.zeros((X.shape[1], k), dtype=X.dtype)
        total = sq_norms = l1 = 0.0
        codes = np.empty((k, n), dtype=X.dtype) if keep_codes and step < n else None
        exact = X.dtype == np.float64
        for start in range(0, n, step):
            part = slice(start, min(start + step, n))
            Xc = X[part]
            row_sq = np.einsum("ij,ij->i", Xc, Xc)  # (the coder's duality gap needs them too)
            code = self._encode_t(Xc, theta, None if code_init is None else code_init[:, part],
                                  row_sq)
            A += code @ code.T
            B += Xc.T @ code.T
            if exact:
                sq_norms += float(row_sq.sum())
                l1 += float(np.abs(code).sum())
            else:
                total += float(np.sum(lasso_objective(Xc, code.T, theta, self.alpha)))
            if keep_codes and step >= n:
                codes = code  # one chunk: no copy
            elif keep_codes:
                codes[:, part] = code
        if exact:  # the residuals' sum is nonnegative (up to rounding)
            fit = sq_norms / 2 - float(np.einsum("ij,ji->", B, theta)) \
                + float(np.einsum("ij,ij->", A, theta @ theta.T)) / 2
            total = max(fit, 0.0) + self.alpha * l1
        return {"A": A / n, "B": B / n}, total / n, codes

    def _chunk_rows(self, X):
        """Rows coded at a time: about 4 MiB per ``rows x max(k, d)`` array."""
        width = max(self.n_components, X.shape[1]) * X.dtype.itemsize
        return max(1024, _CHUNK_BYTES // width)

    def loss(self, X, theta):
        return self._coded_statistic(X, theta)[1]

    # ------------------------------------------------------------ server
    def init_parameter(self, init_stat, rng):
        """The ``dict_init``/``init`` dictionary, then, with initial codes, one
        M-step on their aggregated statistics ``(A0, B0)``."""
        D = self._start_dictionary(init_stat, rng)
        if init_stat is not None and "A0" in init_stat:
            D = update_dict(
                D, init_stat["A0"], init_stat["B0"], positive=self.positive_dict,
                max_sweeps=self.dict_max_sweeps, tol=self.dict_tol, rng=rng,
                M=getattr(self, "second_moment_", None),
            )
        return D

    def _start_dictionary(self, init_stat, rng):
        k = self.n_components
        if self.dict_init is not None:
            return _project_atoms(self.dict_init, self.positive_dict)
        if self._pca_init() and init_stat is not None:
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
            M=getattr(self, "second_moment_", None),
        )

    def restarted(self, stat, theta_prev, theta_new):
        """Whether the M-step moved a dead atom to a new direction.

        Only with the residual rule (a prepared problem): its
        placement is deterministic, so an atom that stays dead is placed
        on the same direction again and stops counting as a restart once
        the other atoms have settled. Random re-draws (no ``M``) change the
        atom every round and are not reported, so that they cannot hold
        the fit back forever.

        Parameters
        ----------
        stat : dict of ndarray
            The statistic :meth:`minimize` was given.
        theta_prev, theta_new : ndarray of shape (n_components, n_features)
            Its warm start and its result.

        Returns
        -------
        restarted : bool
        """
        if getattr(self, "second_moment_", None) is None:
            return False
        dead, _ = dead_atoms(stat["A"], theta_prev)
        if not dead.any():
            return False
        prev, new = theta_prev[dead], theta_new[dead]
        norms = np.linalg.norm(prev, axis=1) * np.linalg.norm(new, axis=1)
        cos = np.abs(np.einsum("ij,ij->i", prev, new)) / np.where(norms > 0, norms, 1.0)
        moved = np.where(norms > 0, cos < 1 - 1e-6, np.any(prev != new, axis=1))
        return bool(moved.any())

    def project(self, stat):
        A = (stat["A"] + stat["A"].T) / 2
        idx = np.diag_indices_from(A)
        A[idx] = np.maximum(A[idx], 0)
        return {"A": A, "B": stat["B"]}

    def project_parameter(self, theta):
        return _project_atoms(theta, self.positive_dict)

    def gradient(self, X, theta):
        r"""Gradient of the mean loss in the dictionary, :math:`A D - B^\top`.

        With the codes :math:`h(x; D)` computed at ``theta`` (the statistics
        :math:`A = \overline{h^\top h}`, :math:`B = \overline{x^\top h}`),
        :math:`\nabla_D \tfrac12\|x - hD\|^2 = h^\top (hD - x)`, averaged
        over the rows. The loss minimized over the codes has this gradient
        wherever the codes are unique (Danskin's theorem).

        Returns
        -------
        grad : ndarray of shape (n_components, n_features)
        loss : float
        """
        code = self.encode(X, theta)
        residual = code @ theta - X
        grad = (code.T @ residual) / X.shape[0]
        loss = float(np.mean(
            0.5 * np.einsum("ij,ij->i", residual, residual) + self.alpha * np.abs(code).sum(axis=1)
        ))
        return grad, loss

    def default_learning_rate(self, init_stat):
        r""":math:`1 / \lambda_{\max}(M)`, :math:`M = \overline{x^\top x}`, when the
        clients sent their second moment (``init="pca"`` or the residual rule), else 1.

        The curvature of the loss in :math:`D` is :math:`\lambda_{\max}(A)`,
        the codes' energy, of the order of the rows' :math:`\lambda_{\max}(M)`
        for unit atoms.
        """
        if init_stat is None or "M" not in init_stat:
            return 1.0
        M = np.asarray(init_stat["M"], dtype=np.float64)
        top = float(np.linalg.eigvalsh((M + M.T) / 2)[-1])
        return 1.0 / top if np.isfinite(top) and top > 0 else 1.0


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
