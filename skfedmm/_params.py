"""The federated parameters, declared once, and parameter validation.

Every federated estimator and the :class:`~skfedmm.FedMM` engine take the
parameters of :data:`FEDERATED_PARAMETERS`. Each entry holds the name, the
default, the constraint and the docstring text; the engine's keywords, the
``_parameter_constraints`` tables and the shared "Parameters" docstring
section are all derived from it. The explicit ``__init__`` signatures stay
(scikit-learn reads parameters from them); ``tests/test_params.py`` checks
them against this table. Adding a federated parameter touches this table and
the signatures, nothing else.

Validation uses scikit-learn's constraint language and raises its
``InvalidParameterError`` (a ``ValueError`` and a ``TypeError`` at once)
naming the parameter. That module, ``sklearn.utils._param_validation``, is
private: skfedmm pins the scikit-learn versions it is tested with
(``pyproject.toml``), and ``tests/test_params.py`` fails loudly if the names
it uses move. On top of it, :func:`validate_params` rejects booleans where a
number is expected (``max_iter=True``), which scikit-learn accepts.
"""

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
from sklearn.utils._param_validation import (
    HasMethods,
    Interval,
    InvalidParameterError,
    StrOptions,
    validate_parameter_constraints,
)

from .compression import _COMPRESSORS

__all__ = [
    "FEDERATED_PARAMETERS",
    "FEDERATED_PARAMS",
    "FEDERATED_PARAMS_DOC",
    "FEDERATED_CONSTRAINTS",
    "ENGINE_PARAMS",
    "ENGINE_PARAMS_DOC",
    "InvalidParameterError",
    "validate_params",
]


@dataclass(frozen=True)
class FederatedParam:
    """One federated parameter: name, default, constraint and documentation.

    Attributes
    ----------
    name : str
    default : object
    constraints : list
        scikit-learn constraints (see ``sklearn.utils._param_validation``).
    doc : str
        The numpydoc entry: type line, then the indented description.
    engine : bool
        Whether the :class:`~skfedmm.FedMM` engine takes it (``warm_start``
        is the estimators' own).
    """

    name: str
    default: object
    constraints: list
    doc: str
    engine: bool = True


FEDERATED_PARAMETERS = (
    FederatedParam(
        "aggregation", "surrogate",
        [StrOptions({"surrogate", "parameter", "fedavg", "fedprox", "scaffold"})],
        """aggregation : {"surrogate", "parameter", "fedavg", "fedprox", "scaffold"}, default="surrogate"
    ``"surrogate"``: FedMM, the server aggregates the clients' surrogate
    statistics exactly. ``"parameter"``: the baseline, clients run
    ``local_steps`` MM steps on their own rows and the server averages
    the parameters. ``"fedavg"``, ``"fedprox"``, ``"scaffold"``: the
    gradient baselines FedAvg, FedProx (proximal weight ``mu``) and
    SCAFFOLD, ``local_steps`` gradient steps of size ``learning_rate``
    per round (problems with a gradient only; see
    :mod:`skfedmm.baselines`).""",
    ),
    FederatedParam(
        "participation", 1.0, [Interval(Real, 0, 1, closed="right")],
        """participation : float in (0, 1], default=1.0
    Probability that a client takes part in a round (or fraction of
    clients per round with ``participation_scheme="fixed"``).""",
    ),
    FederatedParam(
        "participation_scheme", "bernoulli", [StrOptions({"bernoulli", "fixed"})],
        """participation_scheme : {"bernoulli", "fixed"}, default="bernoulli"
    Each client independently, or exactly ``ceil(participation *
    n_clients)`` clients drawn without replacement.""",
    ),
    FederatedParam(
        "compression", None,
        [None, StrOptions(set(_COMPRESSORS)), tuple, HasMethods(["compress", "omega"])],
        """compression : None, {"qsgd", "randk", "identity"}, (str, dict) or Compressor, default=None
    Unbiased compression of the clients' messages, e.g. ``"qsgd"``,
    ``("qsgd", {"s": 4})``, ``RandK(ratio=0.1)``.""",
    ),
    FederatedParam(
        "step_size", "auto",
        [StrOptions({"auto"}), Interval(Real, 0, 1, closed="right"), callable],
        """step_size : "auto", float in (0, 1] or callable, default="auto"
    Server step size :math:`\\gamma_t`: a constant, or a callable of the
    round index such as :class:`~skfedmm.PolynomialDecay`. ``"auto"``: 1
    without compression and with full participation (batch MM);
    otherwise measured on each round's messages, the share of the
    server's update direction above its estimated compression and
    participation noise, never below
    :math:`1 / (1 + \\omega + (1 - q) / (4 q))` for the compressor's
    :math:`\\omega` and participation :math:`q` (see
    :func:`skfedmm.schedules.auto_step_size`); with minibatches, that
    worst-case step for the first pass over the data, then decreasing (see
    :func:`skfedmm.schedules.minibatch_step_size`).""",
    ),
    FederatedParam(
        "cv_rate", "auto", [StrOptions({"auto"}), Interval(Real, 0, 1, closed="both")],
        """cv_rate : "auto" or float in [0, 1], default="auto"
    Control-variate rate :math:`\\alpha`; 0 disables control variates.
    ``"auto"``: :math:`1 / (1 + \\omega)` for the compressor's
    :math:`\\omega`.""",
    ),
    FederatedParam(
        "batch_size", None, [None, Interval(Integral, 1, None, closed="left")],
        """batch_size : int or None, default=None
    Rows each active client uses per round; None: all of them.""",
    ),
    FederatedParam(
        "local_steps", 1, [Interval(Integral, 1, None, closed="left")],
        """local_steps : int, default=1
    Local steps per round for ``aggregation="parameter"`` (MM steps)
    and the gradient baselines (gradient steps).""",
    ),
    FederatedParam(
        "learning_rate", "auto", [StrOptions({"auto"}), Interval(Real, 0, None, closed="neither")],
        """learning_rate : "auto" or float > 0, default="auto"
    Local learning rate :math:`\\eta` of the gradient baselines
    (``"fedavg"``, ``"fedprox"``, ``"scaffold"``); ignored otherwise.
    ``"auto"``: the problem's ``default_learning_rate``, of the order of
    the inverse curvature of the loss.""",
    ),
    FederatedParam(
        "mu", 0.01, [Interval(Real, 0, None, closed="left")],
        """mu : float >= 0, default=0.01
    Proximal weight of FedProx (``aggregation="fedprox"``): each client
    minimizes its loss plus :math:`\\frac{\\mu}{2}\\|\\theta -
    \\theta_t\\|^2`; ignored otherwise (0 gives FedAvg).""",
    ),
    FederatedParam(
        "client_weights", "proportional",
        [StrOptions({"proportional", "uniform"}), "array-like"],
        """client_weights : {"proportional", "uniform"} or array-like, default="proportional"
    Client weights :math:`w_i`: proportional to the number of rows,
    uniform, or given (nonnegative, normalized to sum to 1).""",
    ),
    FederatedParam(
        "eval_every", None, [None, Interval(Integral, 1, None, closed="left")],
        """eval_every : int or None, default=None
    Also evaluate the exact objective on all clients every
    ``eval_every`` rounds (exact rounds are always evaluated).""",
    ),
    FederatedParam(
        "min_clients", 1, [Interval(Integral, 1, None, closed="left")],
        """min_clients : int, default=1
    A client whose computation raises is treated as not participating
    in that round (recorded in ``history_.failed``, warned about once
    per fit). A round where fewer than ``min(min_clients, n_sampled)``
    clients answer raises an error instead of updating.""",
    ),
    FederatedParam(
        "client_timeout", None, [None, Interval(Real, 0, None, closed="neither")],
        """client_timeout : float or None, default=None
    Seconds a client may take in a round before it counts as failed
    (``TimeoutError``, recorded like any failure); None waits forever.
    The late computation finishes in the background (a daemon thread that
    never delays the process's exit) and is discarded; until it ends, the
    client is not asked again (at most one abandoned computation per
    client). With a timeout, results depend on timing.""",
    ),
    FederatedParam(
        "warm_start", False, ["boolean"],
        """warm_start : bool, default=False
    Continue from the full training state of the previous fit (server
    statistic, every client's control variate and random stream, round
    counter, history): fitting 10 rounds, then 10 more, gives bitwise
    the model of fitting 20. Needs the same clients. Parameters are
    validated again; a changed federated parameter or problem
    hyper-parameter takes effect from the next round, and one that
    cannot change mid-training raises an error naming it.""",
        engine=False,
    ),
)

