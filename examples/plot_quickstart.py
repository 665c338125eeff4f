"""
=========================================
Quickstart: federated dictionary learning
=========================================

:class:`~skfedmm.FederatedDictionaryLearning` learns a dictionary from rows
that stay on their clients. This example builds heterogeneous clients (each
one's rows are sparse combinations of its own few atoms of a ground-truth
dictionary), fits the dictionary with FedMM (surrogate aggregation) and with
the classical parameter-averaging baseline, and compares them.
"""

# %%
# Federated data
# --------------
# A list with one array per client is all the estimator needs. Here 8
# clients each use 6 of the 24 ground-truth atoms.
import os

import matplotlib.pyplot as plt
import numpy as np

from skfedmm import FederatedDictionaryLearning, plot_history
from skfedmm.datasets import atom_recovery, make_sparse_coded_clients

QUICK = os.environ.get("SKFEDMM_QUICK") == "1"  # shrink sizes when testing
n_rows = 60 if QUICK else 200
n_rounds = 5 if QUICK else 30

clients, true_dictionary = make_sparse_coded_clients(
    n_clients=8, n_samples=n_rows, n_features=20, n_components=24,
    atoms_per_client=6, n_nonzero=2, random_state=0,
)
print(f"{len(clients)} clients, rows per client: {[len(c) for c in clients]}")

# %%
# Fit
# ---
# The parameters shared with :class:`sklearn.decomposition.DictionaryLearning`
# keep their meaning. ``aggregation="surrogate"`` (the default) is FedMM:
# each round the clients send their surrogate statistics
# :math:`\bar A_i = \overline{h^\top h}` and :math:`\bar B_i =
# \overline{x^\top h}`, which the server averages *exactly*.
fits = {}
for aggregation in ("surrogate", "parameter"):
    fits[aggregation] = FederatedDictionaryLearning(
        n_components=24, alpha=0.2, max_iter=n_rounds, tol=0,
        aggregation=aggregation, random_state=0,
    ).fit(clients)

for name, model in fits.items():
    print(
        f"{name:9s}  objective {-model.score(clients):.4f}  "
        f"atoms recovered {atom_recovery(true_dictionary, model.components_, 0.9):.0%}  "
        f"Mbit sent {(model.bits_up_ + model.bits_down_) / 1e6:.1f}"
    )

# %%
# The estimator is a scikit-learn transformer: ``transform`` codes new rows
# on the learned atoms.
codes = fits["surrogate"].transform(clients[0])
print("codes:", codes.shape, "nonzeros per row:", np.mean(np.count_nonzero(codes, axis=1)))

# %%
# Training curves
# ---------------
# Every fitted estimator records its rounds in ``history_``;
# :func:`skfedmm.plot_history` draws the objective, the parameter update
# size and the statistic update size (parameter aggregation has no
# statistic). With heterogeneous clients, averaging the clients' locally
# updated dictionaries does not minimize the pooled objective; aggregating
# the statistics does.
fig, axes = plot_history(fits)
plt.show()

# %%
# The learned atoms
# -----------------
# Averaging unit-norm atoms that different clients pulled different ways
# shortens them: the parameter-averaged dictionary is faded.
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), layout="constrained")
for ax, (name, model) in zip(axes, fits.items()):
    image = ax.imshow(model.components_, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_title(f"{name} aggregation")
    ax.set_xlabel("feature")
    ax.set_ylabel("atom")
fig.colorbar(image, ax=axes, label="atom entry")
plt.show()
