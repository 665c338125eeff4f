import math

import numpy as np
import pytest

from skfedmm import QSGD, Identity, RandK, make_compressor
from skfedmm.compression import Compressor

COMPRESSORS = [Identity(), QSGD(s=1), QSGD(s=4), QSGD(s=16), RandK(k=3), RandK(ratio=0.25)]


@pytest.mark.parametrize("compressor", COMPRESSORS, ids=repr)
def test_compressor_is_unbiased_and_within_omega(compressor):
    rng = np.random.default_rng(0)
    d = 20
    x = rng.standard_normal(d) * np.linspace(0.1, 3, d)
    draws = np.array([compressor.compress(x, rng)[0] for _ in range(20000)])
    mean = draws.mean(axis=0)
    stderr = draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - x) <= 5 * stderr + 1e-12)
    variance = np.mean(np.sum((draws - x) ** 2, axis=1))
    assert variance <= compressor.omega(d) * np.sum(x**2) * 1.05 + 1e-12


@pytest.mark.parametrize("compressor", COMPRESSORS, ids=repr)
def test_compressor_keeps_dtype_and_zero(compressor):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10).astype(np.float32)
    out, _ = compressor.compress(x, rng)
    assert out.dtype == np.float32
    zero, _ = compressor.compress(np.zeros(10), rng)
    assert np.all(zero == 0)


def test_bits_are_exact():
    rng = np.random.default_rng(0)
    x64 = rng.standard_normal(100)
    assert Identity().compress(x64, rng)[1] == 100 * 64
    assert Identity().compress(x64.astype(np.float32), rng)[1] == 100 * 32
    # norm + per entry: sign bit and ceil(log2(s + 1)) level bits
    assert QSGD(s=4).compress(x64, rng)[1] == 64 + 100 * (1 + 3)
    assert QSGD(s=1).compress(x64, rng)[1] == 64 + 100 * (1 + 1)
    assert QSGD(s=16).compress(x64.astype(np.float32), rng)[1] == 32 + 100 * (1 + 5)
    # k values and k indices of ceil(log2(100)) = 7 bits
    assert RandK(k=10).compress(x64, rng)[1] == 10 * (64 + 7)
    assert RandK(ratio=0.05).compress(x64, rng)[1] == 5 * (64 + 7)


def test_omega_values():
    assert Identity().omega(50) == 0
    assert QSGD(s=2).omega(100) == min(100 / 4, 10 / 2)
    assert QSGD(s=20).omega(100) == min(100 / 400, 10 / 20)
    assert RandK(k=10).omega(100) == 9
    assert RandK(ratio=0.5).omega(10) == 1


def test_qsgd_levels_are_on_the_grid():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(50)
    out, _ = QSGD(s=4).compress(x, rng)
    levels = np.abs(out) / np.linalg.norm(x) * 4
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-12)


def test_randk_keeps_k_entries():
    rng = np.random.default_rng(1)
    out, _ = RandK(k=7).compress(rng.standard_normal(40) + 10, rng)
    assert np.count_nonzero(out) == 7


def test_make_compressor():
    assert make_compressor(None) == Identity()
    assert make_compressor("qsgd") == QSGD(s=16)
    assert make_compressor(("qsgd", {"s": 4})) == QSGD(s=4)
    assert make_compressor("randk") == RandK(ratio=0.1)
    assert make_compressor(("randk", {"k": 3})) == RandK(k=3)
    inst = QSGD(s=2)
    assert make_compressor(inst) is inst
    with pytest.raises(ValueError, match="Unknown compressor"):
        make_compressor("gzip")
    with pytest.raises(TypeError, match="compression"):
        make_compressor(3.5)


@pytest.mark.parametrize(
    "compressor, match",
    [(QSGD(s=0), "levels"), (RandK(), "exactly one"), (RandK(k=2, ratio=0.5), "exactly one"),
     (RandK(ratio=1.5), "ratio"), (RandK(k=0), "k >= 1")],
)
def test_invalid_compressor_parameters(compressor, match):
    with pytest.raises(ValueError, match=match):
        compressor.omega(10)


def test_compressor_is_abstract():
    with pytest.raises(TypeError):
        Compressor()
    assert math.isclose(QSGD(s=3).omega(9), 1.0)
