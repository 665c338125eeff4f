"""The server's side: a transport over Flower's ``Grid`` and a ``ServerApp``.

:class:`FlowerTransport` implements :class:`~skfedmm.federation.Transport`
with the SuperNodes connected to a SuperLink as the clients (ordered by
node id). The round loop is the one of every other transport; this module
only carries its payloads and answers (:mod:`skfedmm.flower.records`).

Client states. A deployment keeps each client's control variate and random
stream on its node. The round loop hands the transport the states it
resumes from: a state holding a real generator (the initial states the
engine draws from the seeds of ``random_state``, or a state from a fit run
elsewhere) is sent to the node in full, once; afterwards the server keeps
a *mirror* of the client's state, whose control variate it derives from
the messages with the client's own operations
(:func:`~skfedmm.federation.client._current_cv`,
:func:`~skfedmm.federation.client._next_cv`) and whose stream is a
:class:`NodeStream` tag naming the node and the version of the state the
node holds (see :mod:`skfedmm.flower.node` for the atomicity protocol).
"""

import contextlib
import json
import time
import uuid
import warnings

import numpy as np

from .._messages import InvalidMessageError
from ..federation.client import ClientState, _current_cv, _next_cv
from ..federation.local import ClientFailure, blas_limited
from ..federation.transport import Transport
from .records import (
    MESSAGE_TYPE,
    TASKS,
    NodeError,
    WireError,
    decode_reply,
    encode_problem,
    encode_request,
    records_digest,
)

__all__ = ["FlowerTransport", "NodeStream", "make_server_app", "run_server"]


class NodeStream:
    """Stands, in the server's mirror of a client state, for a stream kept on a node.

    Parameters
    ----------
    node_id : int
        The Flower node holding the client's state.
    fit_id : str
        The fit the state belongs to.
    version : int
        The number of the client's rounds the server has committed with
        that state.
    """

    def __init__(self, node_id, fit_id, version):
        self.node_id = int(node_id)
        self.fit_id = str(fit_id)
        self.version = int(version)

    def __repr__(self):
        return f"NodeStream(node_id={self.node_id}, fit_id={self.fit_id!r}, version={self.version})"

    def __eq__(self, other):
        return isinstance(other, NodeStream) and (
            (self.node_id, self.fit_id, self.version)
            == (other.node_id, other.fit_id, other.version)
        )

    def __deepcopy__(self, memo):
        return self


