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
    # fixed code: norm + per entry a sign bit and ceil(log2(s + 1)) level bits
    assert QSGD(s=4, coding="fixed").compress(x64, rng)[1] == 64 + 100 * (1 + 3)
    assert QSGD(s=1, coding="fixed").compress(x64, rng)[1] == 64 + 100 * (1 + 1)
    assert QSGD(s=16, coding="fixed").compress(x64.astype(np.float32), rng)[1] == 32 + 100 * 6
    # Rice code: the norm and the length of the levels' code
    for q in (QSGD(s=1), QSGD(s=4), QSGD(s=16)):
        out, bits = q.compress(x64, rng)
        levels = np.rint(out / (np.linalg.norm(x64) / q.s)).astype(int)
        assert bits == 64 + q.encode(levels).size
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
    out, bits = QSGD(s=4, bucket_size=32, coding="fixed").compress(x, rng)
    assert bits == 4 * 64 + 100 * (1 + 3)
    fixed32 = QSGD(s=4, bucket_size=32, coding="fixed")
    assert fixed32.compress(x.astype(np.float32), rng)[1] == 4 * 32 + 400
    assert QSGD(s=4, bucket_size=None, coding="fixed").compress(x, rng)[1] == 64 + 400
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
    with pytest.raises(ValueError, match="coding"):
        QSGD(coding="huffman").omega(10)


# ------------------------------------------------------------ QSGD codes
CODES = [QSGD(), QSGD(s=1), QSGD(s=3, bucket_size=7), QSGD(s=100, bucket_size=None),
         QSGD(s=16, coding="fixed"), QSGD(s=5, bucket_size=4, coding="fixed")]


def _levels(q, x, out):
    """The signed levels of a decoded QSGD message."""
    norms = q.bucket_norms(x)
    unit = np.repeat(np.where(norms > 0, norms, 1) / q.s, q._bucket(x.size))[: x.size]
    levels = np.rint(out / unit)
    np.testing.assert_array_equal(levels.astype(x.dtype) * unit.astype(x.dtype), out)
    return levels.astype(np.int64), norms


