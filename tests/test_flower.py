"""skfedmm on Flower: the wire format, the node's state, and a real deployment.

- Unit tests (no processes): every payload and answer through Flower
  records; malformed messages both ways are refused with an error naming
  the node, and nothing of them is applied; the node's atomicity protocol.
- An in-memory grid (requests and replies through the real records and the
  node's handler) gives bitwise the in-process model.
- A deployment: a SuperLink and three SuperNodes as separate processes on
  free loopback ports, two ``flwr run`` of the example app
  (``examples/flower_app``): a dictionary fit and an OT fit (partial
  participation, QSGD), each bitwise equal to the in-process fit with the
  same ``random_state``; one SuperNode is killed during the OT fit, the
  failure is recorded (node id and reason) and the fit completes. The
  in-process fit replays the failures the deployment recorded, so the
  comparison stays bitwise even when a slow node misses a deadline.
"""

import json
import os
import re
import shutil
import signal
import sys
import time
import warnings

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from skfedmm import FedMM, FederatedDictionaryLearning, FederatedOTMap  # noqa: E402
from skfedmm.compression import QSGD, Identity, RandK  # noqa: E402
from skfedmm.federation import LocalTransport, Transport  # noqa: E402
from skfedmm.federation.client import ClientConfig, ClientMessage, ClientState  # noqa: E402
from skfedmm.federation.local import ClientFailure  # noqa: E402
from skfedmm._messages import ParamLayout, StatLayout  # noqa: E402
from skfedmm.flower import FlowerTransport, NodeStream, handle  # noqa: E402
from skfedmm.flower import records  # noqa: E402
from skfedmm.flower.records import WireError  # noqa: E402
from skfedmm.problems import DictionaryLearningProblem, EntropicOTProblem  # noqa: E402

from ._helpers import CauchyLocation  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "examples", "flower_app")
BIN = os.path.dirname(sys.executable)


