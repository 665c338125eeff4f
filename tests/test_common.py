"""scikit-learn's estimator checks."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skfedmm import FederatedDictionaryLearning, FederatedGaussianMixture, FederatedKMeans

# Every check passes; none is listed as an expected failure.
EXPECTED_FAILED_CHECKS = {}


@parametrize_with_checks(
    [
        FederatedDictionaryLearning(max_iter=5, random_state=0),
        FederatedGaussianMixture(max_iter=20, random_state=0),
        FederatedKMeans(max_iter=20, random_state=0),
    ],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS.get(type(est).__name__, {}),
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


def test_estimators_share_the_federated_parameters():
    """Both estimators take every federated parameter, with the same default."""
    from skfedmm import FederatedOTMap
    from skfedmm._base import FEDERATED_PARAMS

    for est in (FederatedDictionaryLearning(), FederatedOTMap()):
        params = est.get_params()
        for name, default in FEDERATED_PARAMS.items():
            assert name in params, (type(est).__name__, name)
            assert params[name] == default, (type(est).__name__, name)
