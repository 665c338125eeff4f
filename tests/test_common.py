"""scikit-learn's estimator checks."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skfedmm import FederatedDictionaryLearning

# Every check passes; none is listed as an expected failure.
EXPECTED_FAILED_CHECKS = {}


@parametrize_with_checks(
    [FederatedDictionaryLearning(max_iter=5, random_state=0)],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS.get(type(est).__name__, {}),
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