# --------------------------------------------------------------------------
# An in-memory grid: the transport's requests go through the node's handler
# --------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _task_identity():
    """Flower's Message needs a run and task identity (set by a ServerApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: getattr(TaskIdentity, f"_{k}", None) for k in ("run_id", "node_id", "task_id")}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    for k, v in saved.items():
        setattr(TaskIdentity, f"_{k}", v)


class _Reply:
    def __init__(self, content, reply_to, error=None):
        self.content = content
        self.error = error
        self.metadata = type("Metadata", (), {"reply_to_message_id": reply_to})()

    def has_error(self):
        return self.error is not None


class MemoryGrid:
    """A grid whose nodes run :func:`skfedmm.flower.handle` in this process.

    ``tamper(node, task, reply) -> reply`` may alter replies; a node in
    ``dead`` answers with Flower's NODE_UNAVAILABLE error.
    """

    def __init__(self, rows, tamper=None, init=None):
        self.rows = rows
        self.init = init or {}
        self.stores = {n: RecordDict() for n in rows}
        self.tamper = tamper
        self.dead = set()
        self._replies = {}
        self._n = 0

    def get_node_ids(self):
        return list(self.rows)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self._n += 1
            mid = f"m{self._n}"
            node = msg.metadata.dst_node_id
            if node in self.dead:
                err = type("Error", (), {"code": 5, "reason": "NODE_UNAVAILABLE"})()
                self._replies[mid] = _Reply(None, mid, err)
            else:
                reply = handle(msg.content, self.stores[node], self.rows[node],
                               self.init.get(node))
                if self.tamper is not None:
                    reply = self.tamper(node, msg.content["meta"]["task"], reply)
                self._replies[mid] = _Reply(reply, mid)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self._replies.pop(mid) for mid in ids if mid in self._replies]


def _nodes(seed=0, sizes=(30, 40, 50), d=6):
    rng = np.random.default_rng(seed)
    ids = [101, 7, 55][: len(sizes)]
    return {n: rng.standard_normal((k, d)) for n, k in zip(ids, sizes)}


def _in_order(nodes):
    return [nodes[n] for n in sorted(nodes)]


FIT = dict(max_iter=4, participation=0.67, compression=("qsgd", {"s": 16}), random_state=0)


@pytest.mark.parametrize("kind", ["dictionary", "ot"])
def test_memory_grid_gives_the_local_model_bitwise(kind):
    nodes = _nodes()
    if kind == "dictionary":
        make, fit_params = (lambda: FederatedDictionaryLearning(n_components=4, alpha=0.1, **FIT)), {}
        attr = "components_"
    else:
        target = np.random.default_rng(1).standard_normal((20, 6))
        make, fit_params = (lambda: FederatedOTMap(epsilon=0.5, tol=0, **FIT)), {"target": target}
        attr = "potential_"
    local = make().fit(_in_order(nodes), **fit_params)
    grid = MemoryGrid(nodes)
    transport = FlowerTransport(grid)
    remote = make().fit_transport(transport, **fit_params)
    np.testing.assert_array_equal(getattr(remote, attr), getattr(local, attr))
    np.testing.assert_array_equal(remote.history_["objective"], local.history_["objective"])
    assert remote.n_features_in_ == 6 and remote.n_clients_ == 3
    assert transport.node_ids == [7, 55, 101]
    np.testing.assert_array_equal(remote.fedmm_state_.weights, local.fedmm_state_.weights)
    # the clients' states stay on the nodes: the server holds tags and mirrors
    for i, c in enumerate(remote.fedmm_state_.clients):
        if isinstance(c.rng, NodeStream):
            assert c.rng.node_id == transport.node_ids[i]
            np.testing.assert_array_equal(c.cv, local.fedmm_state_.clients[i].cv)
    # the problem travels once per node and per prepared problem
    sent = transport.bytes_sent
    assert sent["surrogate"] < 4 * 3 * 10_000


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_any_estimator_fits_on_the_transport_without_its_own_code():
    """An estimator the Flower code knows nothing of (the mixture) fits bitwise too."""
    from skfedmm import FederatedGaussianMixture

    nodes = _nodes()

    def make():
        return FederatedGaussianMixture(n_components=2, **FIT)

    local = make().fit(_in_order(nodes))
    remote = make().fit_transport(FlowerTransport(MemoryGrid(nodes)))
    np.testing.assert_array_equal(remote.means_, local.means_)
    np.testing.assert_array_equal(remote.covariances_, local.covariances_)


def test_initial_codes_stay_on_the_nodes():
    """code_init in-process = each node's own initial codes (make_client_app(load_init=...))."""
    nodes = _nodes()
    rng = np.random.default_rng(3)
    codes = {n: rng.standard_normal((len(X), 3)) for n, X in nodes.items()}
    params = dict(n_components=3, max_iter=3, random_state=0)
    local = FederatedDictionaryLearning(code_init=[codes[n] for n in sorted(nodes)],
                                        **params).fit(_in_order(nodes))
    remote = FederatedDictionaryLearning(**params).fit_transport(
        FlowerTransport(MemoryGrid(nodes, init=codes)))
    np.testing.assert_array_equal(remote.components_, local.components_)
    with pytest.raises(ValueError, match="code_init"):
        FederatedDictionaryLearning(code_init=codes[7], **params).fit_transport(
            FlowerTransport(MemoryGrid(nodes)))


def test_a_node_that_does_not_answer_in_time_fails_its_round():
    class Silent(MemoryGrid):
        def push_messages(self, messages):
            ids = super().push_messages(messages)
            for mid, msg in zip(ids, messages):
                if msg.metadata.dst_node_id == 7 and msg.content["meta"]["task"] == "surrogate":
                    del self._replies[mid]  # never answers
            return ids

    nodes = _nodes()
    transport = FlowerTransport(Silent(nodes), client_timeout=0.3, poll_interval=0.01)
    est = FederatedDictionaryLearning(n_components=3, max_iter=2, random_state=0)
    with pytest.warns(UserWarning, match="node 7: no reply within client_timeout=0.3 s"):
        est.fit_transport(transport)
    assert all((0, "node 7: TimeoutError") in row for row in est.history_.failed[1:])


def test_the_server_app_fits_only_allowed_estimators(tmp_path):
    from skfedmm.flower import server

    with pytest.raises(ValueError, match="'os.system' is not one of skfedmm's"):
        server.run_server(MemoryGrid(_nodes()), {"estimator": "os.system"})
    with pytest.raises(ValueError, match="'params' must be a JSON object"):
        server.run_server(MemoryGrid(_nodes()), {"estimator": "skfedmm.FederatedOTMap",
                                                 "params": "[1]"})
    out = tmp_path / "model.joblib"
    est = server.run_server(MemoryGrid(_nodes()), {
        "estimator": "skfedmm.FederatedDictionaryLearning", "output": str(out),
        "params": json.dumps({"n_components": 3, "max_iter": 2, "compression": ["qsgd", {"s": 4}],
                              "random_state": 0}),
    })
    import joblib

    saved = joblib.load(out)
    assert saved.compression == ("qsgd", {"s": 4}) and saved.flower_node_ids_ == [7, 55, 101]
    np.testing.assert_array_equal(saved.components_, est.components_)


