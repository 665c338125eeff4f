"""MM problems the FedMM engine can solve, and the protocol they follow."""

from .base import MMProblem
from .dictionary import DictionaryLearningProblem
from .kmeans import KMeansProblem
from .mixture import GaussianMixtureProblem
from .ot import EntropicOTProblem

__all__ = [
    "MMProblem",
    "DictionaryLearningProblem",
    "EntropicOTProblem",
    "GaussianMixtureProblem",
    "KMeansProblem",
]