#: name -> default, for every federated parameter.
FEDERATED_PARAMS = {p.name: p.default for p in FEDERATED_PARAMETERS}

#: name -> scikit-learn constraints, for every federated parameter.
FEDERATED_CONSTRAINTS = {p.name: list(p.constraints) for p in FEDERATED_PARAMETERS}

#: The federated parameters the engine takes.
ENGINE_PARAMS = tuple(p.name for p in FEDERATED_PARAMETERS if p.engine)


def _indent(text, spaces=4):
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.splitlines())


#: The numpydoc entries of the federated parameters, indented for a class
#: docstring's "Parameters" section.
FEDERATED_PARAMS_DOC = "\n" + "\n".join(_indent(p.doc) for p in FEDERATED_PARAMETERS) + "\n"

#: The same entries for the engine's parameters only.
ENGINE_PARAMS_DOC = (
    "\n" + "\n".join(_indent(p.doc) for p in FEDERATED_PARAMETERS if p.engine) + "\n"
)


def _accepts_bool(constraints):
    # scikit-learn's "verbose" constraint is an int or a bool
    return any(
        c in ("boolean", "verbose") or c is bool
        for c in constraints if isinstance(c, (str, type))
    )


def validate_params(constraints, params, caller_name):
    """Validate parameters against constraints, the scikit-learn way.

    Parameters
    ----------
    constraints : dict
        ``name -> list of constraints`` (scikit-learn's constraint language).
    params : dict
        ``name -> value``; names without constraints are not checked.
    caller_name : str
        The class or function named in the error.

    Raises
    ------
    sklearn.utils._param_validation.InvalidParameterError
        A ``ValueError`` and ``TypeError`` naming the parameter. Unlike
        scikit-learn, a boolean is refused where no constraint is boolean
        (``max_iter=True`` is an error, not one iteration).
    """
    for name, value in params.items():
        if (
            isinstance(value, (bool, np.bool_))
            and name in constraints
            and constraints[name] != "no_validation"
            and not _accepts_bool(constraints[name])
        ):
            raise InvalidParameterError(
                f"The {name!r} parameter of {caller_name} must not be a bool. Got "
                f"{value!r} instead."
            )
    validate_parameter_constraints(constraints, params, caller_name=caller_name)