def test_memory_grid_parameter_aggregation_and_engine():
    nodes = _nodes(sizes=(20, 25), d=3)
    params = dict(max_iter=3, participation=0.6, compression="qsgd", aggregation="parameter",
                  random_state=0)
    local = FedMM(CauchyLocation(), **params).fit(_in_order(nodes))
    records.register_problem(CauchyLocation)
    with pytest.raises(TypeError, match="n_features"):
        from skfedmm.federation.transport import RemoteClients

        RemoteClients(LocalTransport(_in_order(nodes)))
    remote = FedMM(CauchyLocation(), **params).fit(FlowerTransport(MemoryGrid(nodes)))
    np.testing.assert_array_equal(remote.theta, local.theta)


def test_a_dead_node_is_a_failed_client_named_in_the_history():
    nodes = _nodes()
    grid = MemoryGrid(nodes)
    transport = FlowerTransport(grid)
    calls = []

    def stop(info):
        calls.append(info["round"])
        if info["round"] == 1:
            grid.dead.add(55)

    est = FederatedDictionaryLearning(n_components=3, max_iter=3, random_state=0, callback=stop)
    with pytest.warns(UserWarning, match="node 55"):
        est.fit_transport(transport)
    failed = est.history_.failed
    assert failed[1] == [] and all((1, "node 55: FlowerError5") in row for row in failed[2:])
    assert est.n_iter_ == 3


def test_a_malformed_reply_fails_its_client_naming_the_node():
    nodes = _nodes()

    def tamper(node, task, reply):
        if node == 101 and task == "surrogate":
            reply["arrays"]["payload"] = Array(np.full(3, np.nan))
        return reply

    transport = FlowerTransport(MemoryGrid(nodes, tamper))
    est = FederatedDictionaryLearning(n_components=3, max_iter=2, random_state=0)
    with pytest.warns(UserWarning, match="node 101"):
        est.fit_transport(transport)
    assert all((2, "node 101: InvalidMessageError") in row for row in est.history_.failed[1:])
    assert [c["failed"] for c in transport.calls if c["task"] == "surrogate"] == [[2], [2]]


# --------------------------------------------------------------------------
# The wire format
# --------------------------------------------------------------------------
def _cfg(d=5, dtype=np.float64):
    return ClientConfig(
        layout=StatLayout({"A": (2, 2), "B": (3, 2)}), param_layout=ParamLayout(np.zeros((2, 3))),
        compressor=QSGD(s=4), cv_rate=0.5, batch_size=None, local_steps=1,
        dtype=np.dtype(dtype), pin=True,
    )


def test_problems_config_and_state_round_trip():
    dl = DictionaryLearningProblem(3, 0.5, 4, positive_code=True, dict_init=np.eye(3, 4))
    dl = dl.prepare({"M": np.eye(4)})
    back = records.decode_problem(*records.encode_problem(dl))
    assert type(back) is DictionaryLearningProblem and back.positive_code is True
    np.testing.assert_array_equal(back.dict_init, dl.dict_init)
    np.testing.assert_array_equal(back.second_moment_, dl.second_moment_)
    ot = EntropicOTProblem(np.arange(6.0).reshape(3, 2), [1.0, 2.0, 3.0], epsilon=0.3)
    ot = ot.prepare({"var": np.array([2.0]), "mean": np.zeros(2)})
    back = records.decode_problem(*records.encode_problem(ot))
    for name in ("target", "weights", "center", "_y_sq", "_log_b"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ot, name))
    assert back.cost_scale_ == ot.cost_scale_ and back.epsilon == 0.3
    # only the constants the clients read travel with their tasks
    cfg, arrays = records.encode_problem(dl, all_constants=False)
    assert "c.second_moment_" not in arrays and "c.second_moment_" in \
        records.encode_problem(dl)[1]
    assert "c.cost_scale_" in records.encode_problem(ot, all_constants=False)[0]

    cfg = records.decode_config(records.encode_config(_cfg()))
    assert cfg.layout == _cfg().layout and cfg.param_layout.shapes == [(2, 3)]
    assert isinstance(cfg.compressor, QSGD) and cfg.compressor.s == 4 and cfg.pin

    rng = np.random.default_rng(12345)
    rng.random(3)
    state = ClientState(cv=np.arange(5.0), rng=rng, log_scale=np.zeros(5))
    back = records.decode_state(*records.encode_state(state), size=5, dtype=np.float64)
    assert back.rng.bit_generator.state == rng.bit_generator.state
    np.testing.assert_array_equal(back.rng.random(4), rng.random(4))
    np.testing.assert_array_equal(back.cv, state.cv)


