"""Parameters: declared once, validated the scikit-learn way, and honoured by
continued fits (``warm_start``, ``partial_fit``)."""

import inspect
import math

import numpy as np
import pytest
from sklearn.utils.estimator_checks import check_param_validation

import skfedmm
from skfedmm import FedMM, FederatedDictionaryLearning, FederatedOTMap
from skfedmm._base import FederatedMixin
from skfedmm._params import (
    ENGINE_PARAMS,
    FEDERATED_PARAMETERS,
    FEDERATED_PARAMS,
    InvalidParameterError,
)
from skfedmm.problems import DictionaryLearningProblem

from ._helpers import CauchyLocation, make_clients


def federated_estimators():
    """Every public estimator built on the federated mixin."""
    return [
        obj for name in skfedmm.__all__
        if isinstance(obj := getattr(skfedmm, name), type) and issubclass(obj, FederatedMixin)
    ]


def test_private_sklearn_validation_is_available():
    """skfedmm relies on scikit-learn's private constraint language; fail loudly if it moves."""
    from sklearn.utils._param_validation import (  # noqa: F401
        HasMethods,
        Interval,
        InvalidParameterError,
        StrOptions,
        validate_parameter_constraints,
    )

    assert issubclass(InvalidParameterError, ValueError)
    assert issubclass(InvalidParameterError, TypeError)


@pytest.mark.parametrize("cls", federated_estimators() + [FedMM], ids=lambda c: c.__name__)
def test_signatures_follow_the_table(cls):
    """Each signature takes every (engine) federated parameter with the table's default,
    each is constrained by the table's constraint and documented by its text."""
    signature = inspect.signature(cls.__init__).parameters
    names = ENGINE_PARAMS if cls is FedMM else tuple(FEDERATED_PARAMS)
    for param in FEDERATED_PARAMETERS:
        if param.name not in names:
            assert param.name not in signature
            continue
        assert param.name in signature, param.name
        assert signature[param.name].default == param.default, param.name
        assert cls._parameter_constraints[param.name] == param.constraints, param.name
        assert param.doc.splitlines()[0] in cls.__doc__, param.name
    # every parameter of the signature is constrained
    assert set(signature) - {"self"} == set(cls._parameter_constraints)


@pytest.mark.parametrize("cls", federated_estimators(), ids=lambda c: c.__name__)
def test_engine_defaults_equal_the_estimators(cls):
    engine = inspect.signature(FedMM.__init__).parameters
    est = inspect.signature(cls.__init__).parameters
    for name in ENGINE_PARAMS:
        assert engine[name].default == est[name].default, name


@pytest.mark.parametrize("cls", federated_estimators(), ids=lambda c: c.__name__)
def test_sklearn_param_validation(cls):
    """scikit-learn's own check: every invalid value raises InvalidParameterError."""
    check_param_validation(cls.__name__, cls())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_iter=True), "max_iter"),
        (dict(tol=float("nan")), "tol"),
        (dict(participation=1.5), "participation"),
        (dict(compression="zip"), "compression"),
        (dict(step_size="fast"), "step_size"),
        (dict(convergence="never"), "convergence"),
        (dict(min_clients=True), "min_clients"),
        (dict(client_timeout=0), "client_timeout"),
        (dict(n_jobs=1.5), "n_jobs"),
    ],
)
def test_engine_raises_invalid_parameter_error(kwargs, name):
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of FedMM"):
        FedMM(CauchyLocation(), **kwargs).fit(make_clients())


def test_engine_rejects_a_problem_without_the_protocol():
    with pytest.raises(InvalidParameterError, match="'problem' parameter of FedMM"):
        FedMM(object()).fit(make_clients())


@pytest.mark.parametrize(
    "est, name",
    [
        (FederatedDictionaryLearning(n_components=6.0), "n_components"),
        (FederatedDictionaryLearning(max_iter=True), "max_iter"),
        (FederatedDictionaryLearning(alpha=float("nan")), "alpha"),
        (FederatedDictionaryLearning(warm_start="yes"), "warm_start"),
        (FederatedOTMap(epsilon=0), "epsilon"),
        (FederatedOTMap(n_reference=True), "n_reference"),
    ],
)
def test_estimators_raise_invalid_parameter_error(est, name):
    X = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of {type(est).__name__}"):
        est.fit(X)


# ----------------------------------------------------------- continued fits
def _clients(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((30, 6)) + i for i in range(4)]


def _dl(**kwargs):
    params = dict(n_components=4, alpha=0.1, max_iter=3, tol=0.0, random_state=0, warm_start=True)
    return FederatedDictionaryLearning(**{**params, **kwargs})


def test_changed_alpha_takes_effect_from_the_next_round():
    clients = _clients()
    est = _dl().fit(clients)
    D_before = est.components_.copy()
    est.set_params(alpha=0.5, max_iter=1).fit(clients)
    assert est.problem_.alpha == 0.5
    assert est.n_iter_ == 4
    # the clients' losses of round 4 are the lasso objective at alpha=0.5 and
    # the dictionary of round 3
    problem = DictionaryLearningProblem(4, 0.5, 6)
    expected = np.average([problem.loss(X, D_before) for X in clients],
                          weights=[len(X) for X in clients])
    assert math.isclose(est.error_[-1], expected, rel_tol=1e-10)


def test_continued_fit_validates_again():
    clients = _clients()
    est = _dl().fit(clients)
    with pytest.raises(InvalidParameterError, match="'alpha' parameter"):
        est.set_params(alpha=-1).fit(clients)
    with pytest.raises(InvalidParameterError, match="'alpha' parameter"):
        est.partial_fit(clients)
    # nothing was changed by the refused fits
    assert est.n_iter_ == 3


