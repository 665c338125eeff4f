"""MM problems the FedMM engine can solve, and the protocol they follow."""

from .base import MMProblem
from .dictionary import DictionaryLearningProblem
from .ot import EntropicOTProblem

__all__ = ["MMProblem", "DictionaryLearningProblem", "EntropicOTProblem"]