class FlowerTransport(Transport):
    """The SuperNodes connected to a SuperLink, as the clients of a fit.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The grid a ``ServerApp`` receives.
    client_timeout : float or None, default=None
        Seconds to wait for the replies of one task (Flower's ``timeout``);
        the nodes that have not answered by then failed in that round. None
        waits until every node has answered or Flower reports it
        unavailable (after two missed heartbeats, about a minute).
    poll_interval : float, default=0.1
        Seconds between two pulls of replies from the SuperLink (Flower's
        own ``send_and_receive`` waits 3 s between pulls).
    min_nodes : int, default=1
        Nodes that must be connected before the fit starts.
    wait_for_nodes : float, default=120.0
        Seconds to wait for ``min_nodes`` nodes.
    node_ids : sequence of int, default=None
        The nodes to use (all connected nodes when None), in any order;
        clients are the nodes sorted by id.

    Attributes
    ----------
    node_ids : list of int
        The nodes, sorted: client ``i`` is node ``node_ids[i]``.
    bytes_sent, bytes_received : dict of str to int
        Bytes of array data sent and received per task (the arrays of the
        records; Flower's framing is not counted).
    timings : list of tuple
        Per exchange: task, number of clients, seconds to push the
        requests, seconds until the last reply (or the timeout), array
        bytes sent and received.
    calls : list of dict
        Per task the round loop ran: ``task``, ``clients`` (indices) and
        ``failed`` (the clients that failed).
    supported_tasks : tuple of str
        The client tasks the wire format carries. The gradient baselines'
        task (``aggregation="fedavg"``, ``"fedprox"``, ``"scaffold"``) is
        not among them: the engine refuses those aggregations on Flower.
    """

    #: The client tasks a node runs (the gradient baselines' is not one).
    supported_tasks = TASKS

    def __init__(self, grid, *, client_timeout=None, poll_interval=0.1, min_nodes=1,
                 wait_for_nodes=120.0, node_ids=None):
        self.grid = grid
        self.client_timeout = client_timeout
        self.poll_interval = poll_interval
        self.min_nodes = min_nodes
        self.wait_for_nodes = wait_for_nodes
        self._wanted = None if node_ids is None else sorted(int(n) for n in node_ids)
        self._info = None
        self._stack = None
        self._fit_id = None
        self._node_problem = {}
        self._problem_cache = (None, None)
        self.bytes_sent = {}
        self.bytes_received = {}
        self.timings = []
        self.calls = []

    # ------------------------------------------------------------ the nodes
    def connect(self):
        """Wait for the nodes and ask each for its row count, features and dtype.

        Returns
        -------
        self : FlowerTransport

        Raises
        ------
        RuntimeError
            Too few nodes within ``wait_for_nodes`` seconds, or a node that
            does not answer, answers wrongly, or holds rows of another
            shape or dtype than the others (the error names the node).
        """
        if self._info is not None:
            return self
        deadline = time.monotonic() + self.wait_for_nodes
        while True:
            connected = sorted(int(n) for n in self.grid.get_node_ids())
            nodes = connected if self._wanted is None else [
                n for n in self._wanted if n in set(connected)
            ]
            enough = len(nodes) >= (self.min_nodes if self._wanted is None else len(self._wanted))
            if enough or time.monotonic() > deadline:
                break
            time.sleep(min(1.0, self.wait_for_nodes))
        if not enough or not nodes:
            raise RuntimeError(
                f"{len(nodes)} node(s) connected after {self.wait_for_nodes} s "
                f"({nodes}); at least {self.min_nodes} needed"
            )
        self.node_ids = nodes
        self._fit_id = uuid.uuid4().hex
        answers = self._exchange("info", list(range(len(nodes))), lambda i: encode_request(
            "info", fit_id=self._fit_id))
        info = []
        for i, ans in enumerate(answers):
            if isinstance(ans, ClientFailure):
                raise RuntimeError(f"node {nodes[i]} did not report its rows: {ans.message}")
            info.append(ans)
        n_features = {a["n_features"] for a in info}
        dtypes = {a["dtype"] for a in info}
        for name, values in (("n_features", n_features), ("dtype", dtypes)):
            if len(values) > 1:
                first = info[0][name]
                odd = next(nodes[i] for i, a in enumerate(info) if a[name] != first)
                raise RuntimeError(
                    f"node {odd} reports {name}={info[nodes.index(odd)][name]}, node "
                    f"{nodes[0]} {first}: all nodes must hold rows of one shape and dtype"
                )
        self._info = info
        return self

    @property
    def n_clients(self):
        return len(self.connect().node_ids)

    @property
    def n_rows(self):
        return np.array([a["n_rows"] for a in self.connect()._info], dtype=int)

    @property
    def n_features(self):
        """Number of columns of every node's rows."""
        return self.connect()._info[0]["n_features"]

    @property
    def dtype(self):
        return self.connect()._info[0]["dtype"]

    def __enter__(self):
        self.connect()
        stack = contextlib.ExitStack()
        # the server's steps run under the BLAS limit of the local transport
        # (several clients), so that they are bitwise those of an in-process fit
        stack.enter_context(blas_limited(self.n_clients > 1))
        self._stack = stack
        return self

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        if stack is not None:
            return stack.__exit__(*exc)
        return False

    # ------------------------------------------------------------ messages
    def _count(self, table, task, content):
        size = 0
        for rec in content.values():
            if hasattr(rec, "values"):
                for v in rec.values():
                    if hasattr(v, "numpy"):  # the array's bytes (not its .npy header)
                        size += int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize
        table[task] = table.get(task, 0) + size
        return size

    def _exchange(self, task, indices, build, decode=None):
        """Send one request per client, collect replies or failures, in order."""
        from flwr.app import Message

        if decode is None:
            def decode(i, content):
                return decode_reply(content, task)
        t0 = time.perf_counter()
        sent0, received0 = self.bytes_sent.get(task, 0), self.bytes_received.get(task, 0)
        messages, failures = {}, {}
        for i in indices:
            try:
                content = build(i)
            except ClientFailureError as exc:
                failures[i] = exc.failure
                continue
            self._count(self.bytes_sent, task, content)
            messages[i] = Message(
                content, dst_node_id=self.node_ids[i], message_type=MESSAGE_TYPE,
                group_id=f"{self._fit_id}:{task}",
            )
        order = list(messages)
        ids = list(self.grid.push_messages([messages[i] for i in order])) if order else []
        waiting = dict(zip(ids, order))
        replies = {}
        t_push = time.perf_counter()
        deadline = None if self.client_timeout is None else time.monotonic() + self.client_timeout
        while waiting:
            for msg in self.grid.pull_messages(list(waiting)):
                i = waiting.pop(msg.metadata.reply_to_message_id, None)
                if i is not None:
                    replies[i] = msg
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        t_wait = time.perf_counter() - t_push
        out = []
        for i in indices:
            node = self.node_ids[i]
            if i in failures:
                out.append(failures[i])
            elif i not in replies:
                out.append(_failure(node, "TimeoutError", f"no reply within client_timeout="
                                    f"{self.client_timeout} s"))
            elif replies[i].has_error():
                err = replies[i].error
                out.append(_failure(node, f"FlowerError{err.code}",
                                    f"Flower reports error {err.code}: {err.reason}"))
            else:
                content = replies[i].content
                self._count(self.bytes_received, task, content)
                try:
                    out.append(decode(i, content))
                except NodeError as exc:
                    if "does not hold the problem" in exc.message:
                        self._node_problem.pop(node, None)
                    out.append(_failure(node, exc.error, exc.message))
                except WireError as exc:
                    out.append(_failure(node, "InvalidMessageError",
                                        f"a malformed reply to {task!r}: {exc}", exc))
                except Exception as exc:  # noqa: BLE001 - any bad reply fails its client
                    out.append(_failure(node, type(exc).__name__,
                                        f"a reply to {task!r} could not be read: {exc}", exc))
        self.timings.append((
            task, len(indices), t_push - t0, t_wait, self.bytes_sent.get(task, 0) - sent0,
            self.bytes_received.get(task, 0) - received0,
        ))
        return out

    def _problem_records(self, problem, task):
        key = (problem, task == "parameter")
        cached, records = self._problem_cache
        if cached is None or cached[0] is not key[0] or cached[1] != key[1]:
            # the clients of parameter aggregation run M-steps: every constant
            cfg, arrays = encode_problem(problem, all_constants=key[1])
            records = (cfg, arrays, records_digest(cfg, arrays))
            self._problem_cache = (key, records)
        return records

    def run(self, task, indices, problem, *args, states=None, per_client=None):
        if self._stack is None:
            raise RuntimeError("Enter the transport (`with transport:`) before running tasks.")
        indices = [int(i) for i in indices]
        if not indices:
            return []
        seeds = None
        if task in ("init_compressed", "full_compressed"):
            # per client: the seed of its compression stream (and, for the
            # init, its initialization data, which must stay on the node)
            seeds = [p[0] if task == "init_compressed" else p for p in per_client]
            per_client = [p[1] for p in per_client] if task == "init_compressed" else None
        if per_client is not None and any(p is not None for p in per_client):
            raise ValueError(
                "per-client initialization data (e.g. code_init) must stay on the nodes: "
                "give it to skfedmm.flower.make_client_app(load_init=...)"
            )
        cfg_p, arr_p, digest = self._problem_records(problem, task)
        stateful = task in ("surrogate", "parameter")
        dtype = np.dtype(self.dtype)
        if stateful:
            cfg = args[-1]
            size = cfg.layout.size if task == "surrogate" else cfg.param_layout.size
        sent = {}

        def build(i):
            node = self.node_ids[i]
            with_problem = self._node_problem.get(node) != digest
            kwargs = dict(fit_id=self._fit_id, args=args, problem_digest=digest,
                          problem=(cfg_p, arr_p) if with_problem else None)
            if seeds is not None:
                kwargs["seed"] = seeds[i]
            if stateful:
                st = states[i]
                if isinstance(st.rng, NodeStream):
                    if st.rng.node_id != node:
                        raise ClientFailureError(_failure(
                            node, "StateError",
                            f"client {i}'s state is held by node {st.rng.node_id}, not {node}"))
                    kwargs.update(fit_id=st.rng.fit_id, version=st.rng.version)
                else:
                    kwargs.update(state=st, version=0)
                sent[i] = kwargs["fit_id"], kwargs["version"]
            return encode_request(task, **kwargs)

        def decode(i, content):
            node = self.node_ids[i]
            compressor = cfg.compressor if stateful else (args[-1] if seeds is not None else None)
            answer = decode_reply(content, task, dtype=dtype, size=size if stateful else None,
                                  compressor=compressor)
            self._node_problem[node] = digest
            if not stateful:
                return answer
            message, version = answer
            fit_id, old = sent[i]
            if version != old + 1:
                raise WireError(f"the node answered with state version {version}, expected {old + 1}")
            st = states[i]
            if task == "surrogate":
                log_scale = args[2]
                cv = _next_cv(_current_cv(st.cv, st.log_scale, log_scale), message.payload,
                              cfg.cv_rate)
                mirror = ClientState(cv=cv, rng=NodeStream(node, fit_id, version),
                                     log_scale=log_scale)
            else:
                mirror = ClientState(cv=None, rng=NodeStream(node, fit_id, version))
            return message, mirror

        answers = self._exchange(task, indices, build, decode)
        self.calls.append({
            "task": task, "clients": indices,
            "failed": [i for i, a in zip(indices, answers) if isinstance(a, ClientFailure)],
        })
        return answers