def test_problems_outside_the_allow_list_are_refused():
    class Mine(CauchyLocation):
        pass

    with pytest.raises(WireError, match="not allowed"):
        records.encode_problem(Mine())
    cfg, arrays = records.encode_problem(DictionaryLearningProblem(2, 0.1, 3))
    cfg["class"] = "os.system"
    with pytest.raises(WireError, match="'os.system' is not allowed"):
        records.decode_problem(cfg, arrays)


def _request(task="surrogate", **kw):
    theta = np.eye(2, 3)
    s_hat = np.ones(10)
    args = {
        "surrogate": (theta, s_hat, None, _cfg()), "parameter": (theta, _cfg()),
        "full": (theta, True), "loss": (theta, True), "init": (True,),
    }[task]
    problem = records.encode_problem(DictionaryLearningProblem(2, 0.1, 3))
    digest = records.records_digest(*problem)
    state = ClientState(cv=np.zeros(10), rng=np.random.default_rng(0))
    extra = dict(fit_id="f")
    if task in ("surrogate", "parameter"):
        extra.update(state=state, version=0)
    extra.update(kw)
    return records.encode_request(task, args=args, problem=problem, problem_digest=digest,
                                  **extra)


def _malformed_requests():
    def drop(key):
        def f(c):
            del c[key]
        return f

    def set_meta(k, v):
        def f(c):
            c["meta"][k] = v
        return f

    def set_array(rec, k, v):
        def f(c):
            c[rec][k] = Array(v)
        return f

    def set_cfg(k, v):
        def f(c):
            c["config"][k] = v
        return f

    return {
        "no meta": (drop("meta"), "'meta' is missing"),
        "protocol": (set_meta("protocol", "other/9"), "protocol"),
        "task": (set_meta("task", "rm -rf"), "unknown task"),
        "theta shape": (set_array("arrays", "theta", np.zeros((3, 3))), "theta does not match"),
        "theta NaN": (set_array("arrays", "theta", np.full((2, 3), np.nan)), "not finite"),
        "theta dtype": (set_array("arrays", "theta", np.zeros((2, 3), np.float32)), "dtype"),
        "s_hat shape": (set_array("arrays", "s_hat", np.ones(4)), "'s_hat' has shape"),
        "s_hat missing": (lambda c: c["arrays"].__delitem__("s_hat"), "'s_hat' is missing"),
        "cv shape": (set_array("state.arrays", "cv", np.zeros(3)), "cv has shape"),
        "rng": (lambda c: c["state.cfg"].__setitem__("rng.state", "x"), "stream"),
        "rng range": (lambda c: c["state.cfg"].__setitem__("rng.inc", str(2**130)), "range"),
        "compressor": (set_cfg("compressor", "pickle"), "unknown compressor"),
        "cv_rate": (set_cfg("cv_rate", float("nan")), "cv_rate"),
        "batch": (set_cfg("batch_size", 0), "batch_size"),
        "layout": (set_cfg("layout.dims", [2, 2]), "layout"),
        "digest": (set_meta("problem_digest", "0" * 64), "digest"),
        "extra record": (lambda c: c.__setitem__("evil", ConfigRecord({"a": 1})), "unexpected"),
        "version": (set_meta("version", -1), "version"),
    }


