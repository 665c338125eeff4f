"""Step-size schedules of the server update."""

from numbers import Real

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
    r"""The step size of ``step_size="auto"``.

    .. math::

        \gamma = \frac{1}{1 + \omega + (1 - q) / (4 q)},

    where :math:`\omega` is the compressor's variance constant and
    :math:`q` the probability that a client takes part in a round: 1 for
    exact rounds (then FedMM is batch MM), smaller as compression and
    partial participation add variance to the server update (control
    variates make the participation term smaller than the compression
    one). ``benchmarks/bench_step_size.py`` compares it with a grid of
    constants on the dictionary-learning benchmark.

    Parameters
    ----------
    omega : float
    q : float in (0, 1]

    Returns
    -------
    gamma : float in (0, 1]
    """
    return 1.0 / (1.0 + omega + (1.0 - q) / (4.0 * q))


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
        return lambda t: gamma
    if callable(step_size):
        return step_size
    if isinstance(step_size, Real) and not isinstance(step_size, bool):
        if not 0 < step_size <= 1:
            raise ValueError(f"A constant step_size must be in (0, 1], got {step_size!r}.")
        gamma = float(step_size)
        return lambda t: gamma
    raise TypeError(f"step_size must be 'auto', a float or a callable, got {step_size!r}.")
