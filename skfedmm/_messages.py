"""What travels between clients and the server, and how it is checked.

Statistics and parameters are small sets of named arrays; they travel as one
flat vector. :class:`StatLayout` maps one to the other and is the *expected*
layout of every message: it comes from the problem (or, for a problem that
does not declare it, from what most clients sent), never from one client's
answer. Every message is checked on arrival (:func:`check_statistic_message`,
:func:`check_vector_message`): a malformed one is an
:class:`InvalidMessageError`, which the engine treats as a failure of that
client in that round. The same checks serve every transport.
"""

from collections import Counter

import numpy as np

__all__ = [
    "InvalidMessageError",
    "ParamLayout",
    "StatLayout",
    "check_statistic_message",
    "check_vector_message",
    "majority_layout",
]


class InvalidMessageError(ValueError):
    """A client's message does not have the expected form or valid values."""


class StatLayout:
    """Flattens a dict of named arrays into one vector and back.

    Parameters
    ----------
    shapes : dict of str to tuple
        The names and shapes of the arrays, in order.
    """

    def __init__(self, shapes):
        if not isinstance(shapes, dict) or not shapes:
            raise TypeError(
                "A statistic must be a non-empty dict of arrays, got "
                f"{type(shapes).__name__}."
            )
        self.names = list(shapes)
        self.shapes = [tuple(int(n) for n in shapes[k]) for k in self.names]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.size = sum(self.sizes)

    @classmethod
    def of(cls, stat):
        """The layout of a statistic (a dict of arrays)."""
        if not isinstance(stat, dict) or not stat:
            raise TypeError(
                "A statistic must be a non-empty dict of arrays, got "
                f"{type(stat).__name__}."
            )
        return cls({k: np.shape(v) for k, v in stat.items()})

    def __eq__(self, other):
        return (
            isinstance(other, StatLayout)
            and self.names == other.names
            and self.shapes == other.shapes
        )

    def __hash__(self):
        return hash((tuple(self.names), tuple(self.shapes)))

    def describe(self):
        return "{" + ", ".join(f"{k!r}: {s}" for k, s in zip(self.names, self.shapes)) + "}"

    def flatten(self, stat, dtype=np.float64):
        """The flat vector of a statistic, checked against the layout.

        Raises
        ------
        InvalidMessageError
            Not a dict, missing or extra names, wrong shapes, or values that
            are not real numbers (complex, object, strings).
        """
        if not isinstance(stat, dict):
            raise InvalidMessageError(
                f"expected a dict of arrays {self.describe()}, got {type(stat).__name__}"
            )
        missing = [k for k in self.names if k not in stat]
        extra = [k for k in stat if k not in self.names]
        if missing or extra:
            raise InvalidMessageError(
                f"expected the arrays {self.describe()}; missing {missing}, unexpected {extra}"
            )
        out = np.empty(self.size, dtype=dtype)
        start = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            value = np.asarray(stat[name])
            if value.dtype.kind not in "fiub":
                raise InvalidMessageError(
                    f"{name!r} has dtype {value.dtype}; expected real numbers"
                )
            if value.shape != shape:
                raise InvalidMessageError(
                    f"{name!r} has shape {value.shape}, expected {shape}"
                )
            out[start : start + size] = value.ravel()
            start += size
        return out

    def unflatten(self, flat):
        out, start = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = flat[start : start + size].reshape(shape)
            start += size
        return out


class ParamLayout(StatLayout):
    """The layout of a parameter: one array, or a dict of named arrays.

    Parameters travel through the same flat-vector view as statistics (the
    parameter-averaging baseline compresses and averages it, the history
    records norms of its changes); :meth:`unflatten` gives back the
    structure the problem uses.
    """

    def __init__(self, theta):
        self.is_dict = isinstance(theta, dict)
        super().__init__({k: np.shape(v) for k, v in self.as_dict(theta).items()})

    def as_dict(self, theta):
        return theta if self.is_dict else {"theta": theta}

    def flatten(self, theta, dtype=np.float64):
        return super().flatten(self.as_dict(theta), dtype)

    def unflatten(self, flat):
        out = super().unflatten(flat)
        return out if self.is_dict else out["theta"]

    def cast(self, theta, dtype):
        """The parameter with every array converted to ``dtype``."""
        return self.unflatten(self.flatten(theta, dtype))


def majority_layout(stats):
    """The layout most answers share (ties: the first client's among them).

    For problems that do not declare their statistic's shapes: one faulty
    client cannot impose its layout on the honest ones.
    """
    layouts = []
    for stat in stats:
        try:
            layouts.append(StatLayout.of(stat))
        except TypeError:
            layouts.append(None)
    counts = Counter(lay for lay in layouts if lay is not None)
    if not counts:
        raise InvalidMessageError("no client sent a statistic (a dict of arrays)")
    best = max(counts.values())
    return next(lay for lay in layouts if lay is not None and counts[lay] == best)


def check_vector_message(value, size, what):
    """A flat message: a finite real vector of the expected size."""
    value = np.asarray(value)
    if value.dtype.kind not in "fiub":
        raise InvalidMessageError(f"the {what} has dtype {value.dtype}; expected real numbers")
    if value.shape != (size,):
        raise InvalidMessageError(f"the {what} has shape {value.shape}, expected ({size},)")
    if not np.all(np.isfinite(value)):
        raise InvalidMessageError(
            f"the {what} is not finite (overflow or NaN in the client's computation: check "
            "the scale of its data)"
        )
    return value


def check_statistic_message(problem, layout, stat, theta, atol=0.0):
    """A statistic, as a client sent it or as the server reconstructs it.

    Checks the form (:meth:`StatLayout.flatten`), finiteness, and the
    problem's declared valid set (:meth:`MMProblem.check_statistic`).

    Parameters
    ----------
    problem : MMProblem
    layout : StatLayout
    stat : dict of ndarray or ndarray
        A statistic, or its flat vector.
    theta : ndarray or dict of ndarray
        The parameter the statistic was computed at.
    atol : float, default=0.0
        Rounding slack of a reconstructed statistic.

    Returns
    -------
    flat : ndarray of shape (layout.size,)

    Raises
    ------
    InvalidMessageError
    """
    flat = stat if isinstance(stat, np.ndarray) else layout.flatten(stat)
    check_vector_message(flat, layout.size, "statistic")
    reason = problem.check_statistic(layout.unflatten(flat), theta, atol)
    if reason:
        raise InvalidMessageError(f"the statistic is outside its valid set: {reason}")
    return flat