@pytest.mark.parametrize("case", sorted(_malformed_requests()))
def test_the_node_refuses_a_malformed_request_and_keeps_its_state(case):
    mutate, match = _malformed_requests()[case]
    rows = np.random.default_rng(0).standard_normal((10, 3))
    store = RecordDict()
    good = handle(_request(), store, rows)
    assert "error" not in good["meta"], good["meta"]
    before = {k: records.records_digest(v) if isinstance(v, (ArrayRecord, ConfigRecord)) else v
              for k, v in store.items()}
    # the next round, from the tentative state (or a request carrying a full state)
    bad = _request() if case in ("cv shape", "rng", "rng range") else _request(
        state=None, version=1)
    mutate(bad)
    with pytest.raises(WireError, match=match):
        records.decode_request(bad, rows.dtype)
    reply = handle(bad, store, rows)
    assert reply["meta"]["error"] == "WireError" and match.split("'")[0] in reply["meta"]["message"]
    after = {k: records.records_digest(v) for k, v in store.items()}
    assert after == before  # nothing applied


def test_node_state_versions_follow_the_servers_commits():
    rows = np.random.default_rng(0).standard_normal((10, 3))
    store = RecordDict()

    def payload(reply):
        assert "error" not in reply["meta"], reply["meta"]
        message, version = records.decode_reply(reply, "surrogate", dtype=np.float64, size=10,
                                                compressor=QSGD(s=4))
        return message.payload, version

    p1, v1 = payload(handle(_request(), store, rows))
    assert v1 == 1
    # the server did not commit that round: it resumes from version 0 again
    p1b, _ = payload(handle(_request(state=None, version=0), store, rows))
    np.testing.assert_array_equal(p1b, p1)  # same stream, same message
    # it committed the round: version 1 (the tentative state) is the base
    p2, v2 = payload(handle(_request(state=None, version=1), store, rows))
    assert v2 == 2 and not np.array_equal(p2, p1)
    # a version the node does not hold, another fit: refused
    for req, match in ((_request(state=None, version=5), "holds versions"),
                       (_request(state=None, version=1, fit_id="g"), "no state of fit")):
        reply = handle(req, store, rows)
        assert reply["meta"]["error"] == "WireError" and match in reply["meta"]["message"]


def _reply(task, answer, version=None):
    return records.encode_reply(task, answer, version=version)


def _malformed_replies():
    msg = ClientMessage(payload=np.ones(5), bits=100, loss=0.5)
    return {
        "payload shape": (_reply("surrogate", ClientMessage(np.ones(4), 100, 0.5), 1),
                          "surrogate", "'payload' has shape"),
        "payload NaN": (_reply("surrogate", ClientMessage(np.full(5, np.nan), 100, 0.5), 1),
                        "surrogate", "not finite"),
        "payload dtype": (_reply("surrogate", ClientMessage(np.ones(5, np.float32), 100, 0.5), 1),
                          "surrogate", "dtype"),
        "loss": (_reply("surrogate", ClientMessage(np.ones(5), 100, float("inf")), 1),
                 "surrogate", "loss is not finite"),
        "bits": (_reply("surrogate", ClientMessage(np.ones(5), -3, 0.5), 1), "surrogate", "bits"),
        "version": (_reply("surrogate", msg, 0), "surrogate", "version"),
        "wrong task": (_reply("loss", 1.0), "surrogate", "a reply to 'loss'"),
        "info rows": (_reply("info", {"n_rows": 0, "n_features": 3, "dtype": "float64"}),
                      "info", "n_rows"),
        "info dtype": (_reply("info", {"n_rows": 3, "n_features": 3, "dtype": "complex128"}),
                       "info", "dtype"),
        "stat NaN": (_reply("full", ({"A": np.full(2, np.nan)}, 0.1)), "full", "not finite"),
        "init complex": (_reply("init", {"M": np.eye(2).astype(complex)}), "init", "dtype"),
    }


@pytest.mark.parametrize("case", sorted(_malformed_replies()))
def test_the_server_refuses_a_malformed_reply(case):
    content, task, match = _malformed_replies()[case]
    with pytest.raises(WireError, match=match):
        records.decode_reply(content, task, dtype=np.float64, size=5)


