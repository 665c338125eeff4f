"""
==============================
Federated k-means (Lloyd)
==============================

:class:`~skfedmm.FederatedKMeans` clusters rows that stay on their clients.
Lloyd's algorithm is an MM algorithm whose statistic is each cluster's mass
and sum of rows: FedMM averages those exactly, so with every client active
it runs scikit-learn's Lloyd iterations on the pooled rows. Each client
here holds a few of the eight clusters. We compare surrogate aggregation,
parameter averaging (clients run local Lloyd steps, the server averages the
centres, matched component by component) and
:class:`sklearn.cluster.KMeans` on the pooled rows, then add compression and
partial participation.
"""

# %%
# Heterogeneous clients
# ---------------------
import os

import matplotlib.pyplot as plt
import numpy as np
from sklearn.cluster import KMeans

from skfedmm import FederatedKMeans, plot_history

QUICK = os.environ.get("SKFEDMM_QUICK") == "1"  # shrink sizes when testing
n_rows = 100 if QUICK else 500
n_rounds = 10 if QUICK else 50

rng = np.random.default_rng(0)
centres = rng.uniform(-10, 10, size=(8, 2))
# client c holds clusters c, c + 1 and c + 2 (mod 8)
clients = [
    np.vstack([centres[(c + j) % 8] + rng.normal(size=(n_rows // 3, 2)) for j in range(3)])
    for c in range(8)
]
print(f"{len(clients)} clients, rows per client: {[len(c) for c in clients]}")

# %%
# Fit
# ---
# The default ``init="k-means++"`` is one-shot federated clustering: each
# client sends its local k-means centres and their masses, and the server
# runs weighted k-means on them. No row leaves a client.
fits = {
    aggregation: FederatedKMeans(
        n_clusters=8, max_iter=n_rounds, tol=0, aggregation=aggregation, random_state=0,
    ).fit(clients)
    for aggregation in ("surrogate", "parameter")
}
fits["surrogate, qsgd + 50% participation"] = FederatedKMeans(
    n_clusters=8, max_iter=n_rounds, tol=0, compression="qsgd", participation=0.5,
    random_state=0,
).fit(clients)
pooled = KMeans(n_clusters=8, random_state=0).fit(np.vstack(clients))

for name, model in [*fits.items(), ("pooled sklearn", pooled)]:
    print(f"{name:38s} inertia {model.inertia_:10.1f}")

# %%
# Training curves: the objective is the inertia per row at the centres each
# round starts from; bits are what the clients sent.
fig, axes = plot_history(fits)
plt.show()

# %%
# The centres
# -----------
fig, ax = plt.subplots(figsize=(5, 5))
ax.scatter(*np.vstack(clients).T, s=2, c="0.7")
for (name, model), marker in zip([*fits.items(), ("pooled sklearn", pooled)], "ox+s"):
    ax.scatter(*model.cluster_centers_.T, marker=marker, label=name, facecolors="none"
               if marker in "os" else None, edgecolors=None)
ax.legend(fontsize=7)
plt.show()
