"""What a fit records round by round, and the progress display."""

from dataclasses import dataclass, field

import numpy as np

__all__ = ["History"]


_HISTORY_FIELDS = (
    "objective",
    "full_objective",
    "mean_field",
    "param_change",
    "stat_change",
    "step_size",
    "bits_up",
    "bits_down",
    "n_active",
    "time",
    "restarted",
)


@dataclass
class History:
    """Per-round record of a FedMM fit.

    Row 0 is the initialization (the init statistic and, for surrogate
    aggregation, the initial full round); row ``t`` is round ``t``.

    Attributes
    ----------
    objective : ndarray
        Weighted mean of the losses the active clients report at
        :math:`\\theta_t` (NaN when no client reported).
    full_objective : ndarray
        Exact :math:`W(\\theta_t)` on all rows of all clients, when evaluated
        (batch rounds, or every ``eval_every`` rounds); NaN otherwise.
    mean_field : ndarray
        :math:`\\|H_t\\|_1`, the estimate of :math:`\\bar S(\\theta_t) - \\hat
        S_t` (zero at a fixed point); NaN for parameter aggregation.
    param_change : ndarray
        :math:`\\|\\theta_{t+1} - \\theta_t\\|_2`.
    stat_change : ndarray
        :math:`\\|\\hat S_{t+1} - \\hat S_t\\|_2` (NaN for parameter
        aggregation).
    step_size : ndarray
        :math:`\\gamma_t`.
    bits_up, bits_down : ndarray
        Bits sent by the clients to the server and by the server to the
        clients during the round.
    n_active : ndarray
        Number of clients that took part.
    time : ndarray
        Wall-clock seconds since the start of the fit, at the end of the round.
    restarted : ndarray
        1 when the round's M-step restarted part of the parameter
        (:meth:`MMProblem.restarted`, e.g. a re-placed dictionary atom), so
        that the round cannot count as converged; 0 otherwise (NaN for the
        initialization and for parameter aggregation).
    failed : list of list of (int, str)
        Per round, the clients that failed and the exception type.
    """

    objective: list = field(default_factory=list)
    full_objective: list = field(default_factory=list)
    mean_field: list = field(default_factory=list)
    param_change: list = field(default_factory=list)
    stat_change: list = field(default_factory=list)
    step_size: list = field(default_factory=list)
    bits_up: list = field(default_factory=list)
    bits_down: list = field(default_factory=list)
    n_active: list = field(default_factory=list)
    time: list = field(default_factory=list)
    restarted: list = field(default_factory=list)
    failed: list = field(default_factory=list)

    def _append(self, **row):
        for name in _HISTORY_FIELDS:
            getattr(self, name).append(row.get(name, np.nan))
        self.failed.append(row.get("failed", []))

    def as_dict(self):
        """The history as a dict of NumPy arrays (``failed`` as a list)."""
        out = {name: np.asarray(getattr(self, name), dtype=float) for name in _HISTORY_FIELDS}
        out["failed"] = list(self.failed)
        return out

    def __getitem__(self, name):
        if name == "failed":
            return list(self.failed)
        return np.asarray(getattr(self, name), dtype=float)

    def __len__(self):
        return len(self.objective)

    def keys(self):
        return list(_HISTORY_FIELDS) + ["failed"]


class _Progress:
    """Progress report: a tqdm bar when available, else lines.

    The bar advances every round; its figures, or a line, are renewed every
    ``interval`` rounds.
    """

    def __init__(self, verbose, total, interval=1):
        self.verbose = verbose
        self.interval = interval
        self.bar = None
        if verbose:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="FedMM", leave=False)
            except ImportError:
                self.bar = None

    def update(self, state):
        if not self.verbose:
            return
        if state.round % self.interval:
            if self.bar is not None:
                self.bar.update(1)
            return
        h = state.history
        bits = sum(h.bits_up) + sum(h.bits_down)
        info = dict(
            objective=f"{h.objective[-1]:.5g}",
            active=h.n_active[-1],
            Mbits=f"{bits / 1e6:.3g}",
        )
        if self.bar is not None:
            self.bar.set_postfix(info)
            self.bar.update(1)
        else:
            print(
                f"[FedMM] round {state.round:4d}  objective {info['objective']}  "
                f"active {info['active']}  bits {bits:.3e}  elapsed {h.time[-1]:.2f}s"
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()