@pytest.mark.parametrize("compression", [QSGD(s=4), QSGD(s=100), QSGD(s=4, coding="fixed"),
                                         QSGD(s=1, bucket_size=5), RandK(k=3), RandK(ratio=1.0),
                                         Identity()])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_payloads_travel_in_their_compressors_encoding(compression, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(37).astype(dtype)
    x[5] = 0
    recorder = records.RecordingCompressor(compression)
    payload, bits = recorder.compress(x, rng)
    cfg, arrays = records.pack_payload(payload, compression, recorder.norm)
    back = records.unpack_payload(cfg, arrays, compression, 37, dtype)
    assert back.dtype == payload.dtype
    np.testing.assert_array_equal(back, payload)
    nbytes = sum(a.numpy().nbytes for a in arrays.values())
    if cfg["encoding"] == "dense":
        assert nbytes == payload.nbytes and isinstance(compression, (Identity, RandK))
    else:  # exactly the compressor's reported bits, rounded up to whole bytes
        assert cfg["encoding"] == type(compression).__name__.lower()
        assert nbytes == -(-bits // 8)


def test_malformed_packed_payloads_are_refused():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10)
    q = records.RecordingCompressor(QSGD(s=4))
    cfg, arrays = records.pack_payload(q.compress(x, rng)[0], QSGD(s=4), q.norm)
    with pytest.raises(WireError, match="levels"):
        records.unpack_payload(cfg, arrays, QSGD(s=4), 12, np.float64)
    with pytest.raises(WireError, match="unknown payload encoding"):
        records.unpack_payload(cfg, arrays, RandK(k=2), 10, np.float64)
    bad = ArrayRecord({"norm": Array(np.array([-1.0])), "levels": arrays["levels"]})
    with pytest.raises(WireError, match="out of range"):
        records.unpack_payload(cfg, bad, QSGD(s=4), 10, np.float64)
    r = RandK(k=3)
    cfg, arrays = records.pack_payload(r.compress(x, rng)[0], r)
    dup = ArrayRecord({"values": arrays["values"],
                       "indices": Array(records._uint_bits(np.array([1, 1, 2]), 4))})
    with pytest.raises(WireError, match="repeated"):
        records.unpack_payload(cfg, dup, r, 10, np.float64)


def test_replies_round_trip():
    msg = ClientMessage(payload=np.arange(5.0), bits=123, loss=0.25)
    out, version = records.decode_reply(_reply("surrogate", msg, 3), "surrogate",
                                        dtype=np.float64, size=5)
    np.testing.assert_array_equal(out.payload, msg.payload)
    assert (out.bits, out.loss, version) == (123, 0.25, 3)
    stat, loss = records.decode_reply(_reply("full", ({"A": np.eye(2)}, 0.5)), "full")
    np.testing.assert_array_equal(stat["A"], np.eye(2)) and loss == 0.5
    assert records.decode_reply(_reply("init", None), "init") is None
    error = records.encode_error("loss", "ValueError", "bad rows")
    with pytest.raises(records.NodeError, match="ValueError: bad rows"):
        records.decode_reply(error, "loss")


# --------------------------------------------------------------------------
# A deployment: SuperLink and SuperNodes as separate processes
# --------------------------------------------------------------------------
@pytest.fixture
def flower_cluster(tmp_path, request):
    """A SuperLink and three SuperNodes on free loopback ports, each with its rows.

    Every process is stopped by its PID (with its process group) by the
    finalizer, whatever the test's outcome.
    """
    from skfedmm.flower.loopback import LoopbackFederation

    if shutil.which("flower-superlink", path=BIN) is None:
        pytest.skip("flower-superlink is not installed next to this Python")
    rng = np.random.default_rng(0)
    rows, files = [], []
    for k, n in enumerate((30, 40, 50)):
        rows.append(rng.standard_normal((n, 6)))
        files.append(tmp_path / f"rows{k}.npy")
        np.save(files[-1], rows[-1])
    fed = LoopbackFederation(tmp_path / "federation", files)
    request.addfinalizer(fed.stop)
    fed.start()
    fed.rows = dict(zip(fed.node_ids, rows))
    return fed


class _Replay(Transport):
    """The local transport, with the failures a deployment recorded, call by call."""

    def __init__(self, clients, calls):
        self._inner = LocalTransport(clients)
        self._calls = list(calls)
        self.n_features = clients[0].shape[1]

    n_clients = property(lambda self: self._inner.n_clients)
    n_rows = property(lambda self: self._inner.n_rows)
    dtype = property(lambda self: self._inner.dtype)

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def run(self, task, indices, problem, *args, **kwargs):
        call = self._calls.pop(0)
        assert call["task"] == task and call["clients"] == [int(i) for i in indices]
        answers = self._inner.run(task, indices, problem, *args, **kwargs)
        return [ClientFailure("Replayed", "failed in the deployment") if i in call["failed"]
                else a for i, a in zip(indices, answers)]


def _in_process(make, rows, report, **fit_params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make().fit_transport(_Replay(rows, report["calls"]), **fit_params)


DL_PARAMS = dict(n_components=4, alpha=0.1, max_iter=2, participation=0.67,
                 compression=["qsgd", {"s": 16}], random_state=0)
# client_timeout: how long the rounds the killed node misses last; healthy
# nodes answer in about 10 s here (a slow one that misses it is a failure the
# in-process fit replays)
OT_PARAMS = dict(epsilon=0.5, max_iter=2, participation=0.67, compression=["qsgd", {"s": 8}],
                 client_timeout=25, random_state=0)


def _tuple(params):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


def test_deployment_on_flower_processes(flower_cluster, tmp_path):
    fed = flower_cluster
    t0 = time.monotonic()
    # 1. dictionary learning: partial participation, QSGD, bitwise the in-process fit
    dl, report = fed.run(APP, {
        "estimator": "skfedmm.FederatedDictionaryLearning", "params": json.dumps(DL_PARAMS),
    }, name="dl", timeout=200)
    assert [int(n) for n in report["node_ids"]] == sorted(fed.node_ids) == dl.flower_node_ids_
    rows = [fed.rows[n] for n in dl.flower_node_ids_]
    local = _in_process(lambda: FederatedDictionaryLearning(**_tuple(DL_PARAMS)), rows, report)
    np.testing.assert_array_equal(dl.components_, local.components_)
    np.testing.assert_array_equal(dl.history_["objective"], local.history_["objective"])
    assert dl.transform(rows[0]).shape == (len(rows[0]), 4)  # an ordinary estimator now
    t_dl = time.monotonic() - t0

    # 2. OT map; one SuperNode is killed as it receives its first round's message
    target = np.random.default_rng(1).standard_normal((20, 6))
    np.save(tmp_path / "target.npy", target)
    offsets = [len(node.text()) for node in fed.nodes]
    proc = fed.submit(APP, "ot", {
        "estimator": "skfedmm.FederatedOTMap", "params": json.dumps(OT_PARAMS),
        "fit-arrays": json.dumps({"target": str(tmp_path / "target.npy")}),
    })
    first_round = re.compile(r"ROUND \w+:surrogate\]\s*\n.*Receiving")
    deadline = time.monotonic() + 150
    victim = None
    while victim is None and time.monotonic() < deadline and proc.proc.poll() is None:
        for k, node in enumerate(fed.nodes):
            if first_round.search(node.text()[offsets[k]:]):
                victim = k
                node.stop(signal.SIGKILL)  # the node and its ClientApp, mid-computation
                break
        time.sleep(0.1)
    assert victim is not None, "no SuperNode received a round of the OT fit"
    ot, report = fed.result(proc, "ot", timeout=200)
    ids = ot.flower_node_ids_
    i = ids.index(fed.node_ids[victim])
    # the killed node is a failed client from that round on, named in the history
    errors = [dict(row).get(i) for row in ot.history_.failed[1:]]
    assert errors[0] is not None and errors[0].startswith(f"node {ids[i]}: "), ot.history_.failed
    assert ot.n_iter_ == OT_PARAMS["max_iter"]
    rows = [fed.rows[n] for n in ids]
    local = _in_process(lambda: FederatedOTMap(**_tuple(OT_PARAMS)), rows, report, target=target)
    np.testing.assert_array_equal(ot.potential_, local.potential_)
    np.testing.assert_array_equal(ot.history_["objective"], local.history_["objective"])
    print(f"dictionary run {t_dl:.0f} s, total {time.monotonic() - t0:.0f} s; failures "
          f"{ot.history_.failed}")


def test_kmeans_fits_on_the_transport_and_keeps_labels_on_the_nodes():
    from skfedmm import FederatedKMeans

    nodes = _nodes()
    centres = np.random.default_rng(3).standard_normal((3, 6))

    def make():
        return FederatedKMeans(n_clusters=3, init=centres, n_init=1, **FIT)

    local = make().fit(_in_order(nodes))
    remote = make().fit_transport(FlowerTransport(MemoryGrid(nodes)))
    np.testing.assert_array_equal(remote.cluster_centers_, local.cluster_centers_)
    assert remote.labels_ is None
    np.testing.assert_allclose(remote.inertia_, local.inertia_, rtol=1e-12)
    np.testing.assert_array_equal(remote.predict(nodes[7]), local.predict(nodes[7]))
