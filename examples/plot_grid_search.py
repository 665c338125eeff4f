"""
=====================================================================
Choosing ``alpha`` and ``n_components`` with GridSearchCV and clients
=====================================================================

A federated estimator is an ordinary scikit-learn estimator: it fits in a
:class:`~sklearn.pipeline.Pipeline` and is tuned by
:class:`~sklearn.model_selection.GridSearchCV`. The rows of all clients
come as one array with a ``client_ids`` vector, which scikit-learn's
`metadata routing
<https://scikit-learn.org/stable/metadata_routing.html>`_ delivers to
:meth:`~skfedmm.FederatedDictionaryLearning.fit` (``set_fit_request``), and
:class:`~sklearn.model_selection.GroupKFold` with ``groups=client_ids``
holds out *whole clients*: the score measures how well a dictionary
learned on some clients codes the rows of clients it has never seen.
"""

# %%
# Data: rows of several clients, and their client ids
# ---------------------------------------------------
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import sklearn
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer

from skfedmm import FederatedDictionaryLearning
from skfedmm.datasets import make_sparse_coded_clients

QUICK = os.environ.get("SKFEDMM_QUICK") == "1"  # shrink sizes when testing
n_rows = 40 if QUICK else 150
n_rounds = 3 if QUICK else 10

# 8 clients; each one's rows combine 3 of its own 6 atoms among 12.
clients, _ = make_sparse_coded_clients(
    n_clients=8, n_samples=n_rows, n_features=20, n_components=12, atoms_per_client=6,
    n_nonzero=3, random_state=0,
)
X = np.vstack(clients)
client_ids = np.repeat(np.arange(len(clients)), [len(c) for c in clients])

# %%
# A score that compares dictionaries fairly
# -----------------------------------------
# The estimator's own :meth:`~skfedmm.FederatedDictionaryLearning.score` is
# minus the lasso objective, which includes ``alpha * ||h||_1``: it always
# prefers the smallest ``alpha``. To *choose* ``alpha`` we score every
# candidate the same way: the reconstruction error of the held-out rows,
# each coded with the same budget of 3 atoms (``transform`` with orthogonal
# matching pursuit).


def reconstruction_score(pipeline, X, y=None):
    """Minus the mean squared error of the 3-atom reconstructions."""
    Xt = pipeline[:-1].transform(X)  # the row-wise preprocessing
    dico = pipeline[-1]
    return -float(np.mean((Xt - dico.inverse_transform(dico.transform(Xt))) ** 2))


# %%
# The pipeline and the search, with client ids routed as metadata
# ---------------------------------------------------------------
# :class:`~sklearn.preprocessing.Normalizer` works row by row, so it is
# safe in a federated pipeline (it learns nothing across clients).
with sklearn.config_context(enable_metadata_routing=True):
    pipeline = Pipeline([
        ("normalize", Normalizer()),
        ("dico", FederatedDictionaryLearning(
            max_iter=n_rounds, tol=0, transform_algorithm="omp", transform_n_nonzero_coefs=3,
            random_state=0,
        ).set_fit_request(client_ids=True)),
    ])
    search = GridSearchCV(
        pipeline,
        {"dico__alpha": [0.05, 0.2, 0.8], "dico__n_components": [4, 8, 12]},
        scoring=reconstruction_score,
        cv=GroupKFold(n_splits=4),
    )
    # ``groups`` goes to GroupKFold, ``client_ids`` to the estimator's fit
    search.fit(X, groups=client_ids, client_ids=client_ids)

print("best parameters:", search.best_params_)
print(f"best held-out score: {search.best_score_:.5f}")
print("clients seen by the refitted dictionary:", search.best_estimator_[-1].n_clients_)

# %%
# The scores of the grid
# ----------------------
results = pd.DataFrame(search.cv_results_)
table = results.pivot(
    index="param_dico__alpha", columns="param_dico__n_components", values="mean_test_score"
)
print(table)

fig, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
for n_components, scores in table.items():
    ax.plot(table.index, -scores, marker="o", label=f"n_components={n_components}")
ax.set_xscale("log")
ax.set_xticks(table.index, labels=[f"{a:g}" for a in table.index])
ax.minorticks_off()
ax.set_yscale("log")
ax.set_xlabel("alpha")
ax.set_ylabel("held-out reconstruction MSE (3 atoms)")
ax.legend()
plt.show()
