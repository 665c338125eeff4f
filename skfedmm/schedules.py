"""Step-size schedules of the server update."""

from numbers import Real

__all__ = ["PolynomialDecay", "auto_step_size"]


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


def _step_schedule(step_size, omega, q):
    if isinstance(step_size, str):
        if step_size != "auto":
            raise ValueError(f"step_size must be 'auto', a float or a callable, got {step_size!r}.")
        gamma = auto_step_size(omega, q)
        return lambda t: gamma
    if callable(step_size):
        return step_size
    if isinstance(step_size, Real) and not isinstance(step_size, bool):
        if not 0 < step_size <= 1:
            raise ValueError(f"A constant step_size must be in (0, 1], got {step_size!r}.")
        gamma = float(step_size)
        return lambda t: gamma
    raise TypeError(f"step_size must be 'auto', a float or a callable, got {step_size!r}.")
