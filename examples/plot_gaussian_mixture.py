"""
==========================================
Federated Gaussian mixture (federated EM)
==========================================

:class:`~skfedmm.FederatedGaussianMixture` fits a Gaussian mixture to rows
that stay on their clients. Each client here holds only two of the
mixture's six components (heterogeneous clients). We compare FedMM's
surrogate aggregation (the clients' EM statistics are averaged: this *is*
EM on the pooled rows), the parameter-averaging baseline (clients run local
EM steps and the server averages the parameters) and scikit-learn's
:class:`~sklearn.mixture.GaussianMixture` on the pooled rows.
"""

# %%
# Heterogeneous clients
# ---------------------
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from skfedmm import FederatedGaussianMixture, plot_history

QUICK = os.environ.get("SKFEDMM_QUICK") == "1"  # shrink sizes when testing
n_rows = 100 if QUICK else 400
n_rounds = 15 if QUICK else 100
warnings.simplefilter("ignore", ConvergenceWarning)

rng = np.random.default_rng(0)
angles = np.linspace(0, 2 * np.pi, 6, endpoint=False)
centres = 6 * np.c_[np.cos(angles), np.sin(angles)]
covariances = [np.diag(rng.uniform(0.3, 1.5, 2)) for _ in range(6)]


def draw(component, n):
    return rng.multivariate_normal(centres[component], covariances[component], n)


# client c holds components c and c + 1 (mod 6)
clients = [np.vstack([draw(c, n_rows // 2), draw((c + 1) % 6, n_rows // 2)]) for c in range(6)]
test = np.vstack([draw(c, 200) for c in range(6)])
print(f"{len(clients)} clients, rows per client: {[len(c) for c in clients]}")

# %%
# Fit
# ---
# The scikit-learn parameters keep their meaning. The default initialization
# (``init_params="kmeans"``) sends each client's local k-means summary, never
# a row; the server clusters the pooled local centres.
fits = {
    aggregation: FederatedGaussianMixture(
        n_components=6, max_iter=n_rounds, aggregation=aggregation, random_state=0,
    ).fit(clients)
    for aggregation in ("surrogate", "parameter")
}
pooled = GaussianMixture(n_components=6, max_iter=n_rounds, random_state=0).fit(np.vstack(clients))

for name, model in [*fits.items(), ("pooled sklearn", pooled)]:
    print(f"{name:15s} held-out log-likelihood per row {model.score(test):.4f}")

# %%
# With exact rounds (every client, no compression), surrogate aggregation
# is EM: its log-likelihood never decreases, and it matches the pooled fit.
# Averaging parameters fitted on different components mixes them up.
fig, axes = plot_history(fits)
plt.show()

# %%
# The fitted components
# ---------------------
fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
t = np.linspace(0, 2 * np.pi, 100)
for ax, (name, model) in zip(axes, [*fits.items(), ("pooled sklearn", pooled)]):
    ax.scatter(*test.T, s=2, c="0.7")
    for mean, cov in zip(model.means_, model.covariances_):
        evals, evecs = np.linalg.eigh(cov)
        ellipse = mean[:, None] + 2 * (evecs * np.sqrt(evals)) @ np.vstack([np.cos(t), np.sin(t)])
        ax.plot(*ellipse, color="C3" if name == "parameter" else "C0")
    ax.set_title(name)
plt.tight_layout()
plt.show()
