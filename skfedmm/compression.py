r"""Unbiased compressors for client-to-server messages.

A compressor :math:`Q` maps a vector :math:`x \in \mathbb{R}^d` to a random
vector with

.. math::

    \mathbb{E}[Q(x)] = x, \qquad
    \mathbb{E}\|Q(x) - x\|^2 \le \omega \|x\|^2,

where:

- :math:`d` is the length of the (flattened) message,
- :math:`\omega \ge 0` is the compressor's variance constant (:attr:`omega`).

Every compressor also reports the exact number of bits its message takes, so
that the communication log of a fit is honest.

Users can plug their own compressor by subclassing :class:`Compressor` and
implementing :meth:`Compressor.omega` and :meth:`Compressor.compress`
(optionally :meth:`Compressor.variance`, the receiver's estimate of a
message's compression error).
"""

import math
from abc import ABC, abstractmethod
from numbers import Integral, Real

import numpy as np

__all__ = ["Compressor", "Identity", "QSGD", "RandK", "make_compressor"]


def _value_bits(x):
    """Bits of one transmitted floating-point value of ``x``'s dtype."""
    return 8 * np.asarray(x).dtype.itemsize


class Compressor(ABC):
    """Base class of unbiased message compressors.

    Subclasses implement :meth:`omega` and :meth:`compress`. A compressor
    holds its hyper-parameters only; every random draw comes from the
    generator passed to :meth:`compress`, so that fits are reproducible.

    Examples
    --------
    A compressor that sends every entry with probability one half, scaled by
    two (unbiased, :math:`\\omega = 1`):

    >>> import numpy as np
    >>> from skfedmm.compression import Compressor
    >>> class Bernoulli(Compressor):
    ...     def omega(self, d):
    ...         return 1.0
    ...     def compress(self, x, rng):
    ...         keep = rng.random(x.shape) < 0.5
    ...         bits = int(keep.sum()) * (64 + 32) + 64
    ...         return np.where(keep, 2 * x, 0), bits
    """

    @abstractmethod
    def omega(self, d):
        """Variance constant of the compressor for messages of length ``d``.

        Parameters
        ----------
        d : int
            Length of the flattened message.

        Returns
        -------
        omega : float
            A constant such that :math:`E\\|Q(x) - x\\|^2 \\le \\omega \\|x\\|^2`.
        """

    @abstractmethod
    def compress(self, x, rng):
        """Compress a 1-D message.

        Parameters
        ----------
        x : ndarray of shape (d,)
            The message.
        rng : numpy.random.Generator
            The stream all random draws come from.

        Returns
        -------
        x_hat : ndarray of shape (d,)
            The decoded message as the receiver reconstructs it; same dtype
            as ``x``.
        bits : int
            Exact number of bits of the encoded message.
        """

    def variance(self, x_hat):
        r"""Estimate of the compression error :math:`E\|Q(x) - x\|^2` of one message.

        Computed by the receiver from the decoded message alone (it costs
        no bits). The step rule of ``step_size="auto"`` weighs the noise of
        the round's messages with it. The default,
        :math:`\frac{\omega}{1 + \omega} \|\hat x\|^2`, is unbiased when
        the compressor's error is :math:`\omega \|x\|^2` (because then
        :math:`E\|\hat x\|^2 = (1 + \omega) \|x\|^2`) and an
        overestimate when it is smaller. Override it if a tighter estimate
        is available.

        Parameters
        ----------
        x_hat : ndarray of shape (d,)
            A message as returned by :meth:`compress`.

        Returns
        -------
        variance : float
        """
        omega = float(self.omega(x_hat.size))
        if omega == 0:
            return 0.0
        ratio = 1.0 if math.isinf(omega) else omega / (1.0 + omega)
        x_hat = np.asarray(x_hat, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            return ratio * float(np.dot(x_hat, x_hat))

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self).__name__, tuple(sorted(vars(self).items()))))


