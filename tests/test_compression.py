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


# ---------------------------------------------------------------- buckets
BUCKETED = [QSGD(s=1, bucket_size=5), QSGD(s=2, bucket_size=8), QSGD(s=16, bucket_size=3)]


@pytest.mark.parametrize("compressor", BUCKETED, ids=repr)
def test_bucketed_qsgd_is_unbiased_and_within_omega(compressor):
    test_compressor_is_unbiased_and_within_omega(compressor)
    test_compressor_keeps_dtype_and_zero(compressor)


def test_bucketed_qsgd_bits_levels_and_omega():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(100) * np.repeat([1e-3, 1.0, 10.0, 1e3], 25)
    # ceil(100 / 32) = 4 norms at the dtype's precision + sign and level bits
    out, bits = QSGD(s=4, bucket_size=32).compress(x, rng)
    assert bits == 4 * 64 + 100 * (1 + 3)
    assert QSGD(s=4, bucket_size=32).compress(x.astype(np.float32), rng)[1] == 4 * 32 + 400
    assert QSGD(s=4, bucket_size=None).compress(x, rng)[1] == 64 + 400
    # every bucket on its own grid: |Q(x)_j| = ||x_B|| * level / s
    for start in range(0, 100, 32):
        block = slice(start, start + 32)
        levels = np.abs(out[block]) / np.linalg.norm(x[block]) * 4
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-9)
        assert np.all(np.round(levels) <= 4)
    # small entries in a bucket of their own survive (one norm flushes them)
    y = np.concatenate([1e-4 * rng.standard_normal(32), 1e4 * rng.standard_normal(32)])
    assert np.count_nonzero(QSGD(s=4, bucket_size=32).compress(y, rng)[0][:32]) > 8
    assert np.count_nonzero(QSGD(s=4, bucket_size=None).compress(y, rng)[0][:32]) == 0
    # omega depends on the bucket, not on the message length
    q = QSGD(s=4, bucket_size=16)
    assert q.omega(10**6) == q.omega(16) == min(16 / 16, 4 / 4)
    assert QSGD(s=4, bucket_size=None).omega(10**6) == min(10**6 / 16, 1000 / 4)
    assert q.omega(9) == min(9 / 16, 3 / 4)  # a message shorter than a bucket


def test_single_bucket_is_the_original_qsgd():
    """A message no longer than a bucket is quantized exactly as before."""
    x = np.random.default_rng(2).standard_normal(50)
    a, bits_a = QSGD(s=4, bucket_size=None).compress(x, np.random.default_rng(3))
    b, bits_b = QSGD(s=4, bucket_size=64).compress(x, np.random.default_rng(3))
    assert np.array_equal(a, b) and bits_a == bits_b


@pytest.mark.parametrize("bucket_size", [0, 2.5, True])
def test_invalid_bucket_size(bucket_size):
    with pytest.raises(ValueError, match="bucket_size"):
        QSGD(s=2, bucket_size=bucket_size).omega(10)


