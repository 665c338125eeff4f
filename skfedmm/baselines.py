r"""The gradient baselines of the FedMM engine: FedAvg, FedProx, SCAFFOLD.

Pure update rules on flat parameter vectors; the client task that runs them
is :func:`skfedmm.federation.client._client_gradient`, the server's part is
in :meth:`skfedmm.FedMM._round`. Notation: :math:`x_t` the broadcast
parameter, :math:`K` the number of local steps (``local_steps``),
:math:`\eta` the learning rate, :math:`P` the problem's
``project_parameter``, :math:`g_i(y)` client :math:`i`'s minibatch gradient
(:meth:`MMProblem.gradient`), :math:`w_i` the client weights, :math:`q_i`
the participation probabilities, :math:`Q` the compressor.

Local steps, from :math:`y^0 = x_t`:

.. math::

    y^{k+1} = \tilde P_k\big(y^k - \eta\,(g_i(y^k) + \mu (y^k - x_t)
    + c - c_i)\big), \qquad k = 0, \dots, K - 1,

with :math:`\tilde P_k = P` for :math:`k < K - 1` and the identity for the
last step (the server projects the average instead), :math:`\mu = 0`
except for FedProx and :math:`c = c_i = 0` except for SCAFFOLD. The client
sends :math:`Q(y^K - x_t)` and the server sets

.. math::

    x_{t+1} = P\Big(x_t + \sum_{i \in A_t} \frac{w_i}{q_i}\,
    Q(y_i^K - x_t)\Big),

the update of parameter averaging. With one local step, full participation
and exact messages, this is projected gradient descent on the pooled
objective, :math:`x_{t+1} = P(x_t - \eta \sum_i w_i \nabla f_i(x_t))`, for
all three methods.

SCAFFOLD (option II of Karimireddy et al.) also updates the client control
variate :math:`c_i^+ = c_i - c + (x_t - y^K) / (K \eta)`; the client sends
:math:`Q(c_i^+ - c_i)` (after its parameter message), keeps
:math:`c_i \leftarrow c_i + Q(c_i^+ - c_i)` (what the server knows of it),
and the server sets :math:`c \leftarrow c + \sum_{i \in A_t} w_i\,
Q(c_i^+ - c_i)`, so that :math:`c = \sum_i w_i c_i` at all times. Its
messages are twice the size of FedAvg's and the server broadcasts
:math:`c` with :math:`x_t`.

References
----------
.. [1] B. McMahan, E. Moore, D. Ramage, S. Hampson, B. Agüera y Arcas.
   Communication-efficient learning of deep networks from decentralized
   data. AISTATS 2017.
.. [2] T. Li, A. K. Sahu, M. Zaheer, M. Sanjabi, A. Talwalkar, V. Smith.
   Federated optimization in heterogeneous networks. MLSys 2020.
.. [3] S. P. Karimireddy, S. Kale, M. Mohri, S. Reddi, S. Stich,
   A. T. Suresh. SCAFFOLD: stochastic controlled averaging for federated
   learning. ICML 2020.
"""

import numpy as np

__all__ = ["GRADIENT_AGGREGATIONS", "local_gradient_steps", "scaffold_control_change"]

#: The aggregations that train by local gradient steps.
GRADIENT_AGGREGATIONS = ("fedavg", "fedprox", "scaffold")


def local_gradient_steps(gradient, project, x0, *, steps, learning_rate, mu=0.0, correction=None):
    """A client's local path :math:`y^0 = x_0, \\dots, y^K` (see the module docstring).

    Parameters
    ----------
    gradient : callable
        ``gradient(y) -> (grad, loss)`` on a fresh batch, flat vectors.
    project : callable
        The parameter projection :math:`P` on flat vectors.
    x0 : ndarray of shape (p,)
        The broadcast parameter (not modified).
    steps : int
        :math:`K \\ge 1`.
    learning_rate : float
    mu : float, default=0.0
        FedProx's proximal weight (0: FedAvg).
    correction : ndarray of shape (p,) or None
        SCAFFOLD's :math:`c - c_i`.

    Returns
    -------
    y : ndarray of shape (p,)
        The last iterate :math:`y^K` (unprojected last step).
    loss : float
        The loss at :math:`x_0` on the first batch.
    """
    y = x0
    loss = np.nan
    for k in range(steps):
        if k:
            y = project(y)
        grad, batch_loss = gradient(y)
        if k == 0:
            loss = batch_loss
        if mu != 0:
            grad = grad + mu * (y - x0)
        if correction is not None:
            grad = grad + correction
        y = y - learning_rate * grad
    return y, float(loss)


def scaffold_control_change(x0, y, c, *, steps, learning_rate):
    """SCAFFOLD's :math:`c_i^+ - c_i = -c + (x_0 - y^K) / (K \\eta)` (option II)."""
    return (x0 - y) / (steps * learning_rate) - c