class Identity(Compressor):
    """No compression: every entry is sent at its dtype's precision.

    :math:`\\omega = 0`; a message of length :math:`d` takes :math:`32 d` or
    :math:`64 d` bits.
    """

    def omega(self, d):
        return 0.0

    def compress(self, x, rng):
        return x, x.size * _value_bits(x)


class QSGD(Compressor):
    r"""Stochastic quantization with ``s`` levels per bucket (QSGD, Alistarh et al. 2017).

    The message is cut into consecutive buckets of ``bucket_size`` entries
    (the last one may be shorter); each bucket :math:`x_B` is quantized
    against its own norm:

    .. math::

        Q(x)_j = \|x_B\|_2 \, \mathrm{sign}(x_j) \, \frac{\ell_j}{s},
        \qquad j \in B,

    where:

    - :math:`\ell_j \in \{0, \dots, s\}` is :math:`\lfloor s |x_j| /
      \|x_B\|_2 \rfloor` rounded up with probability equal to the fractional
      part (which makes :math:`Q` unbiased),
    - :math:`\omega = \min(b / s^2, \sqrt{b} / s)`, with :math:`b` the
      bucket length (``min(bucket_size, d)``): one norm per bucket keeps
      :math:`\omega` bounded whatever the message length :math:`d`. (The
      worst-case constant of the QSGD paper, which sets the
      control-variate rate and the step's floor; :meth:`variance` uses the
      tighter :math:`\min(b / (4 s^2), \sqrt{b} / s)`.)

    The message is one norm per bucket (a value at the dtype's precision)
    and the signed levels, in one of two codes (``coding``):

    - ``"rice"`` (default): a variable-length code that spends few bits on
      the small levels, which are the common ones (a typical entry's level
      is about :math:`s / \sqrt{b}`, 1.4 at the defaults, and entries much
      smaller than their bucket's largest get level 0). Per bucket a Rice
      parameter :math:`k` (:math:`\lceil \log_2(w + 1) \rceil` bits, with
      :math:`w = \lceil \log_2(s + 1) \rceil`), chosen by the sender to
      make the bucket shortest; per entry :math:`\lfloor \ell_j / 2^k
      \rfloor` in unary (that many ones and a zero), the :math:`k` low bits
      of :math:`\ell_j`, and a sign bit when :math:`\ell_j > 0`. A level
      0 costs :math:`k + 1` bits.
    - ``"fixed"``: one sign bit and :math:`w` level bits per entry.

    The reported bits are the exact length of that encoding
    (:meth:`encode` writes it, :meth:`decode` reads it back).

    Parameters
    ----------
    s : int, default=16
        Number of quantization levels, at least 1.
    bucket_size : int or None, default=128
        Entries per bucket (one norm each). None: one bucket for the whole
        message (the original QSGD, whose :math:`\omega` grows like
        :math:`\sqrt{d} / s`).
    coding : {"rice", "fixed"}, default="rice"
        How the levels are written (see above); it changes the bits, not
        the decoded message.
    """

    def __init__(self, s=16, bucket_size=128, coding="rice"):
        self.s = s
        self.bucket_size = bucket_size
        self.coding = coding

    def _check(self):
        if not isinstance(self.s, Integral) or isinstance(self.s, bool) or self.s < 1:
            raise ValueError(f"QSGD needs an integer number of levels s >= 1, got {self.s!r}.")
        b = self.bucket_size
        if b is not None and (not isinstance(b, Integral) or isinstance(b, bool) or b < 1):
            raise ValueError(f"QSGD needs an integer bucket_size >= 1 or None, got {b!r}.")
        if self.coding not in ("rice", "fixed"):
            raise ValueError(f"QSGD coding must be 'rice' or 'fixed', got {self.coding!r}.")

    def _bucket(self, d):
        return max(1, d if self.bucket_size is None else min(int(self.bucket_size), d))

    def omega(self, d):
        self._check()
        b = self._bucket(d)
        return min(b / self.s**2, math.sqrt(b) / self.s)

    def variance(self, x_hat):
        r"""The receiver's estimate of the compression error of one message.

        :math:`\frac{\omega'}{1 + \omega'} \|\hat x\|^2` with the
        tighter constant :math:`\omega' = \min(b / (4 s^2), \sqrt b / s)`:
        the rounding of one entry has variance at most :math:`(\|x_B\|_2 /
        s)^2 / 4`, so :math:`E\|Q(x) - x\|^2 \le \omega' \|x\|^2` and
        the estimate is conservative (see :meth:`Compressor.variance`).
        """
        self._check()
        b = self._bucket(x_hat.size)
        tight = min(b / (4 * self.s**2), math.sqrt(b) / self.s)
        x_hat = np.asarray(x_hat, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            return tight / (1.0 + tight) * float(np.dot(x_hat, x_hat))

    def _width(self):
        """Bits of a level in the fixed code, and the largest Rice parameter."""
        return max(1, math.ceil(math.log2(self.s + 1)))

    def _levels(self, x, norms, rng):
        """The signed levels of ``x`` (an int64 vector) against its bucket norms."""
        d = x.size
        b = self._bucket(d)
        safe = np.repeat(np.where(norms > 0, norms, 1.0), b)[:d]
        scaled = np.minimum(np.abs(x) * (self.s / safe), self.s)
        lower = np.floor(scaled)
        levels = (lower + (rng.random(d) < (scaled - lower))).astype(np.int64)
        return np.where(x < 0, -levels, levels)

    def _rice_parameters(self, levels, d):
        """Per bucket, the Rice parameter with the shortest code, and the code's bits."""
        b = self._bucket(d)
        n_buckets = -(-d // b)
        mags = np.zeros(n_buckets * b, dtype=np.int64)
        mags[:d] = np.abs(levels)
        mags = mags.reshape(n_buckets, b)
        sizes = np.full(n_buckets, b, dtype=np.int64)
        sizes[-1] = d - (n_buckets - 1) * b
        ks = np.arange(self._width() + 1)
        # bits of the unary parts, terminators and low bits for each k
        cost = np.stack([(mags >> k).sum(axis=1) + sizes * (k + 1) for k in ks])
        best = np.argmin(cost, axis=0)  # (the smallest k among ties)
        return best.astype(np.int64), int(cost[best, np.arange(n_buckets)].sum())

    def _level_bits(self, levels, d):
        """Exact bits of the levels' code (without the norms)."""
        if self.coding == "fixed":
            return d * (1 + self._width())
        _, bits = self._rice_parameters(levels, d)
        n_buckets = -(-d // self._bucket(d))
        header = max(1, math.ceil(math.log2(self._width() + 1)))
        return n_buckets * header + bits + int(np.count_nonzero(levels))

    def compress(self, x, rng):
        self._check()
        d = x.size
        b = self._bucket(d)
        n_buckets = -(-d // b)
        norms = self.bucket_norms(x)
        if not np.all(np.isfinite(norms)):
            # (not a message the server accepts: counted as the fixed code)
            return x.copy(), n_buckets * _value_bits(x) + d * (1 + self._width())
        levels = self._levels(x, norms, rng)
        bits = n_buckets * _value_bits(x) + self._level_bits(levels, d)
        unit = np.repeat(norms / self.s, b)[:d]
        return (levels * unit).astype(x.dtype, copy=False), bits

    def bucket_norms(self, x):
        """The norms the message of ``x`` carries, one per bucket.

        Parameters
        ----------
        x : ndarray of shape (d,)

        Returns
        -------
        norms : ndarray of shape (ceil(d / bucket),)
            In ``x``'s dtype.
        """
        self._check()
        d = x.size
        b = self._bucket(d)
        with np.errstate(over="ignore", invalid="ignore"):
            if b >= d:
                return np.array([np.linalg.norm(x)], dtype=x.dtype)
            n_buckets = -(-d // b)
            padded = np.zeros(n_buckets * b, dtype=x.dtype)  # zeros add nothing
            padded[:d] = x
            return np.linalg.norm(padded.reshape(n_buckets, b), axis=1).astype(x.dtype, copy=False)

    def encode(self, levels):
        r"""The code of signed levels, as bits (the norms travel beside it).

        Parameters
        ----------
        levels : ndarray of int of shape (d,)
            Signed levels in :math:`[-s, s]`, as :meth:`compress` draws
            them (the decoded message divided by its bucket's
            :math:`\|x_B\|_2 / s`).

        Returns
        -------
        code : ndarray of uint8
            The bits (one per element, 0 or 1); its length is the levels'
            part of the bits :meth:`compress` reports.
        """
        self._check()
        levels = np.asarray(levels, dtype=np.int64).ravel()
        d = levels.size
        mags, neg = np.abs(levels), (levels < 0).astype(np.uint8)
        if self.coding == "fixed":
            return np.concatenate([neg[:, None], _bits(mags, self._width())], axis=1).ravel()
        b = self._bucket(d)
        ks, _ = self._rice_parameters(levels, d)
        header = max(1, math.ceil(math.log2(self._width() + 1)))
        k = np.repeat(ks, b)[:d]
        # the low bits: entry j's k_j lowest bits, most significant first
        width = int(ks.max()) if d else 0
        low = _bits(mags & ((1 << k) - 1), max(width, 1))
        low = low[np.arange(max(width, 1))[None, :] >= max(width, 1) - k[:, None]]
        # the unary parts: q ones then a zero, for every entry
        q = mags >> k
        unary = np.zeros(int(q.sum()) + d, dtype=np.uint8)
        ends = np.cumsum(q + 1) - 1  # each terminator's position
        unary[np.repeat(ends - q, q) + _ramp(q)] = 1
        signs = neg[mags > 0]
        return np.concatenate([_bits(ks, header).ravel(), low, unary, signs])

    def decode(self, code, d):
        """The signed levels of a code written by :meth:`encode`.

        Parameters
        ----------
        code : ndarray of uint8
            The bits, one per element.
        d : int
            The message length.

        Returns
        -------
        levels : ndarray of int64 of shape (d,)

        Raises
        ------
        ValueError
            A code of the wrong length or with a level above ``s``.
        """
        self._check()
        code = np.asarray(code, dtype=np.uint8).ravel()
        w = self._width()
        if self.coding == "fixed":
            if code.size != d * (1 + w):
                raise ValueError(f"a fixed QSGD code of {d} entries has {d * (1 + w)} bits")
            rows = code.reshape(d, 1 + w)
            mags = _ints(rows[:, 1:])
            levels = np.where(rows[:, 0] == 1, -mags, mags)
        else:
            b = self._bucket(d)
            n_buckets = -(-d // b)
            header = max(1, math.ceil(math.log2(w + 1)))
            pos = n_buckets * header
            if code.size < pos:
                raise ValueError("a QSGD code shorter than its header")
            ks = _ints(code[:pos].reshape(n_buckets, header))
            if np.any(ks > w):
                raise ValueError("a Rice parameter out of range")
            k = np.repeat(ks, b)[:d]
            n_low = int(k.sum())
            low_bits = code[pos:pos + n_low]
            if low_bits.size != n_low:
                raise ValueError("a QSGD code shorter than its low bits")
            pos += n_low
            owner = np.repeat(np.arange(d), k)
            weight = 1 << (np.repeat(np.cumsum(k), k) - np.arange(n_low) - 1)
            low = np.bincount(owner, weights=low_bits * weight, minlength=d).astype(np.int64)
            zeros = np.flatnonzero(code[pos:] == 0)[:d]
            if zeros.size < d:
                raise ValueError("a QSGD code shorter than its unary parts")
            q = np.diff(np.concatenate([[-1], zeros])) - 1
            pos += int(zeros[-1]) + 1 if d else 0
            mags = (q << k) + low
            nnz = int(np.count_nonzero(mags))
            if code.size != pos + nnz:
                raise ValueError(f"a QSGD code of {code.size} bits; its levels need {pos + nnz}")
            neg = np.zeros(d, dtype=bool)
            neg[mags > 0] = code[pos:] == 1
            levels = np.where(neg, -mags, mags)
        if np.any(np.abs(levels) > self.s):
            raise ValueError("a QSGD level above s")
        return levels.astype(np.int64)


def _bits(values, width):
    """Nonnegative ints as rows of ``width`` bits (most significant first)."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts) & 1).astype(np.uint8)


def _ints(rows):
    """The ints whose bits (most significant first) are the rows."""
    rows = np.asarray(rows, dtype=np.int64)
    return rows @ (1 << np.arange(rows.shape[1] - 1, -1, -1, dtype=np.int64))


def _ramp(counts):
    """0, 1, ..., c - 1 for every count c, concatenated."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total) - starts


class RandK(Compressor):
    r"""Random-k sparsification.

    Keeps :math:`k` entries chosen uniformly without replacement and scales
    them by :math:`d / k`, so that :math:`Q` is unbiased with
    :math:`\omega = d / k - 1`. The message is :math:`k` values and
    :math:`k` indices of :math:`\lceil \log_2 d \rceil` bits each.

    Parameters
    ----------
    k : int, default=None
        Number of entries kept. Exactly one of ``k`` and ``ratio`` is given.
    ratio : float in (0, 1], default=None
        Fraction of entries kept; ``k = max(1, ceil(ratio * d))``.
    """

    def __init__(self, k=None, ratio=None):
        self.k = k
        self.ratio = ratio

    def _k(self, d):
        if (self.k is None) == (self.ratio is None):
            raise ValueError("RandK needs exactly one of k and ratio.")
        if self.k is not None:
            if not isinstance(self.k, Integral) or isinstance(self.k, bool) or self.k < 1:
                raise ValueError(f"RandK needs an integer k >= 1, got {self.k!r}.")
            return min(int(self.k), d)
        if not isinstance(self.ratio, Real) or not 0 < self.ratio <= 1:
            raise ValueError(f"RandK needs a ratio in (0, 1], got {self.ratio!r}.")
        return max(1, min(d, math.ceil(self.ratio * d)))

    def omega(self, d):
        return d / self._k(d) - 1.0

    def compress(self, x, rng):
        d = x.size
        k = self._k(d)
        bits = k * (_value_bits(x) + max(1, math.ceil(math.log2(d))))
        if k == d:
            return x, d * _value_bits(x)
        keep = rng.choice(d, size=k, replace=False)
        out = np.zeros_like(x)
        out[keep] = x[keep] * (d / k)
        return out, bits


_COMPRESSORS = {"identity": Identity, "none": Identity, "qsgd": QSGD, "randk": RandK}


def make_compressor(compression):
    """Build a compressor from the value of an estimator's ``compression``.

    Parameters
    ----------
    compression : None, str, (str, dict) or Compressor
        ``None`` or ``"identity"``: no compression. ``"qsgd"`` or
        ``"randk"``: those compressors with their default parameters
        (``QSGD(s=16, bucket_size=128, coding="rice")``, ``RandK(ratio=0.1)``). ``(name, params)``: the named
        compressor built with ``params``, e.g. ``("qsgd", {"s": 4})``.
        A :class:`Compressor` instance is used as is.

    Returns
    -------
    compressor : Compressor
    """
    if compression is None:
        return Identity()
    if isinstance(compression, Compressor):
        return compression
    params = {}
    name = compression
    if isinstance(compression, tuple) and len(compression) == 2:
        name, params = compression
        if not isinstance(params, dict):
            raise TypeError(f"compression parameters must be a dict, got {type(params).__name__}.")
    if not isinstance(name, str):
        raise TypeError(
            "compression must be None, a name, a (name, params) pair or a Compressor "
            f"instance, got {compression!r}."
        )
    key = name.lower()
    if key not in _COMPRESSORS:
        raise ValueError(
            f"Unknown compressor {name!r}; choose one of {sorted(_COMPRESSORS)} "
            "or pass a Compressor instance."
        )
    if key == "randk" and not params:
        params = {"ratio": 0.1}
    return _COMPRESSORS[key](**params)