class ClientFailureError(Exception):
    """A client that fails before its request is sent (carries the failure)."""

    def __init__(self, failure):
        super().__init__(failure.message)
        self.failure = failure


def _failure(node, kind, message, exc=None):
    """A failure recorded as ``"node <id>: <kind>"`` (history_.failed keeps it)."""
    text = f"node {node}: {message}"
    return ClientFailure(f"node {node}: {kind}", text, exc or InvalidMessageError(text))


# --------------------------------------------------------------------------
# The ServerApp: fit any skfedmm estimator from the run configuration
# --------------------------------------------------------------------------
_ESTIMATORS = {}


def register_estimator(cls):
    """Allow a user-defined estimator class in the server app's run configuration.

    Parameters
    ----------
    cls : type
        A class using :class:`skfedmm._base.FederatedMixin`.

    Returns
    -------
    cls : type
    """
    from .._base import FederatedMixin

    if not (isinstance(cls, type) and issubclass(cls, FederatedMixin)):
        raise TypeError(f"register_estimator expects a federated estimator class, got {cls!r}")
    _ESTIMATORS[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def _estimator_class(path):
    import skfedmm
    from .._base import FederatedMixin

    allowed = dict(_ESTIMATORS)
    for name in skfedmm.__all__:
        obj = getattr(skfedmm, name)
        if isinstance(obj, type) and issubclass(obj, FederatedMixin):
            allowed[f"skfedmm.{name}"] = obj
            allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    if path not in allowed:
        raise ValueError(
            f"estimator {path!r} is not one of skfedmm's ({sorted(allowed)}); register "
            "others with skfedmm.flower.register_estimator"
        )
    return allowed[path]


def _json(run_config, key, default):
    text = run_config.get(key, default)
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as exc:
        raise ValueError(f"run config {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"run config {key!r} must be a JSON object, got {text!r}")
    return value


def _pairs_to_tuples(params):
    """JSON has no tuples: ``["qsgd", {"s": 4}]`` becomes ``("qsgd", {"s": 4})``."""
    return {
        k: tuple(v) if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
        and isinstance(v[1], dict) else v
        for k, v in params.items()
    }


def run_server(grid, run_config):
    """Fit an estimator over the connected nodes and save it (the ServerApp's work).

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    run_config : dict
        Flower's run configuration (``[tool.flwr.app.config]`` and
        ``flwr run --run-config``):

        - ``estimator``: the class, e.g. ``"skfedmm.FederatedDictionaryLearning"``;
        - ``params``: its parameters as a JSON object (a ``[name, {...}]``
          pair is read as a tuple, e.g. ``compression``);
        - ``fit-params``: other ``fit`` parameters as a JSON object, and
          ``fit-arrays``: ``fit`` parameters read from ``.npy`` files on
          the server (a JSON object of paths, e.g. ``{"target": "y.npy"}``);
        - ``output``: where ``joblib.dump`` writes the fitted estimator;
        - ``min-nodes`` (1), ``wait-for-nodes`` (120 s), ``poll-interval``
          (0.1 s);
        - ``report`` (optional): a JSON file for the transport's record
          (node ids, row counts, per-exchange timings, bytes, failures).

    Returns
    -------
    estimator : object
        The fitted estimator (also saved to ``output``), with
        ``flower_node_ids_``: the node of each client.
    """
    import joblib

    cls = _estimator_class(run_config["estimator"])
    estimator = cls(**_pairs_to_tuples(_json(run_config, "params", "{}")))
    fit_params = _json(run_config, "fit-params", "{}")
    for name, path in _json(run_config, "fit-arrays", "{}").items():
        fit_params[name] = np.load(path, allow_pickle=False)
    transport = FlowerTransport(
        grid,
        client_timeout=estimator.get_params().get("client_timeout"),
        poll_interval=float(run_config.get("poll-interval", 0.1)),
        min_nodes=int(run_config.get("min-nodes", 1)),
        wait_for_nodes=float(run_config.get("wait-for-nodes", 120.0)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        estimator.fit_transport(transport, **fit_params)
    estimator.flower_node_ids_ = list(transport.node_ids)
    output = run_config.get("output")
    if output:
        joblib.dump(estimator, output)
    report = run_config.get("report")
    if report:
        with open(report, "w") as f:
            json.dump({
                "node_ids": [str(n) for n in transport.node_ids],
                "n_rows": [int(n) for n in transport.n_rows],
                "timings": transport.timings, "calls": transport.calls,
                "bytes_sent": transport.bytes_sent, "bytes_received": transport.bytes_received,
                "round_time": list(map(float, estimator.history_.time)),
            }, f, indent=1)
    return estimator


def make_server_app():
    """A Flower ``ServerApp`` whose main runs :func:`run_server`.

    Returns
    -------
    app : flwr.serverapp.ServerApp
    """
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid, context):
        run_server(grid, dict(context.run_config))

    return app
