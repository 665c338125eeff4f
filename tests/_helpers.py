"""Helpers shared by the tests: a toy MM problem defined outside the package.

The toy proves the plug-in contract: a user-written problem, here a robust
location estimator, runs on the engine like the built-in ones.
"""

import numpy as np

from skfedmm import Compressor, MMProblem


class CauchyLocation(MMProblem):
    """Robust location: minimize mean log(1 + ||x - theta||^2 / c).

    The log is concave, so at tau it is majorized by its tangent: the
    surrogate is a weighted least-squares with weights
    w(x) = 1 / (c + ||x - tau||^2), linear in the statistic
    S = (mean w x, mean w), and T(S) = S_wx / S_w (an IRLS step).
    """

    def __init__(self, c=1.0, dim=3):
        self.c = c
        self.dim = dim

    def init_statistic(self, X):
        return {"mean": X.mean(axis=0)}

    def init_parameter(self, init_stat, rng):
        return init_stat["mean"] + rng.standard_normal(self.dim)

    def local_statistic(self, X, theta):
        sq = np.sum((X - theta) ** 2, axis=1)
        w = 1.0 / (self.c + sq)
        stat = {"wx": (w[:, None] * X).mean(axis=0), "w": np.array([w.mean()])}
        return stat, float(np.mean(np.log1p(sq / self.c)))

    def minimize(self, stat, theta_prev, rng=None):
        return stat["wx"] / stat["w"][0]

    def check_statistic(self, stat, theta, atol=0.0):
        # 0 < w <= 1/c, and ||wx - w theta|| <= 1 / (2 sqrt(c)) since
        # ||x - theta|| / (c + ||x - theta||^2) <= 1 / (2 sqrt(c))
        w = float(stat["w"][0])
        if not 0 < w <= 1 / self.c + atol:
            return f"w = {w:.3g} outside (0, 1/c]"
        if np.linalg.norm(stat["wx"] - w * theta) > 0.5 / np.sqrt(self.c) + atol:
            return "wx too far from w * theta"
        return None

    def project(self, stat):
        return {"wx": stat["wx"], "w": np.maximum(stat["w"], 1e-12)}


def make_clients(n_clients=5, n=40, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    # heterogeneous: each client's rows around its own center, some outliers
    return [
        rng.standard_normal((n + 7 * i, dim)) + 3 * rng.standard_normal(dim)
        for i in range(n_clients)
    ]


class Halve(Compressor):
    """A user's compressor: every entry kept with probability 1/2, doubled
    (unbiased, omega = 1); it defines only the two abstract methods."""

    def omega(self, d):
        return 1.0

    def compress(self, x, rng):
        keep = rng.random(x.shape) < 0.5
        return np.where(keep, 2 * x, 0), int(keep.sum()) * 96 + 64