def test_changed_n_components_raises_naming_it():
    clients = _clients()
    est = _dl().fit(clients)
    with pytest.raises(ValueError, match="n_components changed from 4 to 5"):
        est.set_params(n_components=5).fit(clients)
    with pytest.raises(ValueError, match="aggregation changed"):
        est.set_params(n_components=4, aggregation="parameter").fit(clients)
    assert est.n_iter_ == 3


def test_changed_federated_parameters_take_effect():
    rng = np.random.default_rng(1)
    clients = [rng.standard_normal((20, 5)) for _ in range(12)]
    est = _dl(max_iter=2).fit(clients)
    assert np.all(est.history_["n_active"][1:] == 12)
    est.set_params(participation=0.25, participation_scheme="fixed", compression="qsgd",
                   step_size=0.5).fit(clients)
    assert np.all(est.history_["n_active"][3:] == 3)
    assert np.all(est.history_["step_size"][3:] == 0.5)
    # QSGD messages are much smaller than 64-bit floats
    bits = np.asarray(est.history_.bits_up)
    assert bits[3] / 3 < 0.5 * bits[2] / 12
    # new client weights: V is re-derived, sum_i w_i V_i == V
    est.set_params(client_weights="uniform", max_iter=1).fit(clients)
    state = est.fedmm_state_
    np.testing.assert_allclose(state.weights, np.full(12, 1 / 12))
    V = sum(w * c.cv for w, c in zip(state.weights, state.clients))
    np.testing.assert_allclose(state.cv, V, atol=1e-12)


def test_fit_does_not_mutate_the_problem():
    problem = CauchyLocation()
    before = dict(vars(problem))
    state = FedMM(problem, max_iter=3, random_state=0).fit(make_clients())
    assert vars(problem) == before
    assert state.problem is problem  # no fit-time constants: prepare returns it


# ------------------------------------------------------------- code_init
def test_code_init_defines_the_initial_dictionary_by_one_m_step():
    """Initial codes give A0 = mean h h^T, B0 = mean x^T h, and the initial
    dictionary is the M-step of their aggregate, whatever the client split."""
    from skfedmm.problems.dictionary import update_dict

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6))
    codes = rng.standard_normal((40, 3)) * (rng.random((40, 3)) < 0.5)
    D0 = rng.standard_normal((3, 6))
    D0 /= np.linalg.norm(D0, axis=1, keepdims=True)
    ids = np.repeat([0, 1, 2, 3], 10)
    params = dict(n_components=3, alpha=0.1, max_iter=0, dict_init=D0, random_state=0)
    one = FederatedDictionaryLearning(code_init=codes, **params).fit(X)
    split = FederatedDictionaryLearning(code_init=codes, **params).fit(X, client_ids=ids)
    as_list = FederatedDictionaryLearning(
        code_init=[codes[ids == i] for i in range(4)], **params
    ).fit([X[ids == i] for i in range(4)])
    problem = one.problem_
    expected = update_dict(D0, codes.T @ codes / 40, X.T @ codes / 40,
                           max_sweeps=problem.dict_max_sweeps, tol=problem.dict_tol)
    np.testing.assert_allclose(one.components_, split.components_, atol=1e-12)
    np.testing.assert_allclose(one.components_, as_list.components_, atol=1e-12)
    # the initial dictionary (before the initial round's M-step) is the M-step of (A0, B0)
    init = problem.prepare(problem.init_statistic(X, codes))
    theta0 = init.init_parameter(problem.init_statistic(X, codes), np.random.default_rng(0))
    np.testing.assert_allclose(theta0, expected, atol=1e-12)
    # and the codes change the fit
    plain = FederatedDictionaryLearning(**params).fit(X)
    assert not np.allclose(plain.components_, one.components_)


def test_code_init_errors_name_the_client():
    X = [np.ones((5, 3)), np.ones((4, 3))]
    est = FederatedDictionaryLearning(n_components=2, code_init=[np.ones((5, 2)), np.ones((3, 2))])
    with pytest.raises(ValueError, match="client 1: code_init has shape"):
        est.fit(X)
    with pytest.raises(ValueError, match="code_init has 1 arrays for 2 clients"):
        est.set_params(code_init=[np.ones((5, 2))]).fit(X)


def test_split_sign_feature_names_match_transform():
    import pandas as pd

    X = np.random.default_rng(0).standard_normal((30, 5))
    est = FederatedDictionaryLearning(n_components=3, split_sign=True, max_iter=2, random_state=0)
    est.set_output(transform="pandas").fit(X)
    out = est.transform(X)
    assert isinstance(out, pd.DataFrame)
    assert out.shape == (30, 6)
    assert list(out.columns) == list(est.get_feature_names_out())


def test_changed_initialization_raises_instead_of_being_ignored():
    clients = _clients()
    est = _dl(code_init=[np.ones((30, 4))] * 4).fit(clients)
    for name, value in [("init", "random"), ("dict_init", np.eye(4, 6)),
                        ("code_init", [np.zeros((30, 4))] * 4)]:
        before = est.get_params()[name]
        with pytest.raises(ValueError, match=f"{name} changed"):
            est.set_params(**{name: value}).fit(clients)
        est.set_params(**{name: before})
    # unchanged (equal, not identical) values continue
    est.set_params(code_init=[np.ones((30, 4))] * 4, max_iter=1).fit(clients)
    assert est.n_iter_ == 4