@pytest.mark.parametrize("q", CODES, ids=repr)
@pytest.mark.parametrize("d", [1, 6, 128, 301])
def test_qsgd_bits_are_the_length_of_its_code(q, d):
    """The reported bits are the norms plus an encoding that decodes back."""
    rng = np.random.default_rng(d)
    for dtype in (np.float64, np.float32):
        x = (rng.standard_normal(d) * rng.choice([1e-4, 1.0, 30.0], d)).astype(dtype)
        x[: d // 3] = 0  # zeros, and a bucket of zeros when the buckets are small
        out, bits = q.compress(x, rng)
        levels, norms = _levels(q, x, out)
        code = q.encode(levels)
        assert code.dtype == np.uint8 and set(np.unique(code)) <= {0, 1}
        assert bits == norms.size * 8 * np.dtype(dtype).itemsize + code.size
        np.testing.assert_array_equal(q.decode(code, d), levels)
    with pytest.raises(ValueError):
        q.decode(np.concatenate([code, [1]]), d)  # one bit too many


def test_rice_code_spends_little_on_small_levels():
    """A message of small levels costs about one bit per zero level."""
    rng = np.random.default_rng(0)
    x = np.zeros(1024)
    x[rng.choice(1024, 20, replace=False)] = rng.standard_normal(20)
    rice, fixed = QSGD().compress(x, rng)[1], QSGD(coding="fixed").compress(x, rng)[1]
    assert fixed == 8 * 64 + 1024 * 6
    assert rice < 8 * 64 + 1024 * 1.2 < fixed
    # a dense Gaussian message: well under the fixed code's 6 bits per entry
    x = rng.standard_normal(4096)
    assert QSGD().compress(x, rng)[1] < 0.6 * QSGD(coding="fixed").compress(x, rng)[1]


def test_qsgd_decode_refuses_a_level_above_s():
    q = QSGD(s=2, bucket_size=4)
    code = QSGD(s=8, bucket_size=4).encode(np.array([0, 7, -1, 2]))
    with pytest.raises(ValueError):
        q.decode(code, 4)


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
    # equal entries put every rounding near probability 1/2: the worst case
    # of the per-entry bound (||x_B|| / s)^2 / 4 behind the estimate
    flat = np.full(128, 0.3)
    for q, x in [(QSGD(s=1, bucket_size=16), x), (QSGD(s=4, bucket_size=16), x),
                 (QSGD(), flat), (QSGD(s=4), x)]:
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


# ------------------------------------------------ compressed initialization
class _Tally(Compressor):
    """Sends a message as it is, counted 7 bits per entry (exact accounting)."""

    def omega(self, d):
        return 0.5

    def compress(self, x, rng):
        return x.copy(), 7 * x.size


def test_compressed_fit_compresses_its_initialization():
    """The initial full round always, the init statistic when the problem allows."""
    from tests._helpers import CauchyLocation, make_clients

    class Compressible(CauchyLocation):
        compress_init_statistic = True

    clients = make_clients(n_clients=3)
    d = 3 + 1  # the statistic; the init statistic has 3 entries
    exact = _fit(clients, max_iter=2).history["bits_up"][0]
    assert exact == 3 * (3 * 64) + 3 * (d * 64 + 64)
    h = _fit(clients, max_iter=2, compression=_Tally()).history
    assert h["bits_up"][0] == 3 * (3 * 64) + 3 * (7 * d + 64)  # init statistic exact
    h = _fit(clients, Compressible(), max_iter=2, compression=_Tally()).history
    assert h["bits_up"][0] == 3 * (7 * 3) + 3 * (7 * d + 64)
    # a compressed fit is reproducible and does not depend on n_jobs
    kwargs = dict(max_iter=3, compression=QSGD(s=2, bucket_size=2))
    a = _fit(clients, Compressible(), **kwargs)
    b = _fit(clients, Compressible(), n_jobs=2, **kwargs)
    assert np.array_equal(a.theta, b.theta) and np.array_equal(a.s_hat, b.s_hat)
    assert np.array_equal(a.history["bits_up"], b.history["bits_up"])
    assert a.history["bits_up"][0] < exact
    # control variates against the compressed aggregate: V = sum_i w_i V_i = 0
    total = sum(w * c.cv for w, c in zip(a.weights, _fit(clients, Compressible(), max_iter=0,
                                                         compression=QSGD(s=2)).clients))
    np.testing.assert_allclose(total, 0, atol=1e-12)


def test_compressed_initial_statistics_are_unbiased():
    """Averaged over the clients' seeds, the compressed init and full-round
    statistics are the exact ones (the aggregate stays unbiased)."""
    from skfedmm.federation.client import _client_full, _client_full_compressed, _client_init
    from skfedmm.federation.client import _client_init_compressed
    from tests._helpers import CauchyLocation, make_clients

    X = make_clients(n_clients=1)[0]
    problem, theta = CauchyLocation(), np.zeros(3)
    q = QSGD(s=1, bucket_size=2)
    exact, loss = _client_full(problem, X, theta, False)
    draws = [_client_full_compressed(problem, X, theta, False, q, seed) for seed in range(4000)]
    assert all(dr[1] == loss for dr in draws)
    for name, value in exact.items():
        sample = np.array([dr[0][name] for dr in draws])
        stderr = sample.std(axis=0) / np.sqrt(len(sample)) + 1e-12 * np.abs(value)
        assert np.all(np.abs(sample.mean(axis=0) - value) <= 5 * stderr)
        assert sample.std(axis=0).max() > 0  # (really compressed)
    init = _client_init(problem, X, False)
    draws = [_client_init_compressed(problem, X, False, q, (seed, None)) for seed in range(4000)]
    for name, value in init.items():
        sample = np.array([dr[0][name] for dr in draws])
        stderr = sample.std(axis=0) / np.sqrt(len(sample)) + 1e-12 * np.abs(value)
        assert np.all(np.abs(sample.mean(axis=0) - value) <= 5 * stderr)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_problem_constants_from_the_init_statistic_stay_exact():
    """The OT map's cost scale comes from its init statistic: not compressed."""
    from skfedmm import FederatedDictionaryLearning, FederatedOTMap

    rng = np.random.default_rng(0)
    clients = [rng.standard_normal((30, 2)) + i for i in range(3)]
    target = rng.standard_normal((20, 2))
    fits = [FederatedOTMap(epsilon=0.5, max_iter=2, compression=c, random_state=0).fit(
        clients, target=target) for c in (None, "qsgd")]
    assert fits[0].fedmm_state_.problem.cost_scale_ == fits[1].fedmm_state_.problem.cost_scale_
    assert fits[1].history_["bits_up"][0] < 0.3 * fits[0].history_["bits_up"][0]
    # the dictionary's second moment only seeds the dictionary: compressed
    X = [rng.standard_normal((40, 16)) for _ in range(3)]
    a, b = (FederatedDictionaryLearning(n_components=4, max_iter=1, compression=c,
                                        random_state=0).fit(X) for c in (None, "qsgd"))
    assert b.history_["bits_up"][0] < 0.3 * a.history_["bits_up"][0]


def test_compressed_statistic_travels_in_its_encoding_on_flower():
    pytest.importorskip("flwr")
    from skfedmm.federation.client import _client_full_compressed
    from skfedmm.flower import records
    from tests._helpers import CauchyLocation, make_clients

    X = make_clients(n_clients=1)[0]
    for compressor in (QSGD(s=3, bucket_size=2), RandK(k=1), Identity()):
        recorder = records.RecordingCompressor(compressor)
        answer = _client_full_compressed(CauchyLocation(), X, np.zeros(3), False, recorder, 7)
        content = records.encode_reply("full_compressed", answer, compressor=recorder)
        if not isinstance(compressor, Identity):
            nbytes = sum(a.numpy().nbytes for a in content["arrays"].values())
            per_array = [compressor.compress(np.asarray(v).ravel(), np.random.default_rng(0))[1]
                         for v in answer[0].values()]
            assert nbytes == sum(-(-b // 8) for b in per_array)
        stat, loss, bits = records.decode_reply(content, "full_compressed", dtype=np.float64,
                                                compressor=compressor)
        assert loss == answer[1] and bits == answer[2]
        for name, value in answer[0].items():
            assert stat[name].dtype == value.dtype
            np.testing.assert_array_equal(stat[name], value)
