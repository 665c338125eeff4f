"""Step-size schedules of the server update."""

from numbers import Real

import numpy as np

__all__ = ["PolynomialDecay", "auto_step_size", "minibatch_step_size"]


class PolynomialDecay:
    r"""Step-size schedule :math:`\gamma_t = \gamma_0 / (t + 1)^a`.

    With :math:`1/2 < a \le 1` this is a stochastic-approximation schedule,
    needed for exact convergence under minibatch noise.

    Parameters
    ----------
    gamma0 : float, default=1.0
        Initial step size, in (0, 1].
    power : float, default=0.6
        Decay exponent :math:`a`.
    """

    def __init__(self, gamma0=1.0, power=0.6):
        self.gamma0 = gamma0
        self.power = power

    def __call__(self, t):
        return self.gamma0 / (t + 1) ** self.power

    def __repr__(self):
        return f"PolynomialDecay(gamma0={self.gamma0!r}, power={self.power!r})"

    def __eq__(self, other):
        return isinstance(other, PolynomialDecay) and vars(self) == vars(other)

    def __hash__(self):
        return hash((self.gamma0, self.power))


def auto_step_size(omega, q):
    r"""The worst-case step of ``step_size="auto"``.

    .. math::

        \gamma = \frac{1}{1 + \omega + (1 - q) / (4 q)},

    where :math:`\omega` is the compressor's variance constant and
    :math:`q` the probability that a client takes part in a round: 1 for
    exact rounds (then FedMM is batch MM), smaller as compression and
    partial participation add variance to the server update (control
    variates make the participation term smaller than the compression
    one). In noisy rounds ``"auto"`` measures the noise of each round's
    messages and takes a larger step when they allow it; this worst-case
    value is its floor. ``benchmarks/bench_step_size.py`` compares
    ``"auto"`` with a grid of constants on the dictionary-learning
    benchmark.

    Parameters
    ----------
    omega : float
    q : float in (0, 1]

    Returns
    -------
    gamma : float in (0, 1]
    """
    return 1.0 / (1.0 + omega + (1.0 - q) / (4.0 * q))


class _MeasuredStep:
    r"""``step_size="auto"`` for noisy rounds: a step measured on each round's messages.

    The server's update direction :math:`H_t` is an unbiased but noisy
    estimate of the mean field. Given the round's messages, the noise of
    :math:`H_t` (compression and participation) has the unbiased estimate

    .. math::

        N_t = \sum_{i \in A_t} a_i^2 \big(v_i + (1 - q_i)
        (\|c_i\|^2 - v_i)_+\big),

    where :math:`a_i` is the weight of message :math:`c_i` in :math:`H_t`,
    :math:`q_i` the client's participation probability and :math:`v_i` the
    compressor's estimate of the message's compression error
    (:meth:`~skfedmm.compression.Compressor.variance`). The step is the
    positive-part James-Stein factor of :math:`H_t`,

    .. math::

        \gamma_t = \max\big(\gamma_\text{floor},\;
        1 - N_t / \|H_t\|^2\big),

    which keeps the part of :math:`H_t` that stands above its noise: close
    to 1 when the control variates have made the messages small next to the
    mean field, smaller when noise dominates. The floor is the worst-case
    rule :func:`auto_step_size`. Everything is computed from the messages
    the server receives, in client order: the step is a deterministic
    function of the run's random streams, whatever ``n_jobs``.

    Problems whose statistic is stored relative to the current parameter
    (:meth:`~skfedmm.problems.MMProblem.rescale`, the entropic OT map) keep
    the worst-case rule: their messages change scale from round to round
    with the rescaling, and the measured step overshoots there (entropic OT
    with ``compression="randk"`` diverged with it).
    """

    def __init__(self, floor):
        self.floor = float(floor)

    def __call__(self, t):
        return self.floor

    def step(self, H, payloads, coefs, q, compressor):
        """The step of a round from its direction ``H`` and its messages."""
        if not len(payloads):
            return self.floor
        noise = 0.0
        with np.errstate(over="ignore", invalid="ignore"):
            for c, a, qi in zip(payloads, coefs, q):
                c = np.asarray(c, dtype=np.float64)
                sq = float(np.dot(c, c))
                v = min(max(float(compressor.variance(c)), 0.0), sq)
                noise += float(a) ** 2 * (v + (1.0 - float(qi)) * (sq - v))
            H = np.asarray(H, dtype=np.float64)
            signal = float(np.dot(H, H))
        if not (np.isfinite(noise) and np.isfinite(signal)) or signal <= 0:
            return self.floor
        return float(min(1.0, max(self.floor, 1.0 - noise / signal)))


def minibatch_step_size(gamma, fraction, t, power=0.6):
    r"""The step size of ``step_size="auto"`` with minibatches.

    .. math::

        \gamma_t = \gamma \min\big(1, (f\,(t + 1))^{-a}\big),

    where :math:`\gamma` is :func:`auto_step_size`, :math:`f` the fraction
    of all rows a round draws (``batch_size`` over the clients' sizes) and
    :math:`a` = ``power``: the full step for the first pass over the data
    (:math:`1/f` rounds, while each round brings new rows), then a
    stochastic-approximation decay counted in passes over the data, so
    that minibatch noise averages out. ``benchmarks/bench_minibatch.py``
    compares it with a constant step and with
    :class:`PolynomialDecay` on image patches.

    Parameters
    ----------
    gamma : float in (0, 1]
    fraction : float in (0, 1]
    t : int
        The round index (0 for the first round).
    power : float, default=0.6

    Returns
    -------
    gamma_t : float in (0, 1]
    """
    return gamma * min(1.0, (fraction * (t + 1)) ** -power)


def _step_schedule(step_size, omega, q, fraction=1.0):
    if isinstance(step_size, str):
        if step_size != "auto":
            raise ValueError(f"step_size must be 'auto', a float or a callable, got {step_size!r}.")
        gamma = auto_step_size(omega, q)
        if fraction < 1:  # minibatches
            return lambda t: minibatch_step_size(gamma, fraction, t)
        if gamma < 1:
            return _MeasuredStep(gamma)
        return lambda t: gamma
    if callable(step_size):
        return step_size
    if isinstance(step_size, Real) and not isinstance(step_size, bool):
        if not 0 < step_size <= 1:
            raise ValueError(f"A constant step_size must be in (0, 1], got {step_size!r}.")
        gamma = float(step_size)
        return lambda t: gamma
    raise TypeError(f"step_size must be 'auto', a float or a callable, got {step_size!r}.")
