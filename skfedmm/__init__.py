"""skfedmm: scikit-learn estimators trained by federated Majorize-Minimization.

Clients compute surrogate statistics on their own rows; the server aggregates
them exactly and minimizes the surrogate (FedMM), with control variates,
partial participation and unbiased compression.
"""

from .cluster import FederatedKMeans
from .compression import QSGD, Compressor, Identity, RandK, make_compressor
from .dictionary import FederatedDictionaryLearning
from .engine import FedMM, FedMMState, History, PolynomialDecay
from .mixture import FederatedGaussianMixture
from .ot import FederatedOTMap, TargetSample
from .plotting import plot_history
from .problems import (
    DictionaryLearningProblem,
    GaussianMixtureProblem,
    KMeansProblem,
    MMProblem,
)
from .scaling import dask_backend

__version__ = "0.1.0"

__all__ = [
    "FederatedDictionaryLearning",
    "FederatedOTMap",
    "TargetSample",
    "FederatedGaussianMixture",
    "FederatedKMeans",
    "FedMM",
    "FedMMState",
    "History",
    "PolynomialDecay",
    "MMProblem",
    "DictionaryLearningProblem",
    "GaussianMixtureProblem",
    "KMeansProblem",
    "Compressor",
    "Identity",
    "QSGD",
    "RandK",
    "make_compressor",
    "plot_history",
    "dask_backend",
]