# ------------------------------------------------------- variance estimate
@pytest.mark.parametrize("compressor", [RandK(k=3), RandK(ratio=0.5)], ids=repr)
def test_variance_estimate_is_unbiased_when_omega_is_attained(compressor):
    """RandK's error is exactly omega ||x||^2: the receiver's estimate is unbiased."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(12)
    draws = [compressor.compress(x, rng)[0] for _ in range(20000)]
    estimates = np.array([compressor.variance(c) for c in draws])
    errors = np.array([np.sum((c - x) ** 2) for c in draws])
    se = np.std(estimates - errors) / np.sqrt(len(draws))
    assert abs(estimates.mean() - errors.mean()) <= 5 * se
    assert Identity().variance(x) == 0.0


def test_variance_estimate_of_qsgd_is_conservative():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(64)
    for q in (QSGD(s=1, bucket_size=16), QSGD(s=4, bucket_size=16)):
        draws = [q.compress(x, rng)[0] for _ in range(5000)]
        estimate = np.mean([q.variance(c) for c in draws])
        error = np.mean([np.sum((c - x) ** 2) for c in draws])
        assert estimate >= 0.95 * error


def test_user_compressor_without_variance_gets_the_default():
    from tests._helpers import Halve

    c = np.array([2.0, 0.0, -2.0])
    assert Halve().variance(c) == 0.5 * 8.0


# ------------------------------------------------------- measured step rule
def test_measured_step_rule():
    from skfedmm.schedules import _MeasuredStep, _step_schedule

    rule = _step_schedule("auto", QSGD(s=2).omega(4), 1.0)
    assert isinstance(rule, _MeasuredStep) and rule(0) == rule.floor == 1 / (1 + 1.0)
    # exact rounds: a constant step of 1 (batch MM), no measurement
    exact = _step_schedule("auto", 0.0, 1.0)
    assert not isinstance(exact, _MeasuredStep) and exact(5) == 1.0
    assert not isinstance(_step_schedule(0.7, 2.0, 0.5), _MeasuredStep)
    # exact messages with full participation carry no noise: gamma = 1
    c = [np.array([1.0, 2.0]), np.array([3.0, -1.0])]
    assert rule.step(np.array([2.0, 0.5]), c, [0.5, 0.5], [1.0, 1.0], Identity()) == 1.0
    # participation noise only: N = sum a_i^2 (1 - q) ||c_i||^2
    H = np.array([4.0, 3.0])
    N = 0.5**2 * 0.5 * (5.0 + 10.0)
    assert np.isclose(rule.step(H, c, [0.5, 0.5], [0.5, 0.5], Identity()), 1 - N / 25.0)
    # compression noise: v_i = omega / (1 + omega) ||c_i||^2 (RandK k=1 of 2: omega = 1)
    N = 0.5**2 * 0.5 * (5.0 + 10.0)
    assert np.isclose(rule.step(H, c, [0.5, 0.5], [1.0, 1.0], RandK(k=1)), 1 - N / 25.0)
    # noise above the signal: the floor; no message or no direction: the floor
    assert rule.step(np.array([0.1, 0.0]), c, [1.0, 1.0], [1.0, 1.0], RandK(k=1)) == rule.floor
    assert rule.step(H, [], [], [], RandK(k=1)) == rule.floor
    assert rule.step(np.zeros(2), c, [0.5, 0.5], [1.0, 1.0], RandK(k=1)) == rule.floor


# ------------------------------------------------- engine: bits and steps
def _fit(clients, problem=None, **kwargs):
    from skfedmm.engine import FedMM
    from tests._helpers import CauchyLocation

    return FedMM(problem or CauchyLocation(), random_state=0, **kwargs).fit(clients)


def test_uncompressed_messages_are_counted_at_the_statistics_dtype():
    from tests._helpers import CauchyLocation, make_clients

    clients = [c.astype(np.float32) for c in make_clients(n_clients=3)]
    h = _fit(clients, max_iter=3).history
    d = 3 + 1  # wx and w, sent as float32 in every round
    assert h["bits_up"][0] == 3 * (3 * 32) + 3 * (d * 32 + 64)
    assert np.all(h["bits_up"][1:] == 3 * (d * 32 + 64))

    class Float64Statistic(CauchyLocation):
        """Float64 statistics of float32 rows travel (and count) as float64."""

        def init_statistic(self, X):
            return {"mean": X.mean(axis=0, dtype=np.float64)}

        def local_statistic(self, X, theta):
            stat, loss = super().local_statistic(X.astype(np.float64), theta)
            return {k: v.astype(np.float64) for k, v in stat.items()}, loss

    h = _fit(clients, Float64Statistic(), max_iter=2).history
    assert h["bits_up"][0] == 3 * (3 * 64) + 3 * (d * 64 + 64)
    # in the rounds the client's message is its difference in the fit's dtype
    assert np.all(h["bits_up"][1:] == 3 * (d * 32 + 64))


def test_measured_step_keeps_exact_rounds_and_is_reproducible():
    from tests._helpers import make_clients

    clients = make_clients(n_clients=6)
    exact = _fit(clients, max_iter=4).history["step_size"][1:]
    assert np.all(exact == 1.0)  # exact rounds: batch MM
    kwargs = dict(max_iter=8, participation=0.7, compression=QSGD(s=2, bucket_size=2))
    a, b = _fit(clients, **kwargs), _fit(clients, **kwargs)
    steps = a.history["step_size"][1:]
    floor = 1 / (1 + QSGD(s=2, bucket_size=2).omega(4) + 0.3 / (4 * 0.7))
    assert np.all((steps >= floor) & (steps <= 1)) and len(set(steps)) > 1
    assert np.array_equal(steps, b.history["step_size"][1:])
    assert np.array_equal(a.theta, b.theta)
    # a constant step is left alone
    const = _fit(clients, step_size=0.3, **kwargs).history["step_size"][1:]
    assert np.all(const == 0.3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bucketed_qsgd_travels_in_its_encoding_on_flower(dtype):
    """A deployment sends one norm per bucket and the packed levels: the
    compressor's reported bits, rounded up to whole bytes."""
    pytest.importorskip("flwr")
    from skfedmm.flower import records

    rng = np.random.default_rng(0)
    x = rng.standard_normal(300).astype(dtype)
    x[128:256] = 0  # a bucket of zeros (norm 0)
    compressor = QSGD(s=5, bucket_size=128)
    recorder = records.RecordingCompressor(compressor)
    payload, bits = recorder.compress(x, rng)
    cfg, arrays = records.pack_payload(payload, compressor, recorder.norm)
    assert cfg["encoding"] == "qsgd"
    assert sum(a.numpy().nbytes for a in arrays.values()) == -(-bits // 8)
    back = records.unpack_payload(cfg, arrays, compressor, 300, dtype)
    assert back.dtype == payload.dtype and np.array_equal(back, payload)
